"""Data-mixing laws (Ye et al., 2024): per-domain validation loss as a function of the mixture,

    L_i(r) = c_i + k_i * exp(sum_j t_ij r_j),

fitted to proxy results with optax (many random restarts at once, vmapped), then minimised over
the mixture simplex — with per-domain upper bounds from epoch caps — by projected gradient
descent. The fit runs on standardised losses, so one learning rate suits any loss scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpy.typing import ArrayLike

from loam.mixing.regmix import MixSearchError, check_enough


@dataclasses.dataclass(frozen=True)
class MixingLaw:
    """L(r) = c + k * exp(t . r) for one domain (or target)."""
    c: float
    k: float
    t: tuple[float, ...]
    rmse: float  # on the points it was fitted to

    def predict(self, R) -> np.ndarray:
        R = np.atleast_2d(np.asarray(R, np.float64))
        return self.c + self.k * np.exp(R @ np.asarray(self.t))

    def jax_predict(self, r):
        return self.c + self.k * jnp.exp(r @ jnp.asarray(self.t, jnp.float32))

    def to_json(self) -> dict:
        return {"c": self.c, "k": self.k, "t": list(self.t), "rmse": self.rmse}


def _fit_normalised(R, y, restarts: int, steps: int, seed: int, lr: float):
    """Best of ``restarts`` Adam fits of y ~ c + exp(b + R t) (y standardised)."""
    M, D = R.shape

    def loss(p):
        pred = p["c"] + jnp.exp(p["b"] + R @ p["t"])
        return jnp.mean(jnp.square(pred - y)) + 1e-6 * jnp.sum(jnp.square(p["t"]))

    opt = optax.adam(lr)

    def run(p0):
        def body(carry, _):
            p, s = carry
            g = jax.grad(loss)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(body, (p0, opt.init(p0)), None, length=steps)
        return p, loss(p)

    key = jax.random.PRNGKey(seed)
    kt, kb = jax.random.split(key)
    p0 = {"t": jax.random.normal(kt, (restarts, D)) * 2.0,
          "b": jax.random.normal(kb, (restarts,)) * 0.5,
          "c": jnp.full((restarts,), float(y.min()) - 1.0)}
    params, losses = jax.jit(jax.vmap(run))(p0)
    losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
    best = int(jnp.argmin(losses))
    return jax.tree.map(lambda x: np.asarray(x[best], np.float64), params), float(losses[best])


def fit_law(R, y, restarts: int = 32, steps: int = 2000, seed: int = 0,
            lr: float = 0.03) -> MixingLaw:
    """Fit one law to mixtures R [M, D] and losses y [M]."""
    R = np.asarray(R, np.float64)
    y = np.asarray(y, np.float64)
    if R.ndim != 2 or y.shape != (R.shape[0],):
        raise MixSearchError(f"mixing-law fit needs R [M, D] and y [M], got {R.shape}, {y.shape}")
    if not (np.isfinite(R).all() and np.isfinite(y).all()):
        raise MixSearchError("mixing-law fit got non-finite mixtures or losses; drop those "
                             "proxies first (regmix.finite_rows)")
    check_enough(len(y), R.shape[1])
    mu, sd = float(y.mean()), float(y.std()) or 1.0
    p, _ = _fit_normalised(jnp.asarray(R, jnp.float32), jnp.asarray((y - mu) / sd, jnp.float32),
                           restarts, steps, seed, lr)
    # Back to loss units: y = mu + sd * (c + exp(b + R t)).
    law = MixingLaw(c=mu + sd * float(p["c"]), k=sd * float(np.exp(p["b"])),
                    t=tuple(float(x) for x in p["t"]), rmse=0.0)
    rmse = float(np.sqrt(np.mean((law.predict(R) - y) ** 2)))
    return dataclasses.replace(law, rmse=rmse)


def fit_laws(R: ArrayLike, losses: Mapping[str, ArrayLike], **kwargs) -> dict[str, MixingLaw]:
    """One law per domain: {domain: losses [M]} -> {domain: MixingLaw}."""
    return {d: fit_law(R, y, **kwargs) for d, y in losses.items()}


# --------------------------------------------------------------------------- optimisation


def project_capped_simplex(v, upper, iters: int = 60):
    """Euclidean projection of v onto {w : 0 <= w <= upper, sum w = 1} (bisection on the shift)."""
    lo = jnp.min(v) - 1.0  # every coordinate at its cap: sum(upper) >= 1
    hi = jnp.max(v)        # every coordinate at 0

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        s = jnp.sum(jnp.clip(v - mid, 0.0, upper))
        return jnp.where(s > 1.0, mid, lo), jnp.where(s > 1.0, hi, mid)

    lo, hi = jax.lax.fori_loop(0, iters, body, (lo, hi))
    w = jnp.clip(v - 0.5 * (lo + hi), 0.0, upper)
    return w / jnp.sum(w)


def optimize_mixture(laws: Sequence[MixingLaw], starts, upper=None, steps: int = 500,
                     lr: float = 0.02) -> tuple[np.ndarray, float]:
    """Mixture minimising the mean of ``laws`` on the capped simplex: projected gradient descent
    from each start (e.g. the best sampled candidates); the best end point wins."""
    starts = np.atleast_2d(np.asarray(starts, np.float64))
    D = starts.shape[1]
    upper = jnp.ones(D) if upper is None else jnp.asarray(upper, jnp.float32)
    if float(jnp.sum(upper)) < 1.0 - 1e-6:
        raise MixSearchError("the epoch caps leave no valid mixture (caps sum below 1)")

    def objective(r):
        return jnp.mean(jnp.stack([law.jax_predict(r) for law in laws]))

    def descend(r0):
        def body(i, r):
            g = jax.grad(objective)(r)
            g = g - jnp.mean(g)  # the component along the simplex
            step = lr * (1.0 - i / steps) / (jnp.max(jnp.abs(g)) + 1e-12)
            return project_capped_simplex(r - step * g, upper)
        r = jax.lax.fori_loop(0, steps, body, project_capped_simplex(r0, upper))
        return r, objective(r)

    ends, values = jax.jit(jax.vmap(descend))(jnp.asarray(starts, jnp.float32))
    values = np.asarray(values, np.float64)
    values = np.where(np.isfinite(values), values, np.inf)
    best = int(np.argmin(values))
    w = np.clip(np.asarray(ends[best], np.float64), 0.0, None)
    return w / w.sum(), float(values[best])


def propose(laws: Sequence[MixingLaw], candidates, upper=None, num_starts: int = 16,
            steps: int = 500) -> tuple[np.ndarray, dict]:
    """Score the candidates under the law, then refine the best ``num_starts`` of them."""
    candidates = np.asarray(candidates, np.float64)
    score = np.mean([law.predict(candidates) for law in laws], axis=0)
    starts = candidates[np.argsort(score, kind="stable")[:num_starts]]
    w, value = optimize_mixture(laws, starts, upper, steps=steps)
    best_candidate = float(np.nanmin(score))
    if value > best_candidate:  # the descent can only help; keep the candidate otherwise
        w, value = candidates[int(np.nanargmin(score))], best_candidate
    return w, {"predicted": value, "best_candidate_predicted": best_candidate,
               "candidates": int(len(candidates))}
