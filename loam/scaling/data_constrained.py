"""Data-constrained scaling (Muennighoff et al. 2023): the Chinchilla law with repeated data.

A run trains N parameters on D tokens drawn from U_D unique ones. Repeated tokens are worth less
than fresh ones, and parameters beyond what the unique data can use are worth less than useful
ones; both decay with the same exponential form:

    D' = U_D + U_D R*_D (1 - exp(-R_D / R*_D)),   R_D = D / U_D - 1   (repetitions after epoch 1)
    N' = U_N + U_N R*_N (1 - exp(-R_N / R*_N)),   R_N = N / U_N - 1
    L(N, D, U_D) = E + A / N'^alpha + B / D'^beta

U_N is the parameter count that is compute-optimal for U_D tokens, min(N, U_D / tokens_per_param)
(Chinchilla's ~20 tokens per parameter by default). R*_D is the number of repetitions after which
repeated data is worth 1 - 1/e of its value as fresh data; the paper's fit gives R*_D ~ 15.4 and
R*_N ~ 5.3. Repetition is the everyday situation of a small corpus such as the bundled one.

The fit uses loam's shared machinery (parametric.py): Huber(1e-3) on log-loss residuals, batched
L-BFGS from many starts (the Chinchilla fit of the same runs times a grid of R*), bootstrap
intervals, held-out prediction.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from loam.scaling import laws, parametric
from loam.scaling.parametric import ScalingFitError

PARAM_NAMES = ("E", "A", "B", "alpha", "beta", "R_N_star", "R_D_star")
TOKENS_PER_PARAM = 20.0
# log R* of the starting grid: R* from 1 to ~150 repetitions.
_LOG_R_STAR_GRID = np.log([1.0, 3.0, 10.0, 30.0, 150.0])


def repetitions(total, unique) -> np.ndarray:
  """Repetitions after the first pass, R = total / unique - 1 (0 for a single pass or less)."""
  return np.maximum(np.asarray(total, np.float64) / np.asarray(unique, np.float64) - 1.0, 0.0)


def effective(unique, reps, r_star) -> np.ndarray:
  """U + U R* (1 - exp(-R / R*)): what `reps` repetitions of `unique` are worth as fresh ones."""
  unique, reps = np.asarray(unique, np.float64), np.asarray(reps, np.float64)
  return unique + unique * r_star * -np.expm1(-reps / r_star)


@dataclasses.dataclass(frozen=True)
class Runs:
  """The columns the law reads, derived once from (N, D, U) and validated."""

  N: np.ndarray
  D: np.ndarray
  U: np.ndarray  # unique tokens available to the run
  loss: np.ndarray
  tokens_per_param: float

  @property
  def unique_tokens(self) -> np.ndarray:  # U_D: a run shorter than its corpus sees D unique
    return np.minimum(self.U, self.D)

  @property
  def unique_params(self) -> np.ndarray:  # U_N
    return np.minimum(self.N, self.unique_tokens / self.tokens_per_param)

  @property
  def R_D(self) -> np.ndarray:
    return repetitions(self.D, self.unique_tokens)

  @property
  def R_N(self) -> np.ndarray:
    return repetitions(self.N, self.unique_params)

  @property
  def epochs(self) -> np.ndarray:
    return self.D / self.U

  def inputs(self) -> tuple[np.ndarray, ...]:
    return (np.log(self.unique_params), self.R_N, np.log(self.unique_tokens), self.R_D)

  def take(self, rows) -> Runs:
    return Runs(self.N[rows], self.D[rows], self.U[rows], self.loss[rows], self.tokens_per_param)


def check_runs(N, D, U, loss, *, tokens_per_param: float = TOKENS_PER_PARAM,
               what: str = "data-constrained fit") -> Runs:
  """Runs that can pin the seven constants, else one ScalingFitError naming the fix."""
  if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
    raise ScalingFitError(f"tokens_per_param={tokens_per_param} must be a positive number "
                          "(Chinchilla's compute-optimal ratio is about 20).")
  cols = parametric.check_columns(what, len(PARAM_NAMES) + 1, ("N", "D", "U", "loss"),
                                  N=N, D=D, U=U, loss=loss)
  runs = Runs(cols["N"], cols["D"], cols["U"], cols["loss"], float(tokens_per_param))
  if not np.any(runs.R_D > 0):
    raise ScalingFitError(
        f"{what} needs runs that repeat their data (D > U: more than one epoch) to estimate "
        "R*_D, and every run here sees each token at most once; add runs on fewer unique "
        "tokens or for more epochs, or fit --law chinchilla.")
  if not np.any(runs.R_N > 0):
    raise ScalingFitError(
        f"{what} needs runs whose model is larger than compute-optimal for its unique data "
        f"(N > U / {tokens_per_param:g}) to estimate R*_N, and there are none; add larger "
        "models on the small corpora.")
  if np.unique(np.round(np.log(runs.R_D[runs.R_D > 0]), 6)).size < 2:
    raise ScalingFitError(
        f"{what} needs at least 2 different repetition counts (epochs > 1) to separate R*_D from "
        "B and beta; add runs with another number of epochs.")
  return runs


@dataclasses.dataclass(frozen=True)
class DataConstrainedLaw:
  """L = E + A / N'^alpha + B / D'^beta with N', D' the effective parameters and data."""

  E: float
  A: float
  B: float
  alpha: float
  beta: float
  R_N_star: float
  R_D_star: float

  def effective_data(self, D, U) -> np.ndarray:
    U_D = np.minimum(np.asarray(U, np.float64), np.asarray(D, np.float64))
    return effective(U_D, repetitions(D, U_D), self.R_D_star)

  def effective_params(self, N, U, D=None, tokens_per_param: float = TOKENS_PER_PARAM):
    U_D = np.asarray(U, np.float64) if D is None else np.minimum(U, D)
    U_N = np.minimum(np.asarray(N, np.float64), U_D / tokens_per_param)
    return effective(U_N, repetitions(N, U_N), self.R_N_star)

  def loss(self, N, D, U, tokens_per_param: float = TOKENS_PER_PARAM) -> np.ndarray:
    n_eff = self.effective_params(N, U, D, tokens_per_param)
    return self.E + self.A / n_eff**self.alpha + self.B / self.effective_data(D, U)**self.beta

  def as_dict(self) -> dict[str, float]:
    return {k: float(getattr(self, k)) for k in PARAM_NAMES}

  @classmethod
  def from_raw(cls, raw) -> DataConstrainedLaw:
    """From the optimiser's coordinates (a, b, e, alpha, beta, log R*_N, log R*_D)."""
    a, b, e, alpha, beta, log_rn, log_rd = (float(v) for v in raw)
    return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta,
               R_N_star=math.exp(log_rn), R_D_star=math.exp(log_rd))


