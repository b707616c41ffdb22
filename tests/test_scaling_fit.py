"""Scaling-law fitters: recovery of known laws, the Chinchilla replication, CLI and bad input."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from loam.scaling import fit as fit_cli
from loam.scaling import laws

REPO = pathlib.Path(__file__).resolve().parents[1]
CHINCHILLA_CSV = REPO / "tests" / "data" / "chinchilla_figure4_points.csv"
TRUTH = laws.ChinchillaLaw(E=1.7, A=400.0, B=1500.0, alpha=0.33, beta=0.29)
# Every 15th start of the full grid: enough to find the basin, a fraction of the cost.
SUBGRID = laws.initial_grid()[::15]


def synthetic_runs(law=TRUTH, noise=0.002, seed=0):
  n, d = np.meshgrid(np.logspace(6, 9, 8), np.logspace(8, 11, 8))
  n, d = n.ravel(), d.ravel()
  rng = np.random.default_rng(seed)
  return n, d, law.loss(n, d) * np.exp(noise * rng.standard_normal(n.size))


def isoflop_runs(law=TRUTH, budgets=(1e15, 1e16, 1e17, 1e18, 1e19), sizes=31, span_dex=0.8):
  rows = []
  for c in budgets:
    n_opt, _ = law.compute_optimal(c)
    for n in n_opt * np.logspace(-span_dex, span_dex, sizes):
      rows.append((n, c / (6.0 * n)))
  n, d = map(np.array, zip(*rows))
  return n, d, law.loss(n, d)


def write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


def test_batched_lbfgs_minimises_independent_problems():
  import jax
  import jax.numpy as jnp

  from loam.scaling import lbfgs

  def rosenbrock(x, scale):
    return (1 - x[0]) ** 2 + scale * (x[1] - x[0] ** 2) ** 2

  def value_and_grad(x, scales):
    return jax.vmap(jax.value_and_grad(rosenbrock))(x, scales)

  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x0 = jnp.asarray(rng.uniform(-2, 2, (16, 2)))
    scales = jnp.asarray(np.r_[np.full(8, 100.0), np.full(8, 1.0)])
    out = jax.jit(lambda x, s: lbfgs.minimize(value_and_grad, x, s, gtol=1e-10, ftol=0.0,
                                              max_iter=500))(x0, scales)
  assert np.all(np.asarray(out.converged))
  np.testing.assert_allclose(np.asarray(out.x), 1.0, atol=1e-6)
  iters = np.asarray(out.iterations)
  assert iters[8:].mean() < iters[:8].mean()  # lanes stop independently; easy ones stop early


def test_compute_optimal_satisfies_budget_and_is_a_minimum():
  C = 1e20
  n_opt, d_opt = TRUTH.compute_optimal(C)
  assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-9)
  for factor in (0.8, 1.25):
    assert TRUTH.loss(n_opt * factor, d_opt / factor) > TRUTH.loss(n_opt, d_opt)


def test_approach3_recovers_synthetic_law():
  n, d, loss = synthetic_runs()
  fit = laws.fit_chinchilla(n, d, loss, grid=SUBGRID)
  assert fit.converged
  got = fit.law
  assert got.E == pytest.approx(TRUTH.E, rel=0.02)
  assert got.alpha == pytest.approx(TRUTH.alpha, rel=0.03)
  assert got.beta == pytest.approx(TRUTH.beta, rel=0.03)
  assert got.A == pytest.approx(TRUTH.A, rel=0.15)
  assert got.B == pytest.approx(TRUTH.B, rel=0.15)
  assert np.max(np.abs(got.loss(n, d) / TRUTH.loss(n, d) - 1)) < 0.005


def test_bootstrap_intervals_contain_truth():
  n, d, loss = synthetic_runs(noise=0.004, seed=1)
  fit = laws.fit_chinchilla(n, d, loss, grid=SUBGRID)
  boot = laws.bootstrap_chinchilla(n, d, loss, fit, samples=40, seed=0)
  assert boot.raw.shape == (40, 5)
  intervals = boot.param_intervals(0.95)
  for name, (lo, hi) in intervals.items():
    truth = getattr(TRUTH, name)
    assert lo < truth < hi, (name, lo, truth, hi)
    assert hi / lo < 1.5, (name, lo, hi)  # informative, not a degenerate spread of refits
  (n_lo, n_hi), _ = boot.compute_optimal(1e21)
  assert n_lo < TRUTH.compute_optimal(1e21)[0] < n_hi
  l_lo, l_hi = boot.predict_loss(1e8, 1e10)
  assert l_lo < TRUTH.loss(1e8, 1e10) < l_hi


@pytest.mark.parametrize("fitter", [laws.fit_envelope, laws.fit_isoflop])
def test_approaches_1_and_2_recover_n_opt_exponent(fitter):
  n, d, loss = isoflop_runs()
  alloc = fitter(n, d, loss)
  want = TRUTH.beta / (TRUTH.alpha + TRUTH.beta)
  assert alloc.n_opt.exponent == pytest.approx(want, abs=0.02)
  assert alloc.d_opt.exponent == pytest.approx(1 - want, abs=0.02)
  assert alloc.C.size == 5
  n_true, _ = TRUTH.compute_optimal(1e17)
  assert alloc.n_opt(1e17) == pytest.approx(n_true, rel=0.15)


def test_chinchilla_replication_full_grid():
  table = fit_cli.load_results(CHINCHILLA_CSV, drop_highest=5)
  assert table["N"].size == 240
  fit = laws.fit_chinchilla(table["N"], table["D"], table["loss"])
  assert fit.n_starts == 4500 and fit.converged
  got = fit.law
  assert got.E == pytest.approx(1.817, rel=0.01)
  assert got.alpha == pytest.approx(0.3473, rel=0.01)
  assert got.beta == pytest.approx(0.3672, rel=0.01)
  assert got.A == pytest.approx(478.0, rel=0.05)
  assert got.B == pytest.approx(2143.0, rel=0.05)


@pytest.mark.e2e
def test_cli_writes_json_and_plots(tmp_path):
  n, d, loss = isoflop_runs(budgets=(1e15, 1e16, 1e17, 1e18), sizes=9)
  rng = np.random.default_rng(0)
  code = loss * (1.1 + 0.01 * rng.standard_normal(loss.size))
  rows = [(a, b, "ok", c, e) for a, b, c, e in zip(n, d, loss, code)]
  rows += [(1e8, 1e9, "failed", "nan", "nan"), (2e8, 1e9, "diverged", "", "")]
  write_csv(tmp_path / "results.csv", ["N", "D", "status", "loss", "loss/code"], rows)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "loam.scaling.fit", "--results", str(tmp_path), "--law", "chinchilla",
       "--approach", "all", "--out", str(out), "--bootstrap", "8"],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr
  assert "dropping 2 run(s)" in proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in laws.PARAM_NAMES:
    assert np.isfinite(report[key])
  assert report["alpha"] == pytest.approx(TRUTH.alpha, rel=0.05)
  assert report["n_runs"] == n.size
  assert set(report["fits"]) == {"loss", "loss/code"}
  a3 = report["fits"]["loss"]["approach3"]
  assert len(a3["bootstrap"]["intervals"]) == 5
  lo, hi = a3["compute_optimal"][0]["N_opt_interval"]
  assert lo <= a3["compute_optimal"][0]["N_opt"] <= hi
  assert report["fits"]["loss"]["approach2"]["N_opt"]["exponent"] == pytest.approx(
      TRUTH.beta / (TRUTH.alpha + TRUTH.beta), abs=0.03)
  for name in ("loss_vs_compute.png", "isoflop.png", "observed_vs_predicted.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((out / "fit.json").read_text())["E"] == report["E"]


def test_load_results_accepts_chinchilla_columns():
  table = fit_cli.load_results(CHINCHILLA_CSV)
  assert table["N"].size == 245
  np.testing.assert_allclose(6 * table["N"] * table["D"], table["C"])


def test_loss_is_mean_of_domains_when_absent(tmp_path):
  path = write_csv(tmp_path / "r.csv", ["N", "C", "loss/a", "loss/b"], [(1e6, 6e14, 3.0, 5.0)])
  table = fit_cli.load_results(path)
  assert table["loss"][0] == pytest.approx(4.0)
  assert table["D"][0] == pytest.approx(1e8)


@pytest.mark.parametrize("header,rows,match", [
    (["N", "loss"], [(1e6, 3.0)], "D or C"),
    (["N", "D", "status", "loss"], [(1e6, 1e8, "failed", 3.0)], "no run with status 'ok'"),
    (["N", "D", "loss"], [(1e6, 1e8, "nan")], "non-finite"),
    (["N", "D", "loss"], [(1e6, 1e8, "abc")], "not a number"),
    (["N", "D", "loss"], [(-1, 1e8, 3.0)], "non-positive"),
])
def test_bad_tables(tmp_path, header, rows, match):
  path = write_csv(tmp_path / "r.csv", header, rows)
  with pytest.raises(laws.ScalingFitError, match=match):
    fit_cli.load_results(path)


def test_too_few_points():
  n, d, loss = synthetic_runs()
  with pytest.raises(laws.ScalingFitError, match="at least 5 runs"):
    laws.fit_chinchilla(n[:4], d[:4], loss[:4])
  n, d, loss = isoflop_runs(budgets=(1e17,), sizes=9)
  with pytest.raises(laws.ScalingFitError, match="at least 2 FLOP budgets"):
    laws.fit_isoflop(n, d, loss)
  with pytest.raises(laws.ScalingFitError, match="non-finite"):
    laws.fit_envelope([1e6, np.inf], [1e8, 1e9], [3.0, 2.9])


@pytest.mark.e2e
def test_cli_bad_input_exits_nonzero_with_one_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "loam.scaling.fit", "--results", str(tmp_path / "missing.csv")],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:") and "--results" in lines[0]
