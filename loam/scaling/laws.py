"""Chinchilla scaling-law fits (Hoffmann et al. 2022, approaches 1-3) over a results table.

Approach 3 follows the protocol of the Chinchilla replication (Besiroglu et al. 2024):
log L = LSE(a - alpha log N, b - beta log D, e), Huber(delta=1e-3) on log-loss residuals, L-BFGS
from a 4500-point grid, best converged result. All starts run at once in one compiled program:
first in float32 (cheap on CPU, enough to find the basin), then the best few are polished to
convergence in float64 (enough to pin the constants).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from loam.scaling import parametric
from loam.scaling.parametric import HUBER_DELTA, ScalingFitError

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


# ----------------------------------------------------------------------------------------------
# The law and its predictions


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
  """L(N, D) = E + A / N**alpha + B / D**beta."""

  E: float
  A: float
  B: float
  alpha: float
  beta: float

  def loss(self, N, D) -> np.ndarray:
    N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
    return self.E + self.A / N**self.alpha + self.B / D**self.beta

  def compute_optimal(self, C) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising L subject to 6 N D = C."""
    C = np.asarray(C, np.float64)
    s = self.alpha + self.beta
    G = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
    return G * (C / 6.0) ** (self.beta / s), (C / 6.0) ** (self.alpha / s) / G

  def as_dict(self) -> dict[str, float]:
    return {k: float(getattr(self, k)) for k in PARAM_NAMES}

  @classmethod
  def from_raw(cls, raw: Sequence[float]) -> ChinchillaLaw:
    """From the optimiser's coordinates (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = (float(v) for v in raw)
    return cls(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def initial_grid() -> np.ndarray:
  """The replication's 5*5*5*6*6 = 4500 starts, as rows (a, b, e, alpha, beta)."""
  ab = np.arange(0.0, 26.0, 5.0)
  e = np.arange(-1.0, 1.01, 0.5)
  exps = np.arange(0.0, 2.01, 0.5)
  return np.array(list(itertools.product(ab, ab, e, exps, exps)), np.float64)


# ----------------------------------------------------------------------------------------------
# Approach 3: parametric fit


def _huber_value_and_grad(x, data):
  """Batched objective: sum_i w_i Huber(log L_pred - log L_i) and its gradient, per lane.

  Written out by hand (one exp per term, one log per point) because this is the whole cost of the
  fit; autodiff through logsumexp is several times slower on CPU.
  """
  log_n, log_d, log_l, weights = data
  a, b, e, alpha, beta = (x[:, i : i + 1] for i in range(5))
  cap = float(np.log(np.finfo(x.dtype).max)) - 8.0
  term_n = jnp.exp(jnp.clip(a - alpha * log_n, -cap, cap))
  term_d = jnp.exp(jnp.clip(b - beta * log_d, -cap, cap))
  term_e = jnp.exp(jnp.clip(e, -cap, cap))
  total = term_n + term_d + term_e
  r = jnp.log(total) - log_l
  ar = jnp.abs(r)
  huber = jnp.where(ar <= HUBER_DELTA, 0.5 * r * r, HUBER_DELTA * (ar - 0.5 * HUBER_DELTA))
  psi = weights * jnp.clip(r, -HUBER_DELTA, HUBER_DELTA) / total
  w_n, w_d = psi * term_n, psi * term_d
  grad = jnp.stack([w_n.sum(1), w_d.sum(1), psi.sum(1) * term_e[:, 0],
                    -(w_n * log_n).sum(1), -(w_d * log_d).sum(1)], axis=1)
  return (weights * huber).sum(1), grad


@dataclasses.dataclass(frozen=True)
class Approach3Fit:
  law: ChinchillaLaw
  objective: float  # summed Huber loss at the optimum
  converged: bool
  n_points: int
  n_starts: int
  n_converged_starts: int  # starts that converged in the float32 sweep
  seconds: float
  raw: tuple[float, ...]  # (a, b, e, alpha, beta)
  polished_starts: tuple[tuple[float, ...], ...]  # grid points whose runs were polished

  def as_dict(self) -> dict:
    return {**self.law.as_dict(), "objective": self.objective, "converged": self.converged,
            "n_points": self.n_points, "n_starts": self.n_starts,
            "n_converged_starts": self.n_converged_starts, "fit_seconds": self.seconds}


