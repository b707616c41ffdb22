"""Fit scaling laws to a results table and plot them.

  python -m loam.scaling.fit --results DIR_OR_CSV --law chinchilla [--approach 1|2|3|all]
      [--out DIR] [--bootstrap K] [--drop-highest K]
  python -m loam.scaling.fit --results CSV_OR_JSON --law cmr [--tolerance 0.05]
      [--start-loss L0] [--general-column loss] [--predict-at T,...] [--holdout 'tokens>T']
  python -m loam.scaling.fit --results CSV_OR_JSON --law data_constrained
      [--tokens-per-param 20] [--holdout 'epochs>K']

The table (CSV, or JSON: a list of objects) has one row per run (or per evaluated checkpoint).
Chinchilla: columns N (parameters), D (tokens) or C (FLOPs, D = C / 6N), and `loss` and/or
per-domain `loss/<domain>` columns; the column names of the Chinchilla Figure 4 extraction
(`Model Size`, `Training FLOP`) are accepted too. CMR: `ratio`, `tokens` and the general loss
(loam/scaling/cmr.py). Data-constrained: N, D or C, U (unique tokens) and loss
(loam/scaling/data_constrained.py). Rows whose `status` is not "ok" are dropped with a warning.
--holdout COLUMN>VALUE fits without those rows and reports its predictions for them. The last
line printed is one JSON object: for chinchilla its top-level E, A, B, alpha, beta are the
approach-3 fit of `loss`; for cmr, beta0, beta1, s of R(T); for data_constrained the seven
constants.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import warnings
from typing import Any

import numpy as np

from loam import cli
from loam.scaling import laws, reports
from loam.scaling.laws import ScalingFitError
from loam.scaling.tables import numeric_column, read_rows

# What each approach needs (laws.py enforces it; --approach all states it when it fails).
NEEDS = ("approach 1, runs at 2+ compute budgets; approach 2, 6+ runs (2+ FLOP budgets with 3+ "
         "model sizes each); approach 3, 5+ runs")


def check_all_fitted(report: dict) -> None:
  """--approach all promises every approach: refuses a table on which some cannot be fitted
  (rather than exit 0 with a partial, degenerate report), saying what each one needs."""
  for col, entry in report["fits"].items():
    failed = {int(k.removeprefix("approach")): v["error"] for k, v in entry.items()
              if isinstance(v, dict) and "error" in v}
    if failed:
      ok = [str(a) for a in (1, 2, 3) if a not in failed]
      reasons = "; ".join(failed[a].split(";")[0].rstrip(".") for a in sorted(failed))
      raise ScalingFitError(
          f"--approach all on {report['n_runs']} run(s): {reasons} (column {col!r}). Each "
          f"approach needs: {NEEDS}. Add runs"
          + (f", or choose --approach {' or '.join(ok)}" if ok else ""))


def loss_columns(table: dict[str, np.ndarray]) -> list[str]:
  """`loss` first, then per-domain `loss/<domain>` columns in table order."""
  return [c for c in table if c == "loss"] + [c for c in table if c.startswith("loss/")]


def load_results(path, *, drop_highest: int = 0) -> dict[str, np.ndarray]:
  """Reads a results table (or DIR/results.csv) into {column: float array} with N, D, C, loss*."""
  path, header, rows = read_rows(path)
  losses = [c for c in header if c == "loss" or c.startswith("loss/")]
  missing = [c for c, ok in (("N", "N" in header), ("D or C", "D" in header or "C" in header),
                             ("loss or loss/<domain>", bool(losses))) if not ok]
  if missing:
    raise ScalingFitError(f"{path} lacks column(s) {', '.join(missing)} (found {header}); a "
                          "results table needs N (parameters), D (tokens) or C (FLOPs), and loss.")
  if not rows:
    raise ScalingFitError(f"{path} has no run with status 'ok'; nothing to fit.")

  def column(name):
    return numeric_column(path, rows, name)

  table = {"N": column("N")}
  if "D" in header:
    table["D"] = column("D")
    table["C"] = 6.0 * table["N"] * table["D"]
  else:
    table["C"] = column("C")
    table["D"] = table["C"] / (6.0 * table["N"])
  for c in losses:
    table[c] = column(c)
  if "loss" not in table:
    table = {**table, "loss": np.mean([table[c] for c in losses], axis=0)}
  for name, v in table.items():
    bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
    if bad.size:
      raise ScalingFitError(
          f"{path}: column {name!r} is non-finite or non-positive in {bad.size} run(s) (data rows "
          f"{(bad[:10] + 1).tolist()}); remove them or set their status to 'failed'.")
  if drop_highest:
    if drop_highest >= table["N"].size:
      raise ScalingFitError(f"--drop-highest {drop_highest} would drop all {table['N'].size} runs.")
    keep = np.sort(np.argsort(table["loss"], kind="stable")[: table["N"].size - drop_highest])
    table = {k: v[keep] for k, v in table.items()}
  return table


def _default_budgets(C: np.ndarray) -> np.ndarray:
  lo, hi = math.floor(np.log10(C.min())), math.ceil(np.log10(C.max())) + 1
  return 10.0 ** np.arange(lo, hi + 1)


def fit_table(table: dict[str, np.ndarray], *, approaches=(1, 2, 3), bootstrap: int = 0,
              seed: int = 0, budgets=None, level: float = 0.95,
              required: bool = True) -> tuple[dict, dict]:
  """Fits every loss column. Returns (JSON-able report, {column: {approach: fit object}}).

  With required=False an approach the data cannot support (e.g. approach 2 without IsoFLOP
  budgets) is reported as {"error": ...} instead of raising.
  """
  N, D = table["N"], table["D"]
  budgets = _default_budgets(table["C"]) if budgets is None else np.asarray(budgets, np.float64)
  report: dict[str, Any] = {"law": "chinchilla", "n_runs": int(N.size), "fits": {}}
  objects: dict = {}
  for col in loss_columns(table):
    L = table[col]
    entry: dict[str, Any] = {}
    objs: dict[Any, Any] = {}
    for approach in approaches:
      try:
        if approach == 1:
          objs[1] = laws.fit_envelope(N, D, L)
          entry["approach1"] = objs[1].as_dict()
        elif approach == 2:
          objs[2] = laws.fit_isoflop(N, D, L)
          entry["approach2"] = objs[2].as_dict()
        elif approach == 3:
          fit = objs[3] = laws.fit_chinchilla(N, D, L)
          law = fit.law
          n_opt, d_opt = law.compute_optimal(budgets)
          a3 = {**fit.as_dict(), "compute_optimal": [
              {"C": float(c), "N_opt": float(n), "D_opt": float(d),
               "loss": float(law.loss(n, d))} for c, n, d in zip(budgets, n_opt, d_opt)]}
          if bootstrap:
            boot = objs["bootstrap"] = laws.bootstrap_chinchilla(N, D, L, fit, samples=bootstrap,
                                                                 seed=seed)
            a3["bootstrap"] = {"samples": int(boot.raw.shape[0]), "level": level,
                               "intervals": boot.param_intervals(level)}
            (n_lo, n_hi), (d_lo, d_hi) = boot.compute_optimal(budgets, level)
            l_lo, l_hi = boot.predict_loss(n_opt, d_opt, level)
            for i, row in enumerate(a3["compute_optimal"]):
              row.update(N_opt_interval=[float(n_lo[i]), float(n_hi[i])],
                         D_opt_interval=[float(d_lo[i]), float(d_hi[i])],
                         loss_interval=[float(l_lo[i]), float(l_hi[i])])
          entry["approach3"] = a3
        else:
          raise ScalingFitError(f"unknown approach {approach!r}; use 1, 2, 3 or all.")
      except ScalingFitError as e:
        if required:
          raise ScalingFitError(f"{col}: {e}") from None
        entry[f"approach{approach}"] = {"error": str(e)}
    report["fits"][col] = entry
    objects[col] = objs
  main = report["fits"].get("loss", {}).get("approach3", {})
  for k in laws.PARAM_NAMES:
    if k in main:
      report[k] = main[k]
  return report, objects


def plot_fits(table: dict[str, np.ndarray], objects: dict, out_dir, column: str = "loss"):
  """PNGs for one loss column: loss vs compute, IsoFLOP curves, observed vs predicted."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  N, D, C, L = table["N"], table["D"], table["C"], table[column]
  objs = objects[column]
  written = []

  fig, ax = plt.subplots(figsize=(6, 4.5))
  sc = ax.scatter(C, L, c=np.log10(N), s=12, cmap="viridis")
  fig.colorbar(sc, ax=ax, label="log10 N")
  if 3 in objs:
    law = objs[3].law
    grid = np.logspace(np.log10(C.min()), np.log10(C.max()) + 1, 100)
    n_opt, d_opt = law.compute_optimal(grid)
    ax.plot(grid, law.loss(n_opt, d_opt), "r-", label="approach 3 frontier")
  if 1 in objs:
    env = objs[1]
    ax.plot(env.C, [L[np.argmin(np.abs(C - c))] for c in env.C], "k.--", label="envelope (appr. 1)")
  ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=column, title="Loss vs compute")
  ax.legend()
  fig.tight_layout()
  written.append(out_dir / "loss_vs_compute.png")
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 4.5))
  groups = laws.group_budgets(C)
  colors = plt.cm.plasma(np.linspace(0, 0.9, len(groups)))
  for rows, color in zip(groups, colors):
    ax.scatter(N[rows], L[rows], s=12, color=color)
  if 2 in objs:
    for (_budget, (c2, c1, c0), rows), _color in zip(objs[2].details, colors):
      x = np.linspace(np.log(N[rows]).min(), np.log(N[rows]).max(), 50)
      ax.plot(np.exp(x), c2 * x**2 + c1 * x + c0, color="gray", lw=1)
      xm = -c1 / (2 * c2)
      ax.plot(np.exp(xm), c2 * xm**2 + c1 * xm + c0, "k*", ms=9)
  ax.set(xscale="log", xlabel="parameters N", ylabel=column, title="IsoFLOP curves and minima")
  fig.tight_layout()
  written.append(out_dir / "isoflop.png")
  fig.savefig(written[-1], dpi=100)
  plt.close(fig)

  if 3 in objs:
    fig, ax = plt.subplots(figsize=(5, 5))
    pred = objs[3].law.loss(N, D)
    ax.scatter(L, pred, s=10)
    lim = [min(L.min(), pred.min()), max(L.max(), pred.max())]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlabel=f"observed {column}", ylabel="predicted (approach 3)",
           title="Observed vs predicted")
    fig.tight_layout()
    written.append(out_dir / "observed_vs_predicted.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
  return written


# Options that belong to one law, with their defaults (given with another law: refused).
LAW_OPTIONS: dict[str, dict[str, Any]] = {"chinchilla": {"approach": None, "drop_highest": 0},
               "cmr": {"tolerance": None, "start_loss": None, "general_column": None,
                       "predict_at": None},
               "data_constrained": {"tokens_per_param": None}}


def _check_law_options(args) -> None:
  for law, options in LAW_OPTIONS.items():
    if law == args.law:
      continue
    given = [o for o, default in options.items() if getattr(args, o) != default]
    if given:
      flags = ", ".join("--" + o.replace("_", "-") for o in given)
      verb, it = ("belong", "them") if len(given) > 1 else ("belongs", "it")
      raise ScalingFitError(f"{flags} {verb} to --law {law}, not --law {args.law}; drop {it} "
                            f"or choose --law {law}.")
  if args.law == "chinchilla" and args.holdout:
    raise ScalingFitError("--holdout is for --law cmr and data_constrained; a Chinchilla fit's "
                          "held-out check is a fit on fewer runs (--drop-highest).")


def _fit_other_law(args) -> tuple[dict, Any]:
  """(report, plot thunk) of --law cmr or data_constrained."""
  if args.law == "cmr":
    table = reports.load_cmr_table(args.results, args.general_column or "loss")
    predict_at = reports.check_positive_list(
        [v for v in (args.predict_at or "").split(",") if v.strip()], "--predict-at")
    report, objects = reports.cmr_report(
        table, tolerance=0.05 if args.tolerance is None else args.tolerance,
        start_loss=args.start_loss, predict_at=predict_at, holdout=args.holdout,
        bootstrap=args.bootstrap, seed=args.seed)
    return report, lambda out: reports.plot_cmr(table, objects, out)
  table = reports.load_data_constrained_table(args.results)
  report, objects = reports.data_constrained_report(
      table, tokens_per_param=args.tokens_per_param or 20.0, holdout=args.holdout,
      bootstrap=args.bootstrap, seed=args.seed)
  return report, lambda out: reports.plot_data_constrained(table, objects, out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m loam.scaling.fit", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", required=True,
                      help="results CSV or JSON, or a directory with results.csv")
  parser.add_argument("--law", default="chinchilla", choices=list(LAW_OPTIONS))
  parser.add_argument("--approach", default=None, choices=["1", "2", "3", "all"],
                      help="chinchilla: which approach (default 3)")
  parser.add_argument("--out", default=None, help="directory for fit.json and PNG plots")
  parser.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for intervals")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--drop-highest", type=int, default=0,
                      help="chinchilla: drop the K highest-loss runs (the replication uses 5)")
  parser.add_argument("--tolerance", type=float, default=None,
                      help="cmr: rise of the general loss allowed, in nats (default 0.05)")
  parser.add_argument("--start-loss", type=float, default=None,
                      help="cmr: general loss at the start (default: the rows with tokens = 0)")
  parser.add_argument("--general-column", default=None,
                      help="cmr: the column holding the general loss (default loss)")
  parser.add_argument("--predict-at", default=None,
                      help="cmr: comma-separated token budgets to predict the CMR at")
  parser.add_argument("--tokens-per-param", type=float, default=None,
                      help="data_constrained: tokens per parameter of U_N (default 20)")
  parser.add_argument("--holdout", default=None,
                      help="cmr, data_constrained: COLUMN>VALUE rows to hold out and predict")
  args = parser.parse_args(argv)
  caught, shown = [], False
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      _check_law_options(args)
      if args.law == "chinchilla":
        approach = args.approach or "3"
        approaches = (1, 2, 3) if approach == "all" else (int(approach),)
        table = load_results(args.results, drop_highest=args.drop_highest)
        report, objects = fit_table(table, approaches=approaches, bootstrap=args.bootstrap,
                                    seed=args.seed, required=approach != "all")
        if approach == "all":
          check_all_fitted(report)

        def plot(out):
          return plot_fits(table, objects, out)
      else:
        report, plot = _fit_other_law(args)
    for w in caught:
      print(f"warning: {w.message}", file=sys.stderr)
    shown = True
    report["warnings"] = [str(w.message) for w in caught]
    if args.out:
      out = pathlib.Path(args.out)
      out.mkdir(parents=True, exist_ok=True)
      report["plots"] = [str(p) for p in plot(out)]
      (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
  except cli.USER_ERRORS as e:  # ScalingFitError is a ValueError
    if not shown:  # e.g. that failed runs were dropped, before the reason the fit stopped
      for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    cli.fail(e)
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
