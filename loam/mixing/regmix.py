"""RegMix (Liu et al., 2024, "Data Mixture as Regression"): sample mixtures, regress the target
metric of proxies trained on them, and propose the mixture the regressor likes best.

The pieces are plain numpy on small arrays (M proxies x D domains): a Dirichlet sampler centred on
the token shares that respects per-domain epoch caps, two regressors (least squares and LightGBM
gradient-boosted trees, as in the paper), held-out Spearman rank correlation, scoring of many
candidate mixtures with the top-k average as the proposal. loam.mixing.search writes proposals
as resolved JSON configs that `python -m loam.train --config <file>` runs directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats


class MixSearchError(ValueError):
    """A mixture search that cannot proceed; the message names the problem and the fix."""


# --------------------------------------------------------------------------- epoch caps, sampling


def max_weights(sizes: ArrayLike, budget_tokens: float, max_epochs: float) -> np.ndarray:
    """Largest weight each domain may get so that a run of ``budget_tokens`` repeats it at most
    ``max_epochs`` times (capped at 1)."""
    tokens = np.asarray(sizes, np.float64)
    if budget_tokens <= 0 or max_epochs <= 0:
        raise MixSearchError(f"epoch caps need a positive budget and max_epochs, got "
                             f"{budget_tokens}, {max_epochs}")
    upper = np.minimum(1.0, tokens * max_epochs / budget_tokens)
    if upper.sum() < 1.0 - 1e-9:
        raise MixSearchError(
            f"a budget of {budget_tokens:,.0f} tokens cannot respect {max_epochs} epochs per "
            f"domain: all domains together hold {tokens.sum():,.0f} tokens, so at most "
            f"{tokens.sum() * max_epochs:,.0f} tokens fit. Raise max_epochs or lower the budget")
    return upper


def check_epoch_caps(weights: ArrayLike, sizes: ArrayLike, budget_tokens: float, max_epochs: float,
                     domains: Sequence[str]) -> None:
    """Raise MixSearchError naming every mixture (row) and domain that exceeds its epoch cap."""
    w = np.atleast_2d(np.asarray(weights, np.float64))
    upper = max_weights(sizes, budget_tokens, max_epochs)
    bad = np.argwhere(w > upper + 1e-9)
    if bad.size:
        first = ", ".join(f"mixture {r} gives {domains[c]} {w[r, c]:.3f} "
                          f"(> {upper[c]:.3f} = {max_epochs} epochs)" for r, c in bad[:5])
        raise MixSearchError(
            f"{len(bad)} weight(s) exceed the epoch caps: {first}. Lower those weights, raise "
            "max_epochs, or lower the token budget")


def sample_mixtures(num: int, shares: ArrayLike, concentration: ArrayLike, seed: int,
                    upper: ArrayLike | None = None, max_draw_factor: int = 2000) -> np.ndarray:
    """``num`` mixtures [num, D] from Dirichlet(concentration * shares), redrawn until every weight
    is within ``upper``. A list of concentrations is cycled over the samples (RegMix varies it to
    cover both near-centre and extreme mixtures)."""
    raw = np.asarray(shares, np.float64)
    if num < 1:
        raise MixSearchError(f"need at least one mixture, got num={num}")
    if raw.ndim != 1 or raw.size < 2 or np.any(raw <= 0) or not np.isfinite(raw).all():
        raise MixSearchError(f"token shares must be positive per domain (>= 2 domains), got "
                             f"{raw.tolist()}")
    share = raw / raw.sum()
    conc = np.atleast_1d(np.asarray(concentration, np.float64))
    if np.any(conc <= 0) or not np.isfinite(conc).all():
        raise MixSearchError(f"Dirichlet concentration must be positive, got {conc.tolist()}")
    cap = np.ones_like(share) if upper is None else np.asarray(upper, np.float64)
    if cap.sum() < 1.0 - 1e-9:
        raise MixSearchError("the epoch caps leave no valid mixture (caps sum below 1); raise "
                             "max_epochs or lower the budget")
    rng = np.random.default_rng(seed)
    alpha = conc[np.arange(num) % conc.size, None] * share  # [num, D]
    out = np.full((num, share.size), np.nan)
    pending = np.arange(num)
    for _ in range(max_draw_factor):  # every round redraws the samples still outside the caps
        # Dirichlet by normalised gammas (vectorised over samples with different alphas).
        g = rng.standard_gamma(alpha[pending])
        w = g / g.sum(axis=1, keepdims=True)
        ok = np.all(w <= cap + 1e-12, axis=1) & np.isfinite(w).all(axis=1)
        out[pending[ok]] = w[ok]
        pending = pending[~ok]
        if pending.size == 0:
            return out
    raise MixSearchError(
        f"{max_draw_factor} Dirichlet draws (concentration {conc[pending[0] % conc.size]}) "
        f"never met the epoch caps {np.round(cap, 3).tolist()} for {pending.size} of {num} "
        "mixtures; raise the concentration, raise max_epochs or lower the token budget")


# --------------------------------------------------------------------------- regressors


class LinearRegressor:
    """Least squares on the weights (with intercept); minimum-norm on the simplex's collinearity."""
    name = "linear"

    def fit(self, X, y):
        A = np.c_[np.ones(len(X)), np.asarray(X, np.float64)]
        self.coef_, *_ = np.linalg.lstsq(A, np.asarray(y, np.float64), rcond=None)
        return self

    def predict(self, X):
        X = np.asarray(X, np.float64)
        return self.coef_[0] + X @ self.coef_[1:]


