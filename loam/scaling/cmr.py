"""The critical mixture ratio of continual pretraining (Gu et al. 2024, "CMR scaling law").

A trained model continues on T tokens of which a share r is new-domain data and 1 - r replays
the general data. Its general loss moves from the start L0 by a power law in the ratio and the
tokens; loam fits one law over all ratios and budgets at once,

    L_gen(r, T) = L0 + A r^a T^b - B ((1 - r) T)^c

(forgetting grows with the domain share and the tokens; the general share keeps teaching). The
paper fits a curve per ratio; a joint law lets a few ratios on short runs predict unseen ratios
and budgets. The **critical mixture ratio** CMR(T) is the largest domain share whose general
loss stays within `tolerance` nats of L0 after T tokens: the best ratio for the domain that
still keeps the general ability (the domain loss falls as r grows). Its data-budget law

    R(T) = beta0 + beta1 T^s

is fitted to CMR at the budgets the runs reached and extrapolated to larger budgets.

Both fits use the shared machinery (parametric.py): Huber loss (log-loss residuals for the loss
law, least squares for R(T)), batched L-BFGS from a grid of starts, bootstrap intervals by
refitting resampled runs, and held-out prediction (fit on short runs, score the long ones).
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
from loam.scaling.parametric import ScalingFitError

PARAM_NAMES = ("A", "a", "b", "B", "c")
BUDGET_PARAM_NAMES = ("beta0", "beta1", "s")
TOLERANCE = 0.05  # nats of general loss; the paper's epsilon
MIN_RATIOS = 3  # distinct domain shares: the ratio exponent needs a curve, not two points
MIN_BUDGETS = 4  # distinct token counts: R(T) has three parameters


# ----------------------------------------------------------------------------------------------
# The loss law and the critical ratio


@dataclasses.dataclass(frozen=True)
class CMRLaw:
  """L(r, T) = L0 + A r^a T^b - B ((1 - r) T)^c, T in tokens."""

  L0: float
  A: float
  a: float
  b: float
  B: float
  c: float

  def delta(self, r, T) -> np.ndarray:
    """Change of the general loss from its start after T tokens at domain share r."""
    r, T = np.asarray(r, np.float64), np.asarray(T, np.float64)
    with np.errstate(divide="ignore"):
      forget = np.where(r > 0, self.A * np.power(np.where(r > 0, r, 1.0), self.a), 0.0)
      general = np.maximum((1.0 - r) * T, 0.0)
      learn = np.where(general > 0, self.B * np.power(np.where(general > 0, general, 1.0),
                                                       self.c), 0.0)
    return forget * T**self.b - learn

  def loss(self, r, T) -> np.ndarray:
    return self.L0 + self.delta(r, T)

  def critical_ratio(self, T, tolerance: float = TOLERANCE) -> np.ndarray:
    """Largest r in [0, 1] with delta(r, T) <= tolerance, per budget T (0 if none is)."""
    T = np.atleast_1d(np.asarray(T, np.float64))
    grid = np.linspace(0.0, 1.0, 2001)
    out = np.empty(T.shape)
    for i, t in enumerate(T):
      ok = self.delta(grid, t) <= tolerance
      if not ok.any():
        out[i] = 0.0
        continue
      j = int(np.flatnonzero(ok)[-1])
      if j == grid.size - 1:
        out[i] = 1.0
        continue
      lo, hi = grid[j], grid[j + 1]  # feasible, infeasible: bisect the crossing
      for _ in range(40):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if self.delta(mid, t) <= tolerance else (lo, mid)
      out[i] = lo
    return out

  def as_dict(self) -> dict[str, float]:
    return {k: float(getattr(self, k)) for k in ("L0", *PARAM_NAMES)}

  @classmethod
  def from_raw(cls, raw, L0: float, t_ref: float) -> CMRLaw:
    """From the optimiser's coordinates (log A', a, b, log B', c), T measured in t_ref units."""
    log_a, a, b, log_b, c = (float(v) for v in raw)
    return cls(L0=L0, A=math.exp(log_a - b * math.log(t_ref)), a=a, b=b,
               B=math.exp(log_b - c * math.log(t_ref)), c=c)


