"""Tables, JSON reports and plots of the CMR and data-constrained laws for loam.scaling.fit.

CMR table: one row per continual run or evaluated checkpoint, columns `ratio` (the domain share
of the tokens, in [0, 1]), `tokens` (or `D`: tokens trained since the start) and the general loss
(`loss`, or the column named by --general-column); rows with tokens = 0 give the start loss.

Data-constrained table: columns N (parameters), D (tokens) or C (FLOPs), U (unique tokens the run
drew from) and loss.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np

from loam.scaling import cmr, data_constrained, tables
from loam.scaling.parametric import ScalingFitError

_HOLDOUT = re.compile(r"^\s*([A-Za-z_/][\w/.-]*)\s*>\s*([-+0-9.eE]+)\s*$")


def parse_holdout(text: str, table: dict[str, np.ndarray]) -> np.ndarray:
  """`COLUMN>VALUE` -> the boolean mask of held-out rows."""
  m = _HOLDOUT.match(text or "")
  if not m:
    raise ScalingFitError(f"--holdout {text!r} is not COLUMN>VALUE, e.g. --holdout 'tokens>3e8' "
                          "(fit on the other runs, predict these).")
  name, value = m.group(1), float(m.group(2))
  if name not in table:
    raise ScalingFitError(f"--holdout names column {name!r}, which this table does not have; "
                          f"choose one of {', '.join(sorted(table))}.")
  return table[name] > value


def _missing(path, header, needed: dict[str, bool], what: str):
  missing = [c for c, ok in needed.items() if not ok]
  if missing:
    raise ScalingFitError(f"{path} lacks column(s) {', '.join(missing)} (found {header}); {what}")


# ----------------------------------------------------------------------------------------------
# CMR


def load_cmr_table(path, general_column: str = "loss") -> dict[str, np.ndarray]:
  path, header, rows = tables.read_rows(path)
  tokens = "tokens" if "tokens" in header else "D"
  _missing(path, header, {"ratio": "ratio" in header, "tokens (or D)": tokens in header,
                          general_column: general_column in header},
           "a CMR table needs ratio (domain share in [0, 1]), tokens and the general loss "
           "(--general-column).")
  if not rows:
    raise ScalingFitError(f"{path} has no run with status 'ok'; nothing to fit.")
  return {"ratio": tables.numeric_column(path, rows, "ratio"),
          "tokens": tables.numeric_column(path, rows, tokens),
          "loss": tables.numeric_column(path, rows, general_column)}


def cmr_report(table, *, tolerance: float = cmr.TOLERANCE, start_loss: float | None = None,
               predict_at=(), holdout: str | None = None, bootstrap: int = 0, seed: int = 0,
               level: float = 0.95) -> tuple[dict, dict]:
  """(JSON-able report, objects for plotting)."""
  r, t, l = table["ratio"], table["tokens"], table["loss"]
  result = cmr.fit_cmr_law(r, t, l, start_loss=start_loss, tolerance=tolerance)
  budgets = np.asarray(sorted({*np.asarray(predict_at, np.float64).tolist()}), np.float64)
  report: dict[str, Any] = {
      "law": "cmr", "n_runs": int(r.size), "tolerance": tolerance,
      "loss_law": result.fit.as_dict(), "budget_law": result.budget.as_dict(),
      **result.budget.law.as_dict()}
  preds = result.predict(budgets)
  report["predictions"] = [
      {"T": float(T), "cmr_budget_law": float(a), "cmr_loss_law": float(b),
       "extrapolated": bool(T > t.max())}
      for T, a, b in zip(budgets, preds["cmr_budget_law"], preds["cmr_loss_law"])]
  objects: dict[str, Any] = {"result": result}
  if bootstrap:
    boot = cmr.bootstrap_cmr(r, t, l, result, start_loss=start_loss, samples=bootstrap,
                             seed=seed)
    report["bootstrap"] = {"samples": int(boot.raw.shape[0]), "level": level,
                           "intervals": boot.param_intervals(level)}
    if budgets.size:
      iv = boot.predict(budgets, level)
      for i, row in enumerate(report["predictions"]):
        for key, (lo, hi) in iv.items():
          row[f"{key}_interval"] = [float(lo[i]), float(hi[i])]
  if holdout:
    mask = parse_holdout(holdout, table)
    short, scored = cmr.holdout(r, t, l, mask, start_loss=start_loss, tolerance=tolerance)
    held_budgets = cmr.budgets_of(t[scored.rows])
    short_pred = short.predict(held_budgets)
    full_pred = result.fit.law.critical_ratio(held_budgets, tolerance)
    report["holdout"] = {
        "rule": holdout, **scored.as_dict(), "loss_law": short.fit.law.as_dict(),
        "budget_law": short.budget.law.as_dict(),
        "cmr": [{"T": float(T), "cmr_budget_law": float(a), "cmr_loss_law": float(b),
                 "cmr_all_runs": float(c)}
                for T, a, b, c in zip(held_budgets, short_pred["cmr_budget_law"],
                                      short_pred["cmr_loss_law"], full_pred)]}
    objects["holdout"] = (short, scored)
  return report, objects


def plot_cmr(table, objects, out_dir) -> list[pathlib.Path]:
  """general_loss.png (loss against tokens per ratio, with the law) and cmr.png (CMR(T), R(T))."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  result: cmr.CMRResult = objects["result"]
  r, t, l = table["ratio"], table["tokens"], table["loss"]
  positive = t > 0
  ratios = np.unique(r[positive])
  colors = plt.cm.viridis(np.linspace(0, 0.9, ratios.size))
  grid = np.logspace(np.log10(t[positive].min()), np.log10(t.max()) + 0.5, 100)
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for ratio, color in zip(ratios, colors):
    rows = positive & (r == ratio)
    ax.scatter(t[rows], l[rows], s=12, color=color, label=f"r={ratio:g}")
    ax.plot(grid, result.fit.law.loss(ratio, grid), color=color, lw=1)
  ax.axhline(result.fit.law.L0 + result.tolerance, color="red", ls="--", lw=1,
             label="start + tolerance")
  ax.set(xscale="log", xlabel="tokens since the start", ylabel="general loss",
         title="General loss by domain share")
  ax.legend(fontsize=7)
  fig.tight_layout()
  written = [out_dir / "general_loss.png"]
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4.5))
  b = result.budget
  far = np.logspace(np.log10(b.T.min()), np.log10(b.T.max()) + 1, 100)
  ax.scatter(b.T, b.R, color="black", s=14, label="CMR at the runs' budgets")
  ax.plot(far, b.law(far), "r-", label="R(T) = β0 + β1·T^s")
  ax.plot(far, result.fit.law.critical_ratio(far, result.tolerance), "k:",
          label="CMR of the loss law")
  ax.axvspan(b.T.max(), far.max(), color="grey", alpha=0.1, label="extrapolated")
  ax.set(xscale="log", xlabel="token budget T", ylabel="critical mixture ratio",
         title=f"Critical mixture ratio (tolerance {result.tolerance:g} nats)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  written.append(out_dir / "cmr.png")
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)
  return written