def _check_points(N, D, L, minimum: int, what: str):
  N, D, L = (np.asarray(v, np.float64).reshape(-1) for v in (N, D, L))
  if not (N.shape == D.shape == L.shape):
    raise ScalingFitError(f"N, D and loss have different lengths ({N.size}, {D.size}, {L.size}); "
                          "pass one value of each per run.")
  for name, v in (("N", N), ("D", D), ("loss", L)):
    bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
    if bad.size:
      raise ScalingFitError(
          f"{name} has {bad.size} non-finite or non-positive value(s) (rows {bad[:10].tolist()}); "
          "drop failed runs or mark them with status != 'ok'.")
  if N.size < minimum:
    raise ScalingFitError(f"{what} needs at least {minimum} runs, got {N.size}; add more runs "
                          "of different sizes and token counts.")
  return N, D, L


def fit_chinchilla(N, D, loss, *, grid: np.ndarray | None = None, polish: int = 32,
                   max_iter: int = 200, polish_iter: int = 2000) -> Approach3Fit:
  """Approach 3: best converged Huber/L-BFGS fit of L = E + A/N^alpha + B/D^beta.

  Every start runs `max_iter` float32 L-BFGS iterations; the `polish` lowest are then run to
  convergence in float64 and the lowest converged one is the fit.
  """
  N, D, L = _check_points(N, D, loss, 5, "approach 3 (five parameters)")
  start = time.perf_counter()
  x0 = initial_grid() if grid is None else np.asarray(grid, np.float64).reshape(-1, 5)
  data = (np.log(N), np.log(D), np.log(L), np.ones((1, N.size)))
  best = parametric.multistart(
      _huber_value_and_grad, x0, data, what="approach 3", polish=polish, max_iter=max_iter,
      polish_iter=polish_iter,
      diverged_hint="check that losses are in nats and N, D are raw counts (not logs).")
  return Approach3Fit(
      law=ChinchillaLaw.from_raw(parametric.as_tuple(best.x)), objective=best.value,
      converged=best.converged, n_points=int(N.size), n_starts=best.n_starts,
      n_converged_starts=best.n_converged_starts,
      seconds=time.perf_counter() - start, raw=parametric.as_tuple(best.x),
      polished_starts=best.polished_starts)


