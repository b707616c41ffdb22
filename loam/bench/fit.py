"""Chinchilla approach-3 fit: loam's batched JAX L-BFGS against per-start scipy, same process.

    python -m loam.bench.fit [--quick] [--results CSV]

Both run the replication protocol on the Chinchilla Figure 4 points (5 highest-loss runs dropped,
Huber delta 1e-3 on log-loss residuals, the 4500-point start grid, best converged result). loam
runs every start at once (loam.scaling.fit_chinchilla); scipy runs
scipy.optimize.minimize(method="L-BFGS-B") once per start on the same objective with the same
hand-written gradient in numpy (its best over the starts it ran is reported as `scipy_fit`).
`fit_seconds` is a warm fit (compiled program reused, as in a
bootstrap or a per-domain sweep); `fit_seconds_with_compile` is the first call. scipy stops after a
time budget (420 s; with --quick, 300 starts or 20 s) and its time for all 4500 starts is then
extrapolated linearly from the starts it ran, in a fixed random order ("scipy_seconds_estimated":
true, "scipy_starts_timed"). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np
import scipy.optimize

from loam.scaling import fit as fit_cli
from loam.scaling import laws

DEFAULT_RESULTS = (pathlib.Path(__file__).resolve().parents[2] / "tests" / "data"
                   / "chinchilla_figure4_points.csv")


def _numpy_objective(log_n, log_d, log_l):
  delta = laws.HUBER_DELTA

  def value_and_grad(x):
    a, b, e, alpha, beta = x
    term_n = np.exp(np.clip(a - alpha * log_n, -700, 700))
    term_d = np.exp(np.clip(b - beta * log_d, -700, 700))
    term_e = np.exp(np.clip(e, -700, 700))
    total = term_n + term_d + term_e
    r = np.log(total) - log_l
    ar = np.abs(r)
    value = np.sum(np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)))
    psi = np.clip(r, -delta, delta) / total
    w_n, w_d = psi * term_n, psi * term_d
    grad = np.array([w_n.sum(), w_d.sum(), psi.sum() * term_e,
                     -(w_n * log_n).sum(), -(w_d * log_d).sum()])
    return value, grad

  return value_and_grad


def scipy_fit(N, D, L, starts: np.ndarray, budget_seconds: float) -> tuple[dict, float, int, int]:
  """(best law as dict, seconds, starts run, converged starts), stopping after budget_seconds."""
  objective = _numpy_objective(np.log(N), np.log(D), np.log(L))
  best_value, best_x, done, converged = np.inf, None, 0, 0
  t0 = time.perf_counter()
  with np.errstate(all="ignore"):
    for x0 in starts:
      res = scipy.optimize.minimize(objective, x0, jac=True, method="L-BFGS-B")
      done += 1
      if res.success and np.isfinite(res.fun):
        converged += 1
        if res.fun < best_value:
          best_value, best_x = res.fun, res.x
      if time.perf_counter() - t0 > budget_seconds:
        break
  seconds = time.perf_counter() - t0
  law = laws.ChinchillaLaw.from_raw(best_x).as_dict() if best_x is not None else {}
  return {**law, "objective": float(best_value)}, seconds, done, converged


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m loam.bench.fit", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="time scipy on at most 300 starts (and 20 s) and extrapolate")
  parser.add_argument("--scipy-budget", type=float, default=None,
                      help="seconds after which scipy stops and its time is extrapolated "
                           "(default 420, or 20 with --quick)")
  parser.add_argument("--results", default=str(DEFAULT_RESULTS))
  args = parser.parse_args(argv)

  table = fit_cli.load_results(args.results, drop_highest=5)
  N, D, L = table["N"], table["D"], table["loss"]
  grid = laws.initial_grid()

  t0 = time.perf_counter()
  laws.fit_chinchilla(N, D, L, grid=grid)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  fit = laws.fit_chinchilla(N, D, L, grid=grid)
  warm = time.perf_counter() - t0

  # A fixed random order, so a run cut short by the time budget times a representative subset.
  starts = grid[np.random.default_rng(0).permutation(len(grid))]
  if args.quick:
    starts = starts[:300]
  budget = args.scipy_budget if args.scipy_budget is not None else (20.0 if args.quick else 420.0)
  scipy_law, scipy_timed, scipy_done, scipy_converged = scipy_fit(N, D, L, starts, budget)
  scale = len(grid) / scipy_done
  report = {
      "benchmark": "chinchilla_approach3_fit",
      "n_points": fit.n_points,
      "n_starts": fit.n_starts,
      **fit.law.as_dict(),
      "objective": fit.objective,
      "converged": fit.converged,
      "n_converged_starts": fit.n_converged_starts,
      "fit_seconds": round(warm, 3),
      "fit_seconds_with_compile": round(first, 3),
      "scipy_method": "L-BFGS-B",
      "scipy_seconds": round(scipy_timed * scale, 3),
      "scipy_seconds_estimated": scipy_done < len(grid),
      "scipy_starts_timed": int(scipy_done),
      "scipy_seconds_timed": round(scipy_timed, 3),
      "scipy_converged_starts": scipy_converged,
      "scipy_fit": scipy_law,
      "speedup": round(scipy_timed * scale / warm, 2),
  }
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