# ----------------------------------------------------------------------------------------------
# Data-constrained


def load_data_constrained_table(path) -> dict[str, np.ndarray]:
  path, header, rows = tables.read_rows(path)
  _missing(path, header, {"N": "N" in header, "D or C": "D" in header or "C" in header,
                          "U": "U" in header, "loss": "loss" in header},
           "a data-constrained table needs N (parameters), D (tokens) or C (FLOPs), U (unique "
           "tokens the run drew from) and loss.")
  if not rows:
    raise ScalingFitError(f"{path} has no run with status 'ok'; nothing to fit.")
  table = {k: tables.numeric_column(path, rows, k) for k in ("N", "U", "loss")}
  table["D"] = (tables.numeric_column(path, rows, "D") if "D" in header
                else tables.numeric_column(path, rows, "C") / (6.0 * table["N"]))
  table["epochs"] = table["D"] / table["U"]
  return table


def data_constrained_report(table, *, tokens_per_param: float = data_constrained.TOKENS_PER_PARAM,
                            holdout: str | None = None, bootstrap: int = 0, seed: int = 0,
                            level: float = 0.95) -> tuple[dict, dict]:
  N, D, U, L = table["N"], table["D"], table["U"], table["loss"]
  result = data_constrained.fit_data_constrained(N, D, U, L, tokens_per_param=tokens_per_param)
  report: dict[str, Any] = {"law": "data_constrained", "n_runs": int(N.size),
                            **result.as_dict()}
  objects: dict[str, Any] = {"fit": result}
  if bootstrap:
    boot = data_constrained.bootstrap_data_constrained(N, D, U, L, result, samples=bootstrap,
                                                       seed=seed)
    report["bootstrap"] = {"samples": int(boot.raw.shape[0]), "level": level,
                           "intervals": boot.param_intervals(level)}
  if holdout:
    mask = parse_holdout(holdout, table)
    short, scored = data_constrained.holdout(N, D, U, L, mask, tokens_per_param=tokens_per_param)
    report["holdout"] = {"rule": holdout, **scored.as_dict(), "law": short.law.as_dict()}
    objects["holdout"] = (short, scored)
  return report, objects


def plot_data_constrained(table, objects, out_dir) -> list[pathlib.Path]:
  """loss_vs_epochs.png: loss against epochs per (N, U), with the law; observed_vs_predicted."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  law = objects["fit"].law
  tpp = objects["fit"].tokens_per_param
  N, D, U, L = table["N"], table["D"], table["U"], table["loss"]
  groups = sorted({(n, u) for n, u in zip(N, U)})
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for (n, u), color in zip(groups, colors):
    rows = (N == n) & (U == u)
    ax.scatter(D[rows] / u, L[rows], s=10, color=color)
    ep = np.logspace(np.log10(max((D[rows] / u).min(), 1e-3)), np.log10((D[rows] / u).max()), 50)
    ax.plot(ep, law.loss(n, ep * u, u, tpp), color=color, lw=1)
  ax.set(xscale="log", xlabel="epochs (D / U)", ylabel="loss",
         title=f"Repeated data: R*_D={law.R_D_star:.3g}, R*_N={law.R_N_star:.3g}")
  fig.tight_layout()
  written = [out_dir / "loss_vs_epochs.png"]
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5, 5))
  pred = law.loss(N, D, U, tpp)
  ax.scatter(L, pred, s=10)
  lim = [min(L.min(), pred.min()), max(L.max(), pred.max())]
  ax.plot(lim, lim, "k--", lw=1)
  ax.set(xlabel="observed loss", ylabel="predicted (data-constrained law)",
         title="Observed vs predicted")
  fig.tight_layout()
  written.append(out_dir / "observed_vs_predicted.png")
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)
  return written


def check_positive_list(values, what: str) -> list[float]:
  out = [float(v) for v in values]
  if any(not (np.isfinite(v) and v > 0) for v in out):
    raise ScalingFitError(f"{what} must be positive token counts, got {values}.")
  return out