def _log_loss(x, r, t, l0):
  log_a, a, b, log_b, c = (x[i] for i in range(5))
  forget = parametric.safe_power(r, log_a + b * jnp.log(t), a)
  learn = parametric.safe_power((1.0 - r) * t, log_b, c)
  return jnp.log(jnp.maximum(l0 + forget - learn, 1e-6))


OBJECTIVE = parametric.huber_objective(_log_loss)


def initial_grid() -> np.ndarray:
  """3*4*4*3*4 = 576 starts (log A', a, b, log B', c), tokens in units of the smallest budget."""
  return np.array(list(itertools.product(
      [-7.0, -4.0, -1.0], [0.5, 1.0, 2.0, 3.0], [0.0, 0.2, 0.5, 1.0], [-9.0, -6.0, -3.0],
      [0.1, 0.3, 0.6, 1.0])), np.float64)


@dataclasses.dataclass(frozen=True)
class Points:
  """Continual runs (or their checkpoints): domain share, tokens since the start, general loss."""

  ratio: np.ndarray
  tokens: np.ndarray
  loss: np.ndarray
  start_loss: float

  @property
  def t_ref(self) -> float:  # the unit of T inside the optimiser
    return float(self.tokens.min())

  def take(self, rows) -> Points:
    return Points(self.ratio[rows], self.tokens[rows], self.loss[rows], self.start_loss)


def check_points(ratio, tokens, loss, start_loss=None, *, what: str = "CMR fit") -> Points:
  """Validated points; rows at T = 0 (the starting checkpoint) give L0 when start_loss is None."""
  cols = parametric.check_columns(what, 1, ("loss",), ratio=ratio, tokens=tokens, loss=loss)
  r, t, l = cols["ratio"], cols["tokens"], cols["loss"]
  bad = np.flatnonzero((r < 0) | (r > 1))
  if bad.size:
    raise ScalingFitError(f"{what}: ratio must be the domain share of the tokens, in [0, 1]; "
                          f"rows {bad[:10].tolist()} are outside (e.g. {r[bad[0]]}). Give "
                          "ratios as fractions, not percentages.")
  bad = np.flatnonzero(t < 0)
  if bad.size:
    raise ScalingFitError(f"{what}: tokens must be >= 0 (tokens trained since the start); rows "
                          f"{bad[:10].tolist()} are negative.")
  start_rows = t == 0
  if start_loss is None:
    if not start_rows.any():
      raise ScalingFitError(
          f"{what} needs the general loss at the start: pass start_loss (--start-loss), or add "
          "a row with tokens = 0 (the starting checkpoint evaluated).")
    start_loss = float(np.mean(l[start_rows]))
  if not (math.isfinite(float(start_loss)) and float(start_loss) > 0):
    raise ScalingFitError(f"{what}: start loss {start_loss} must be a positive number of nats.")
  r, t, l = r[~start_rows], t[~start_rows], l[~start_rows]
  need = len(PARAM_NAMES) + 1
  if r.size < need:
    raise ScalingFitError(f"{what} needs at least {need} runs or checkpoints after the start "
                          f"(the loss law has {len(PARAM_NAMES)} constants), got {r.size}; add "
                          "runs at more ratios and token counts.")
  ratios = np.unique(np.round(r, 9))
  if ratios.size < MIN_RATIOS:
    raise ScalingFitError(
        f"{what} needs runs at {MIN_RATIOS} or more different mixture ratios to fit the ratio "
        f"exponent, got {ratios.size} ({', '.join(f'{v:g}' for v in ratios)}); add runs at "
        "other domain shares.")
  if np.unique(t).size < 2:
    raise ScalingFitError(f"{what} needs losses at 2 or more token counts to fit the token "
                          "exponents; log checkpoints along the runs or add runs of other lengths.")
  return Points(r, t, l, float(start_loss))


