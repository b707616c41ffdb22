"""The fitting machinery every parametric law in loam.scaling shares.

A law is an objective over its parameters (Huber loss on residuals, per-point weights) and a grid
of starting points. All starts are minimised at once by the batched L-BFGS (lbfgs.py): first in
float32 (cheap, enough to find the basin), then the best few are polished to convergence in
float64; the lowest converged result is the fit. Bootstrap intervals refit resampled runs, all
resamples in one batched run (a resample is a vector of multiplicities, so every refit shares one
data array). Held-out prediction fits on some runs and scores the law on the others.

The Chinchilla objective is written out by hand for speed (laws.py); the other laws build theirs
from a prediction function by autodiff (`huber_objective`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loam.scaling import lbfgs

HUBER_DELTA = 1e-3
# Stopping rules (gradient max-norm; relative decrease of f per accepted step). The polish values
# are scipy L-BFGS-B's ftol (factr=1e7 times machine epsilon) with a gradient tolerance scaled to
# objectives whose values are ~1e-3.
SWEEP_TOL = dict(gtol=1e-7, ftol=1e-7)
POLISH_TOL = dict(gtol=1e-10, ftol=2.2e-9)

# A batched objective: (x [S, P], data tuple whose last entry is the weights [1 or S, n]) ->
# (f [S], grad [S, P]).
Objective = Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]


class ScalingFitError(ValueError):
  """The data cannot support the requested fit; the message names the fix."""


def huber_objective(predict: Callable[..., jax.Array], delta: float | None = HUBER_DELTA
                    ) -> Objective:
  """A batched objective sum_i w_i Huber(predict(x, *inputs)_i - target_i) and its gradient.

  `predict(x [P], *inputs) -> [n]` is written for one parameter vector; data is
  (*inputs, target [n] or one per lane [S, n], weights [1 or S, n]). Loss laws predict log-loss
  against log targets (the residual of the Chinchilla replication); delta=None is least squares
  (0.5 r^2).
  """

  def single(x, inputs, target, w):
    r = predict(x, *inputs) - target
    if delta is None:
      per_point = 0.5 * r * r
    else:
      ar = jnp.abs(r)
      per_point = jnp.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))
    return jnp.sum(w * per_point)

  value_and_grad = jax.value_and_grad(single)

  def batched(x, data):
    *inputs, target, weights = data
    w = jnp.broadcast_to(weights, (x.shape[0], target.shape[-1]))
    per_lane = 0 if target.ndim == 2 else None  # targets [S, n]: one set per lane
    return jax.vmap(value_and_grad, in_axes=(0, None, per_lane, 0))(x, tuple(inputs), target, w)

  return batched


def safe_power(base, log_scale, exponent):
  """exp(log_scale) * base**exponent, 0 where base is 0, with finite gradients there too."""
  positive = base > 0
  log_base = jnp.log(jnp.where(positive, base, 1.0))
  return jnp.where(positive, jnp.exp(log_scale + exponent * log_base), 0.0)


# The jitted L-BFGS run of each objective, built on first use (compiling at import would slow
# every import).
_COMPILED: dict[Any, Callable[..., Any]] = {}


def _compiled_minimize(objective: Objective) -> Callable[..., Any]:
  if objective not in _COMPILED:
    def run(x0, data, gtol, ftol, max_iter):
      return lbfgs.minimize(objective, x0, data, gtol=gtol, ftol=ftol, max_iter=max_iter)
    _COMPILED[objective] = jax.jit(run, static_argnames=("max_iter",))
  return _COMPILED[objective]


def run_lbfgs(objective: Objective, x0: np.ndarray, data_np, *, x64: bool, max_iter: int,
              gtol: float, ftol: float) -> Any:
  """All starts x0 [S, P] at once: an lbfgs.LbfgsResult of numpy arrays (floats as float64)."""
  with jax.enable_x64(x64):
    dtype = jnp.float64 if x64 else jnp.float32
    data = tuple(jnp.asarray(v, dtype) for v in data_np)
    out = _compiled_minimize(objective)(jnp.asarray(x0, dtype), data, gtol, ftol,
                                        max_iter=max_iter)
    return jax.tree.map(lambda v: np.asarray(v).astype(np.float64) if v.dtype.kind == "f"
                        else np.asarray(v), out)


@dataclasses.dataclass(frozen=True)
class MultiStart:
  x: np.ndarray  # the fit, in the objective's coordinates
  value: float  # objective at x
  converged: bool
  n_starts: int
  n_converged_starts: int  # starts that converged in the float32 sweep
  polished_starts: tuple[tuple[float, ...], ...]  # the first grid points whose runs were polished


def multistart(objective: Objective, grid: np.ndarray, data, *, what: str, diverged_hint: str,
               polish: int = 32, max_iter: int = 200, polish_iter: int = 2000) -> MultiStart:
  """Best converged fit: every start runs `max_iter` float32 iterations; the `polish` lowest are
  then run to convergence in float64 and the lowest converged one is the fit."""
  x0 = np.asarray(grid, np.float64)
  sweep = run_lbfgs(objective, x0, data, x64=False, max_iter=max_iter, **SWEEP_TOL)
  order = np.argsort(np.where(np.isfinite(sweep.value), sweep.value, np.inf))[:polish]
  order = order[np.isfinite(sweep.value[order])]
  if order.size == 0:
    raise ScalingFitError(f"{what}: every start diverged; {diverged_hint}")
  fine = run_lbfgs(objective, sweep.x[order], data, x64=True, max_iter=polish_iter,
                   **POLISH_TOL)
  value = np.where(fine.converged, fine.value, np.inf)
  converged = bool(np.isfinite(value).any())
  if not converged:
    value = np.where(np.isfinite(fine.value), fine.value, np.inf)
    warnings.warn(f"{what}: no start converged to tolerance; reporting the best finite one.",
                  stacklevel=3)
  best = int(np.argmin(value))
  return MultiStart(x=np.asarray(fine.x[best], np.float64), value=float(fine.value[best]),
                    converged=converged, n_starts=int(x0.shape[0]),
                    n_converged_starts=int(sweep.converged.sum()),
                    polished_starts=tuple(tuple(float(v) for v in x0[i]) for i in order[:4]))


def bootstrap(objective: Objective, starts: np.ndarray, data_for: Callable[[np.ndarray], Any],
              n_points: int, *, samples: int, seed: int, max_iter: int = 1000) -> np.ndarray:
  """Refits on points resampled with replacement: rows of the result are the refits' parameters
  (resamples whose every start diverged are dropped).

  Each refit starts from `starts` (the full-data optimum and the grid points that led there: the
  fitted basin is what the bootstrap measures the spread of). `data_for(weights [S, n])` gives
  the objective's data with those per-lane point multiplicities.
  """
  if samples < 2:
    raise ScalingFitError(f"bootstrap needs at least 2 samples, got {samples}.")
  rng = np.random.default_rng(seed)
  counts = rng.multinomial(n_points, np.full(n_points, 1.0 / n_points),
                           size=samples).astype(np.float64)
  starts = np.asarray(starts, np.float64)
  n_starts, p = starts.shape
  x0 = np.tile(starts, (samples, 1))
  weights = np.repeat(counts, n_starts, axis=0)
  out = run_lbfgs(objective, x0, data_for(weights), x64=True, max_iter=max_iter, **POLISH_TOL)
  value = np.where(out.converged, out.value, np.inf).reshape(samples, n_starts)
  value = np.where(np.isfinite(value).any(1, keepdims=True), value,
                   np.where(np.isfinite(out.value), out.value, np.inf).reshape(samples, n_starts))
  best = np.argmin(value, axis=1)
  raw = np.asarray(out.x).reshape(samples, n_starts, p)[np.arange(samples), best]
  return raw[np.isfinite(value[np.arange(samples), best])]


def interval(values, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
  """(low, high) quantiles of a bootstrap distribution along its first axis."""
  lo = (1.0 - level) / 2.0
  q = np.quantile(np.asarray(values, np.float64), [lo, 1.0 - lo], axis=0)
  return q[0], q[1]


def check_columns(what: str, minimum: int, positive: Sequence[str] = (),
                  **columns) -> dict[str, np.ndarray]:
  """Flat float64 columns of one length, finite, the `positive` ones > 0, at least `minimum`
  rows; else one ScalingFitError naming the problem and the fix."""
  cols = {k: np.asarray(v, np.float64).reshape(-1) for k, v in columns.items()}
  sizes = {k: v.size for k, v in cols.items()}
  if len(set(sizes.values())) > 1:
    raise ScalingFitError(f"{what}: columns have different lengths ({sizes}); pass one value of "
                          "each per run.")
  for name, v in cols.items():
    bad = np.flatnonzero(~np.isfinite(v) | ((v <= 0) if name in positive else False))
    if bad.size:
      kind = "non-finite or non-positive" if name in positive else "non-finite"
      raise ScalingFitError(
          f"{what}: {name} has {bad.size} {kind} value(s) (rows {bad[:10].tolist()}); "
          "drop failed runs or mark them with status != 'ok'.")
  n = next(iter(sizes.values())) if sizes else 0
  if n < minimum:
    raise ScalingFitError(f"{what} needs at least {minimum} runs, got {n}; add more runs.")
  return cols


@dataclasses.dataclass(frozen=True)
class Holdout:
  """A law fitted without some runs, scored on them."""

  observed: np.ndarray
  predicted: np.ndarray
  rows: np.ndarray  # indices of the held-out runs in the table

  def as_dict(self) -> dict:
    err = self.predicted - self.observed
    return {"n_heldout": int(self.rows.size),
            "max_abs_error": float(np.max(np.abs(err))),
            "mean_abs_error": float(np.mean(np.abs(err))),
            "max_rel_error": float(np.max(np.abs(err) / np.abs(self.observed))),
            "points": [{"row": int(i), "observed": float(o), "predicted": float(p)}
                       for i, o, p in zip(self.rows, self.observed, self.predicted)]}


def holdout_rows(mask, what: str, minimum_fit: int) -> tuple[np.ndarray, np.ndarray]:
  """(fit rows, held-out rows) of a boolean held-out mask, refusing an empty side."""
  mask = np.asarray(mask, bool)
  held, kept = np.flatnonzero(mask), np.flatnonzero(~mask)
  if held.size == 0:
    raise ScalingFitError(f"{what}: the holdout selects no run; choose a threshold below the "
                          "largest value in the table.")
  if kept.size < minimum_fit:
    raise ScalingFitError(f"{what}: the holdout leaves {kept.size} run(s) to fit, fewer than "
                          f"the {minimum_fit} the fit needs; choose a higher threshold.")
  return kept, held


def as_tuple(x) -> tuple[float, ...]:
  return tuple(float(v) for v in x)