@dataclasses.dataclass(frozen=True)
class Bootstrap:
  """Refits on runs resampled with replacement; rows of `raw` are (a, b, e, alpha, beta)."""

  raw: np.ndarray  # [K, 5]

  @property
  def params(self) -> dict[str, np.ndarray]:
    a, b, e, alpha, beta = self.raw.T
    return {"E": np.exp(e), "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}

  def laws(self) -> list[ChinchillaLaw]:
    return [ChinchillaLaw.from_raw(r) for r in self.raw]

  def interval(self, values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    return parametric.interval(values, level)  # type: ignore[return-value]

  def param_intervals(self, level: float = 0.95) -> dict[str, list[float]]:
    return {k: [float(x) for x in self.interval(v, level)] for k, v in self.params.items()}

  def predict_loss(self, N, D, level: float = 0.95):
    """(low, high) of the bootstrap distribution of L(N, D)."""
    values = np.stack([law.loss(N, D) for law in self.laws()])
    return self.interval(values, level)

  def compute_optimal(self, C, level: float = 0.95):
    """((N_low, N_high), (D_low, D_high)) for budget(s) C."""
    n_opt, d_opt = zip(*(law.compute_optimal(C) for law in self.laws()))
    return self.interval(np.stack(n_opt), level), self.interval(np.stack(d_opt), level)


def bootstrap_chinchilla(N, D, loss, fit: Approach3Fit, *, samples: int = 100, seed: int = 0,
                         max_iter: int = 1000) -> Bootstrap:
  """Resamples runs with replacement and refits, all resamples in one batched L-BFGS.

  A resample is a vector of multiplicities over the runs, so every refit shares one data array.
  Each refit starts from the full-data optimum and from the grid points that led there (the
  fitted basin is what the bootstrap measures the spread of).
  """
  N, D, L = _check_points(N, D, loss, 5, "approach 3 bootstrap")
  starts = np.array([fit.raw, *fit.polished_starts[:3]], np.float64)
  raw = parametric.bootstrap(
      _huber_value_and_grad, starts, lambda w: (np.log(N), np.log(D), np.log(L), w), N.size,
      samples=samples, seed=seed, max_iter=max_iter)
  return Bootstrap(raw=raw)


# ----------------------------------------------------------------------------------------------
# Approaches 1 and 2: compute-optimal allocation from the data directly


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """y = k * x**exponent, fitted by least squares in log-log space."""

  k: float
  exponent: float

  def __call__(self, x) -> np.ndarray:
    return self.k * np.asarray(x, np.float64) ** self.exponent

  @classmethod
  def fit(cls, x, y) -> PowerLaw:
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    slope, intercept = np.polyfit(lx, ly, 1)
    return cls(k=float(np.exp(intercept)), exponent=float(slope))

  def as_dict(self) -> dict[str, float]:
    return {"k": self.k, "exponent": self.exponent}


@dataclasses.dataclass(frozen=True)
class AllocationFit:
  """N_opt(C) and D_opt(C) power laws plus the points they were fitted to."""

  approach: int
  n_opt: PowerLaw
  d_opt: PowerLaw
  C: np.ndarray  # budgets of the fitted points
  N: np.ndarray  # optimal N at each budget
  D: np.ndarray
  details: tuple = ()  # approach 2: per budget (C, parabola coefficients, row indices)

  def as_dict(self) -> dict:
    return {"N_opt": self.n_opt.as_dict(), "D_opt": self.d_opt.as_dict(),
            "points": [{"C": float(c), "N": float(n), "D": float(d)}
                       for c, n, d in zip(self.C, self.N, self.D)]}


def fit_envelope(N, D, loss, *, bin_dex: float = 0.1) -> AllocationFit:
  """Approach 1: runs on the lower envelope of loss vs FLOPs C = 6ND give N_opt(C), D_opt(C).

  FLOPs are binned (bin_dex decades wide) so that runs meant for one budget count once; rows may
  be intermediate checkpoints of runs as well as final results.
  """
  N, D, L = _check_points(N, D, loss, 2, "approach 1")
  log_c = np.log10(6.0 * N * D)
  bins = np.floor((log_c - log_c.min()) / bin_dex).astype(int)
  best_so_far = np.inf
  envelope: list[int] = []
  for b in np.unique(bins):
    rows = np.flatnonzero(bins == b)
    i = int(rows[np.argmin(L[rows])])
    if L[i] < best_so_far:
      best_so_far = L[i]
      envelope.append(i)
  chosen = np.array(envelope)
  if chosen.size < 2:
    raise ScalingFitError(
        f"approach 1 found {chosen.size} point(s) on the loss-vs-FLOPs envelope; it needs runs at "
        f"two or more compute budgets at least {bin_dex} decades apart.")
  C = 6.0 * N[chosen] * D[chosen]
  return AllocationFit(1, PowerLaw.fit(C, N[chosen]), PowerLaw.fit(C, D[chosen]),
                       C, N[chosen], D[chosen])


def group_budgets(C, gap_dex: float = 0.1) -> list[np.ndarray]:
  """Row indices per IsoFLOP budget: sorted log10 C split wherever it jumps by more than gap_dex."""
  log_c = np.log10(np.asarray(C, np.float64))
  order = np.argsort(log_c)
  splits = np.flatnonzero(np.diff(log_c[order]) > gap_dex) + 1
  return [np.sort(g) for g in np.split(order, splits)]


def fit_isoflop(N, D, loss, *, gap_dex: float = 0.1, min_sizes: int = 3) -> AllocationFit:
  """Approach 2: per IsoFLOP budget a parabola of loss in log N; its vertex is N_opt(C)."""
  N, D, L = _check_points(N, D, loss, 2 * min_sizes, "approach 2")
  C = 6.0 * N * D
  budget_list: list[float] = []
  n_opt_list: list[float] = []
  details, skipped = [], 0
  for rows in group_budgets(C, gap_dex):
    x = np.log(N[rows])
    if np.unique(np.round(x, 6)).size < min_sizes:
      skipped += 1
      continue
    c2, c1, c0 = np.polyfit(x, L[rows], 2)
    if not c2 > 0:
      skipped += 1
      continue
    budget = float(np.exp(np.mean(np.log(C[rows]))))
    budget_list.append(budget)
    n_opt_list.append(float(np.exp(-c1 / (2.0 * c2))))
    details.append((budget, (float(c2), float(c1), float(c0)), rows))
  if skipped:
    warnings.warn(f"approach 2: skipped {skipped} FLOP budget(s) with fewer than {min_sizes} "
                  "model sizes or a loss curve that does not bend upwards.",
                  stacklevel=2)
  if len(budget_list) < 2:
    raise ScalingFitError(
        f"approach 2 needs IsoFLOP data: at least 2 FLOP budgets (more than {gap_dex} decades "
        f"apart) with {min_sizes}+ model sizes each around the minimum; found {len(budget_list)}.")
  budgets, n_opt = np.array(budget_list), np.array(n_opt_list)
  d_opt = budgets / (6.0 * n_opt)
  return AllocationFit(2, PowerLaw.fit(budgets, n_opt), PowerLaw.fit(budgets, d_opt),
                       budgets, n_opt, d_opt, tuple(details))