def _data(points: Points, weights) -> tuple:
  return (points.ratio, points.tokens / points.t_ref,
          np.full(points.ratio.shape, points.start_loss), np.log(points.loss), weights)


@dataclasses.dataclass(frozen=True)
class CMRFit:
  law: CMRLaw
  objective: float
  converged: bool
  n_points: int
  n_starts: int
  n_converged_starts: int
  seconds: float
  raw: tuple[float, ...]
  polished_starts: tuple[tuple[float, ...], ...]
  t_ref: float

  def as_dict(self) -> dict:
    return {**self.law.as_dict(), "objective": self.objective, "converged": self.converged,
            "n_points": self.n_points, "n_starts": self.n_starts,
            "n_converged_starts": self.n_converged_starts, "fit_seconds": self.seconds}


def fit_cmr(ratio, tokens, loss, *, start_loss: float | None = None,
            grid: np.ndarray | None = None) -> CMRFit:
  """Best converged Huber/L-BFGS fit of the general-loss law to continual runs."""
  points = check_points(ratio, tokens, loss, start_loss)
  start = time.perf_counter()
  best = parametric.multistart(
      OBJECTIVE, initial_grid() if grid is None else grid, _data(points, np.ones((1, 1))),
      what="CMR fit", max_iter=300,
      diverged_hint="check that losses are in nats, ratios in [0, 1] and tokens raw counts.")
  return CMRFit(
      law=CMRLaw.from_raw(best.x, points.start_loss, points.t_ref), objective=best.value,
      converged=best.converged, n_points=int(points.ratio.size), n_starts=best.n_starts,
      n_converged_starts=best.n_converged_starts, seconds=time.perf_counter() - start,
      raw=parametric.as_tuple(best.x), polished_starts=best.polished_starts, t_ref=points.t_ref)


# ----------------------------------------------------------------------------------------------
# The data-budget law of the critical ratio


@dataclasses.dataclass(frozen=True)
class BudgetLaw:
  """R(T) = beta0 + beta1 T^s, T in tokens."""

  beta0: float
  beta1: float
  s: float

  def __call__(self, T) -> np.ndarray:
    return self.beta0 + self.beta1 * np.asarray(T, np.float64) ** self.s

  def as_dict(self) -> dict[str, float]:
    return {k: float(getattr(self, k)) for k in BUDGET_PARAM_NAMES}

  @classmethod
  def from_raw(cls, raw, t_ref: float) -> BudgetLaw:
    beta0, beta1, s = (float(v) for v in raw)
    return cls(beta0=beta0, beta1=beta1 * t_ref ** -s, s=s)


def _budget_predict(x, t):
  return x[0] + x[1] * jnp.exp(x[2] * jnp.log(t))


BUDGET_OBJECTIVE = parametric.huber_objective(_budget_predict, delta=None)


def _budget_starts(t, R) -> np.ndarray:
  """For each exponent on a grid, the least-squares beta0, beta1 (the law is linear in them)."""
  rows = []
  for s in np.r_[np.linspace(-2.0, -0.05, 14), np.linspace(0.05, 2.0, 14)]:
    X = np.stack([np.ones_like(t), t**s], axis=1)
    (b0, b1), *_ = np.linalg.lstsq(X, R, rcond=None)
    rows.append((b0, b1, s))
  return np.array(rows, np.float64)


@dataclasses.dataclass(frozen=True)
class BudgetFit:
  law: BudgetLaw
  objective: float  # half the summed squared residuals
  converged: bool
  T: np.ndarray
  R: np.ndarray
  raw: tuple[float, ...]
  t_ref: float

  def as_dict(self) -> dict:
    return {**self.law.as_dict(), "objective": self.objective, "converged": self.converged,
            "points": [{"T": float(t), "cmr": float(r)} for t, r in zip(self.T, self.R)]}