class GBDTRegressor:
    """LightGBM gradient-boosted trees (the paper's regressor), single-threaded and seeded so the
    fit is reproducible."""
    name = "lightgbm"

    def __init__(self, num_rounds: int = 300, learning_rate: float = 0.05, num_leaves: int = 8,
                 min_data_in_leaf: int = 3, seed: int = 0):
        self.params = dict(objective="regression", learning_rate=learning_rate,
                           num_leaves=num_leaves, min_data_in_leaf=min_data_in_leaf,
                           min_data_in_bin=1, feature_fraction=1.0, bagging_fraction=1.0,
                           lambda_l2=1e-3, seed=seed, deterministic=True, num_threads=1,
                           verbose=-1)
        self.num_rounds = num_rounds

    def fit(self, X, y):
        import lightgbm as lgb

        data = lgb.Dataset(np.asarray(X, np.float64), np.asarray(y, np.float64),
                           params={"min_data_in_bin": 1, "verbose": -1})
        self.booster_ = lgb.train(self.params, data, num_boost_round=self.num_rounds)
        return self

    def predict(self, X):
        return self.booster_.predict(np.asarray(X, np.float64), num_threads=1)


REGRESSORS: dict[str, Callable[[], object]] = {"linear": LinearRegressor,
                                               "lightgbm": GBDTRegressor}


def make_regressor(name: str, **kwargs):
    if name not in REGRESSORS:
        raise MixSearchError(f"unknown regressor {name!r}; choose from {', '.join(REGRESSORS)}")
    return REGRESSORS[name](**kwargs)


def spearman(a, b) -> float:
    return float(stats.spearmanr(np.asarray(a), np.asarray(b)).statistic)


def min_proxies(num_domains: int) -> int:
    """Fewest usable proxies a fit accepts: enough for a linear fit plus a held-out set."""
    return num_domains + 1 + 4