def _log_effective(log_unique, reps, log_r_star):
  r_star = jnp.exp(log_r_star)
  return log_unique + jnp.log1p(-r_star * jnp.expm1(-reps / r_star))


def _log_loss(x, log_un, r_n, log_ud, r_d):
  a, b, e, alpha, beta, log_rn, log_rd = (x[i] for i in range(7))
  log_n = _log_effective(log_un, r_n, log_rn)
  log_d = _log_effective(log_ud, r_d, log_rd)
  terms = jnp.stack([a - alpha * log_n, b - beta * log_d, jnp.broadcast_to(e, log_n.shape)])
  return jax.nn.logsumexp(terms, axis=0)


OBJECTIVE = parametric.huber_objective(_log_loss)


@dataclasses.dataclass(frozen=True)
class DataConstrainedFit:
  law: DataConstrainedLaw
  objective: float
  converged: bool
  n_points: int
  n_starts: int
  n_converged_starts: int
  seconds: float
  raw: tuple[float, ...]
  polished_starts: tuple[tuple[float, ...], ...]
  tokens_per_param: float

  def as_dict(self) -> dict:
    return {**self.law.as_dict(), "objective": self.objective, "converged": self.converged,
            "n_points": self.n_points, "n_starts": self.n_starts,
            "n_converged_starts": self.n_converged_starts, "fit_seconds": self.seconds,
            "tokens_per_param": self.tokens_per_param}


def _data(runs: Runs, weights) -> tuple:
  return (*runs.inputs(), np.log(runs.loss), weights)