def _check_budgets(T, R, what: str):
  cols = parametric.check_columns(what, 1, ("T",), T=T, R=R)
  T, R = cols["T"], cols["R"]
  n = np.unique(T).size
  if n < MIN_BUDGETS:
    raise ScalingFitError(
        f"{what} R(T) = beta0 + beta1 T^s needs the critical ratio at {MIN_BUDGETS} or more "
        f"different token budgets, got {n}; evaluate the runs at more token counts (checkpoints "
        "along each run count).")
  return T, R


def fit_budget_law(T, R) -> BudgetFit:
  """Least-squares fit of R(T) = beta0 + beta1 T^s to critical ratios at budgets T."""
  T, R = _check_budgets(T, R, "CMR budget law")
  t_ref = float(T.min())
  t = T / t_ref
  best = parametric.multistart(
      BUDGET_OBJECTIVE, _budget_starts(t, R), (t, R, np.ones((1, 1))), what="CMR budget law",
      max_iter=500, diverged_hint="check that budgets are raw token counts.")
  return BudgetFit(law=BudgetLaw.from_raw(best.x, t_ref), objective=best.value,
                   converged=best.converged, T=T, R=R, raw=parametric.as_tuple(best.x),
                   t_ref=t_ref)


def budgets_of(tokens) -> np.ndarray:
  """The distinct positive token counts of a table: where the critical ratio is measured."""
  tokens = np.asarray(tokens, np.float64)
  return np.unique(tokens[tokens > 0])


def critical_points(law: CMRLaw, budgets, tolerance: float) -> np.ndarray:
  """CMR at each budget, warning when the tolerance admits every ratio or none (R(T) is then
  clipped and a poor description)."""
  cmr = law.critical_ratio(budgets, tolerance)
  for edge, words in ((1.0, "every domain share (up to 1.0)"), (0.0, "no domain share")):
    hit = np.asarray(budgets)[cmr == edge]
    if hit.size:
      warnings.warn(f"CMR: at {hit.size} budget(s) (e.g. T={hit[0]:.3g}) the tolerance "
                    f"{tolerance} admits {words}; R(T) is fitted to clipped values there.",
                    stacklevel=3)
  return cmr


# ----------------------------------------------------------------------------------------------
# The whole procedure, bootstrap and holdout


@dataclasses.dataclass(frozen=True)
class CMRResult:
  fit: CMRFit
  budget: BudgetFit
  tolerance: float

  def predict(self, T) -> dict[str, np.ndarray]:
    """CMR at budgets T: from the budget law, and from the loss law directly."""
    return {"cmr_budget_law": self.budget.law(T),
            "cmr_loss_law": self.fit.law.critical_ratio(T, self.tolerance)}


def fit_cmr_law(ratio, tokens, loss, *, start_loss: float | None = None,
                tolerance: float = TOLERANCE, budgets: Sequence[float] | None = None,
                grid: np.ndarray | None = None) -> CMRResult:
  """Loss law, critical ratio at each observed budget (or `budgets`), and R(T)."""
  if not (math.isfinite(tolerance) and tolerance > 0):
    raise ScalingFitError(f"tolerance={tolerance} must be a positive number of nats (the rise "
                          f"of the general loss allowed; the paper uses {TOLERANCE}).")
  T = budgets_of(tokens) if budgets is None else np.asarray(budgets, np.float64)
  _check_budgets(T, np.zeros_like(T), "CMR budget law")  # before the costlier fit
  fit = fit_cmr(ratio, tokens, loss, start_loss=start_loss, grid=grid)
  budget = fit_budget_law(T, critical_points(fit.law, T, tolerance))
  return CMRResult(fit=fit, budget=budget, tolerance=float(tolerance))