def split_heldout(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < holdout_fraction < 1.0:
        raise MixSearchError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = max(3, int(round(n * holdout_fraction)))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def check_enough(n: int, num_domains: int, what: str = "proxies") -> None:
    need = min_proxies(num_domains)
    if n < need:
        raise MixSearchError(
            f"only {n} usable {what} for {num_domains} domains; fitting needs at least {need} "
            "(a fit plus a held-out check). Train more proxies (search.num_proxies)")


def finite_rows(X: ArrayLike, y: ArrayLike,
                labels: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Mask of proxies with a finite target, and a warning line per excluded one."""
    target = np.asarray(y, np.float64)
    ok = np.isfinite(target) & np.isfinite(np.asarray(X, np.float64)).all(axis=1)
    notes = []
    for i in np.flatnonzero(~ok).tolist():
        label = labels[i] if labels is not None else f"proxy {i}"
        notes.append(f"{label}: non-finite target ({target[i]}), excluded from the fits")
    if notes:
        warnings.warn(f"{len(notes)} proxies excluded for non-finite losses: "
                      + "; ".join(notes[:5]), stacklevel=2)
    return ok, notes


def fit_regressor(name: str, X, y, holdout_fraction: float = 0.2, seed: int = 0,
                  **kwargs) -> dict:
    """Held-out check, then a refit on all proxies. Returns {regressor, spearman, heldout
    (indices), predicted / observed on the held-out proxies}."""
    X, y = np.asarray(X, np.float64), np.asarray(y, np.float64)
    check_enough(len(X), X.shape[1])
    train, test = split_heldout(len(X), holdout_fraction, seed)
    held = make_regressor(name, **kwargs).fit(X[train], y[train])
    pred = held.predict(X[test])
    rho = spearman(pred, y[test])
    full = make_regressor(name, **kwargs).fit(X, y)
    return {"name": name, "regressor": full, "spearman": rho,
            "heldout": test.tolist(), "heldout_predicted": pred.tolist(),
            "heldout_observed": y[test].tolist(),
            "train_predicted": full.predict(X).tolist()}


def propose(regressor, candidates: np.ndarray, top_k: int = 100) -> tuple[np.ndarray, dict]:
    """Average of the ``top_k`` candidates with the lowest predicted target."""
    candidates = np.asarray(candidates, np.float64)
    if top_k < 1 or top_k > len(candidates):
        raise MixSearchError(f"top_k={top_k} must lie in [1, {len(candidates)}] candidates")
    pred = np.concatenate([regressor.predict(candidates[i:i + 50_000])
                           for i in range(0, len(candidates), 50_000)])
    best = np.argsort(pred, kind="stable")[:top_k]
    w = candidates[best].mean(axis=0)
    return w / w.sum(), {"candidates": int(len(candidates)), "top_k": int(top_k),
                         "predicted_best": float(pred[best[0]]),
                         "predicted_top_k_mean": float(pred[best].mean())}


# --------------------------------------------------------------------------- targets


def target_values(eval_losses: Sequence[Mapping[str, float]], target: str,
                  mixture_domains: Sequence[str]) -> np.ndarray:
    """The target metric of each proxy from its per-domain validation losses: "mean" (mean over
    the mixture's domains) or a domain name (one domain's loss; a domain outside the mixture is
    a held-out target set)."""
    names = target_domains(target, mixture_domains)
    out = []
    for losses in eval_losses:
        missing = [d for d in names if d not in losses]
        if missing:
            raise MixSearchError(f"proxy results have no eval loss for {missing}; evaluate on "
                                 f"every target domain (evaluated: {', '.join(losses)})")
        out.append(float(np.mean([losses[d] for d in names])))
    return np.asarray(out)


def target_domains(target: str, mixture_domains: Sequence[str],
                   known: Sequence[str] | None = None) -> list[str]:
    """The domains a target averages: the mixture's for "mean", else the one named (among
    ``known``, the run's sources; default: the mixture's domains)."""
    if target == "mean":
        return list(mixture_domains)
    name = target.removeprefix("domain:")
    known = list(known if known is not None else mixture_domains)
    if name not in known:
        raise MixSearchError(f"unknown target {target!r}; use 'mean' or a domain name "
                             f"({', '.join(known)})")
    return [name]