def starting_grid(runs: Runs, chinchilla_grid: np.ndarray | None = None) -> np.ndarray:
  """Chinchilla fits of the same runs (E, A, B, alpha, beta) times a grid of R*_N, R*_D.

  The Chinchilla fit uses the runs that neither repeat data nor exceed U_N when there are five
  or more (where the two laws agree), else all runs with their effective counts at R* = 1.
  """
  plain = (runs.R_D == 0) & (runs.R_N == 0)
  if plain.sum() >= 5:
    base = laws.fit_chinchilla(runs.N[plain], runs.D[plain], runs.loss[plain],
                               grid=chinchilla_grid)
  else:
    base = laws.fit_chinchilla(effective(runs.unique_params, runs.R_N, 1.0),
                               effective(runs.unique_tokens, runs.R_D, 1.0), runs.loss,
                               grid=chinchilla_grid)
  heads = [base.raw, *base.polished_starts[:1]]
  return np.array([(*h, rn, rd) for h in heads
                   for rn, rd in itertools.product(_LOG_R_STAR_GRID, _LOG_R_STAR_GRID)])


def fit_data_constrained(N, D, U, loss, *, tokens_per_param: float = TOKENS_PER_PARAM,
                         chinchilla_grid: np.ndarray | None = None,
                         polish: int = 16) -> DataConstrainedFit:
  """Best converged Huber/L-BFGS fit of the seven constants to runs (N, D, U unique, loss)."""
  runs = check_runs(N, D, U, loss, tokens_per_param=tokens_per_param)
  start = time.perf_counter()
  grid = starting_grid(runs, chinchilla_grid)
  best = parametric.multistart(
      OBJECTIVE, grid, _data(runs, np.ones((1, runs.N.size))), what="data-constrained fit",
      polish=polish, max_iter=500,
      diverged_hint="check that losses are in nats and N, D, U are raw counts (not logs).")
  return DataConstrainedFit(
      law=DataConstrainedLaw.from_raw(best.x), objective=best.value, converged=best.converged,
      n_points=int(runs.N.size), n_starts=best.n_starts,
      n_converged_starts=best.n_converged_starts, seconds=time.perf_counter() - start,
      raw=parametric.as_tuple(best.x), polished_starts=best.polished_starts,
      tokens_per_param=runs.tokens_per_param)


@dataclasses.dataclass(frozen=True)
class DataConstrainedBootstrap:
  raw: np.ndarray  # [K, 7] in the optimiser's coordinates

  def laws(self) -> list[DataConstrainedLaw]:
    return [DataConstrainedLaw.from_raw(r) for r in self.raw]

  def param_intervals(self, level: float = 0.95) -> dict[str, list[float]]:
    values = np.array([[getattr(law, k) for k in PARAM_NAMES] for law in self.laws()])
    lo, hi = parametric.interval(values, level)
    return {k: [float(lo[i]), float(hi[i])] for i, k in enumerate(PARAM_NAMES)}

  def predict_loss(self, N, D, U, tokens_per_param: float = TOKENS_PER_PARAM,
                   level: float = 0.95):
    return parametric.interval(
        np.stack([law.loss(N, D, U, tokens_per_param) for law in self.laws()]), level)


def bootstrap_data_constrained(N, D, U, loss, fit: DataConstrainedFit, *, samples: int = 100,
                               seed: int = 0) -> DataConstrainedBootstrap:
  """Refits on runs resampled with replacement, all in one batched L-BFGS."""
  runs = check_runs(N, D, U, loss, tokens_per_param=fit.tokens_per_param)
  starts = np.array([fit.raw, *fit.polished_starts[:2]], np.float64)
  raw = parametric.bootstrap(OBJECTIVE, starts, lambda w: _data(runs, w), runs.N.size,
                             samples=samples, seed=seed)
  return DataConstrainedBootstrap(raw=raw)


def holdout(N, D, U, loss, heldout_mask, *, tokens_per_param: float = TOKENS_PER_PARAM,
            chinchilla_grid: np.ndarray | None = None
            ) -> tuple[DataConstrainedFit, parametric.Holdout]:
  """Fits without the held-out runs (e.g. the most repeated ones) and predicts their loss."""
  runs = check_runs(N, D, U, loss, tokens_per_param=tokens_per_param)
  kept, held = parametric.holdout_rows(heldout_mask, "data-constrained holdout",
                                       len(PARAM_NAMES) + 1)
  fit_runs = runs.take(kept)
  fit = fit_data_constrained(fit_runs.N, fit_runs.D, fit_runs.U, fit_runs.loss,
                             tokens_per_param=tokens_per_param, chinchilla_grid=chinchilla_grid)
  pred = fit.law.loss(runs.N[held], runs.D[held], runs.U[held], tokens_per_param)
  return fit, parametric.Holdout(observed=runs.loss[held], predicted=pred, rows=held)