@dataclasses.dataclass(frozen=True)
class CMRBootstrap:
  raw: np.ndarray  # [K, 5] loss-law refits in the optimiser's coordinates
  budget_raw: np.ndarray  # [K, 3] their budget laws (t_ref units)
  start_loss: float
  t_ref: float
  budget_t_ref: float
  tolerance: float

  def laws(self) -> list[CMRLaw]:
    return [CMRLaw.from_raw(r, self.start_loss, self.t_ref) for r in self.raw]

  def budget_laws(self) -> list[BudgetLaw]:
    return [BudgetLaw.from_raw(r, self.budget_t_ref) for r in self.budget_raw]

  def param_intervals(self, level: float = 0.95) -> dict[str, list[float]]:
    values = np.array([[getattr(law, k) for k in PARAM_NAMES] for law in self.laws()])
    budget = np.array([[getattr(law, k) for k in BUDGET_PARAM_NAMES]
                       for law in self.budget_laws()])
    lo, hi = parametric.interval(np.concatenate([values, budget], axis=1), level)
    return {k: [float(lo[i]), float(hi[i])]
            for i, k in enumerate((*PARAM_NAMES, *BUDGET_PARAM_NAMES))}

  def predict(self, T, level: float = 0.95) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"cmr_budget_law": parametric.interval(
                np.stack([law(T) for law in self.budget_laws()]), level),
            "cmr_loss_law": parametric.interval(
                np.stack([law.critical_ratio(T, self.tolerance) for law in self.laws()]),
                level)}


def bootstrap_cmr(ratio, tokens, loss, result: CMRResult, *, start_loss: float | None = None,
                  samples: int = 100, seed: int = 0) -> CMRBootstrap:
  """Refits the loss law on resampled runs (one batched L-BFGS), then each refit's budget law
  (another), so intervals cover both steps of the procedure."""
  points = check_points(ratio, tokens, loss, start_loss)
  starts = np.array([result.fit.raw, *result.fit.polished_starts[:3]], np.float64)
  raw = parametric.bootstrap(OBJECTIVE, starts, lambda w: _data(points, w), points.ratio.size,
                             samples=samples, seed=seed)
  T, t_ref = result.budget.T, result.budget.t_ref
  t = T / t_ref
  with warnings.catch_warnings():  # clipped CMR in a resample is part of the spread
    warnings.simplefilter("ignore")
    R = np.stack([CMRLaw.from_raw(r, points.start_loss, points.t_ref)
                  .critical_ratio(T, result.tolerance) for r in raw])
  x0 = np.tile(np.asarray(result.budget.raw, np.float64), (R.shape[0], 1))
  out = parametric.run_lbfgs(BUDGET_OBJECTIVE, x0, (t, R, np.ones((1, 1))), x64=True,
                             max_iter=1000, **parametric.POLISH_TOL)
  keep = np.isfinite(out.value)
  return CMRBootstrap(raw=raw[keep], budget_raw=np.asarray(out.x)[keep],
                      start_loss=points.start_loss, t_ref=points.t_ref, budget_t_ref=t_ref,
                      tolerance=result.tolerance)


def holdout(ratio, tokens, loss, heldout_mask, *, start_loss: float | None = None,
            tolerance: float = TOLERANCE, grid: np.ndarray | None = None
            ) -> tuple[CMRResult, parametric.Holdout]:
  """Fits on the runs not held out (e.g. tokens <= a budget: the short runs) and predicts the
  general loss of the held-out ones. Start rows (tokens = 0) are never held out."""
  ratio, tokens, loss = (np.asarray(v, np.float64).reshape(-1) for v in (ratio, tokens, loss))
  mask = np.asarray(heldout_mask, bool) & (tokens > 0)
  kept, held = parametric.holdout_rows(mask, "CMR holdout", len(PARAM_NAMES) + 1)
  result = fit_cmr_law(ratio[kept], tokens[kept], loss[kept], start_loss=start_loss,
                       tolerance=tolerance, grid=grid)
  pred = result.fit.law.loss(ratio[held], tokens[held])
  return result, parametric.Holdout(observed=loss[held], predicted=pred, rows=held)
