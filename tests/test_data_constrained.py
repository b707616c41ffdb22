"""Data-constrained scaling law (Muennighoff et al. 2023): recovery of known constants from
synthetic runs with noise, effective data and parameters, bootstrap, holdout, CLI and bad input.

The paper's own data points cannot be rebuilt offline, so the truth here is a law with its
published R*_D and R*_N; the tests show the fit recovers them.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from loam.scaling import data_constrained as dc
from loam.scaling import laws
from loam.scaling.parametric import ScalingFitError

REPO = pathlib.Path(__file__).resolve().parents[1]
# R*_N, R*_D as published; E, A, B, alpha, beta a Chinchilla-like law.
TRUTH = dc.DataConstrainedLaw(E=1.87, A=521.0, B=1488.0, alpha=0.353, beta=0.353,
                              R_N_star=5.31, R_D_star=15.39)
SUBGRID = laws.initial_grid()[::15]


def synthetic_runs(noise=0.002, seed=0, uniques=(1e8, 1e9, 1e10),
                   epochs=(1, 2, 4, 8, 16, 32, 64)):
  rows = [(n, ep * u, u) for u in uniques for n in np.logspace(7, 9, 5) for ep in epochs]
  N, D, U = map(np.array, zip(*rows))
  rng = np.random.default_rng(seed)
  return N, D, U, TRUTH.loss(N, D, U) * np.exp(noise * rng.standard_normal(N.size))


def test_effective_data_and_params():
  # One epoch is worth its tokens; repetition saturates at U (1 + R*).
  assert dc.effective(1e9, 0.0, 15.0) == pytest.approx(1e9)
  assert dc.effective(1e9, 1e6, 15.0) == pytest.approx(1e9 * 16.0, rel=1e-9)
  # A second epoch is worth almost as much as fresh data: 1 + R* (1 - e^{-1/R*}) ~ 1.97.
  assert TRUTH.effective_data(2e9, 1e9) == pytest.approx(1e9 * (1 + 15.39 * -np.expm1(-1 / 15.39)))
  assert 1.9e9 < TRUTH.effective_data(2e9, 1e9) < 2e9
  # A run shorter than its corpus repeats nothing, and then the law is Chinchilla's.
  chinchilla = laws.ChinchillaLaw(E=1.87, A=521.0, B=1488.0, alpha=0.353, beta=0.353)
  assert TRUTH.loss(1e6, 1e8, 1e10) == pytest.approx(float(chinchilla.loss(1e6, 1e8)), rel=1e-12)
  # Parameters beyond U_D / 20 count for less.
  assert TRUTH.effective_params(1e9, 1e9) < 1e9
  assert TRUTH.effective_params(1e7, 1e9) == pytest.approx(1e7)


def test_fit_recovers_published_repetition_constants():
  N, D, U, L = synthetic_runs()
  fit = dc.fit_data_constrained(N, D, U, L, chinchilla_grid=SUBGRID)
  assert fit.converged
  got = fit.law
  assert got.R_D_star == pytest.approx(TRUTH.R_D_star, rel=0.05)
  assert got.R_N_star == pytest.approx(TRUTH.R_N_star, rel=0.05)
  assert got.E == pytest.approx(TRUTH.E, rel=0.02)
  assert got.alpha == pytest.approx(TRUTH.alpha, rel=0.03)
  assert got.beta == pytest.approx(TRUTH.beta, rel=0.03)
  assert got.A == pytest.approx(TRUTH.A, rel=0.15)
  assert got.B == pytest.approx(TRUTH.B, rel=0.15)
  # A Chinchilla law (no repetition discount) cannot describe the same runs as well.
  plain = laws.fit_chinchilla(N, D, L, grid=SUBGRID)
  assert plain.objective > 5 * fit.objective


def test_bootstrap_intervals_contain_truth():
  N, D, U, L = synthetic_runs(noise=0.004, seed=1)
  fit = dc.fit_data_constrained(N, D, U, L, chinchilla_grid=SUBGRID)
  boot = dc.bootstrap_data_constrained(N, D, U, L, fit, samples=30, seed=0)
  assert boot.raw.shape == (30, 7)
  for name, (lo, hi) in boot.param_intervals().items():
    truth = getattr(TRUTH, name)
    assert lo < truth < hi, (name, lo, truth, hi)
    assert hi / lo < 1.5, (name, lo, hi)
  lo, hi = boot.predict_loss(1e8, 1e11, 1e9)  # 100 epochs of 1e9 tokens
  assert lo < TRUTH.loss(1e8, 1e11, 1e9) < hi


def test_holdout_predicts_more_repetition_than_it_saw():
  N, D, U, L = synthetic_runs()
  fit, held = dc.holdout(N, D, U, L, D / U > 20, chinchilla_grid=SUBGRID)
  assert held.rows.size == 30 and fit.n_points == N.size - 30
  np.testing.assert_array_equal(held.observed, L[D / U > 20])
  assert held.as_dict()["max_rel_error"] < 0.01
  assert fit.law.R_D_star == pytest.approx(TRUTH.R_D_star, rel=0.15)


@pytest.mark.parametrize("change,match", [
    (lambda N, D, U, L: (N[:7], D[:7], U[:7], L[:7]), "at least 8 runs"),
    (lambda N, D, U, L: (N, U, U, L), "repeat their data"),
    (lambda N, D, U, L: (np.minimum(N, U / 40), D, U, L), r"R\*_N"),
    (lambda N, D, U, L: (N, np.where(D > U, 2 * U, D), U, L), "2 different repetition counts"),
    (lambda N, D, U, L: (N, D, -U, L), "non-positive"),
    (lambda N, D, U, L: (N, D, U, np.where(np.arange(L.size) == 3, np.nan, L)), "non-finite"),
    (lambda N, D, U, L: (N, D, U[:-1], L), "different lengths"),
])
def test_bad_input_is_one_clear_error(change, match):
  with pytest.raises(ScalingFitError, match=match):
    dc.fit_data_constrained(*change(*synthetic_runs()), chinchilla_grid=SUBGRID)


def test_bad_tokens_per_param():
  with pytest.raises(ScalingFitError, match="tokens_per_param"):
    dc.fit_data_constrained(*synthetic_runs(), tokens_per_param=0)


@pytest.mark.e2e
def test_cli_fits_a_json_points_file(tmp_path):
  N, D, U, L = synthetic_runs()
  points = [{"N": n, "D": d, "U": u, "loss": l, "status": "ok"} for n, d, u, l in zip(N, D, U, L)]
  points.append({"N": 1e8, "D": 1e9, "U": 1e8, "loss": None, "status": "failed"})
  (tmp_path / "points.json").write_text(json.dumps({"points": points}))
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "loam.scaling.fit", "--results", str(tmp_path / "points.json"),
       "--law", "data_constrained", "--holdout", "epochs>20", "--out", str(out)],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr
  assert "dropping 1 run(s)" in proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["law"] == "data_constrained" and report["n_runs"] == N.size
  assert report["R_D_star"] == pytest.approx(TRUTH.R_D_star, rel=0.05)
  assert report["R_N_star"] == pytest.approx(TRUTH.R_N_star, rel=0.05)
  assert report["holdout"]["n_heldout"] == 30
  for name in ("loss_vs_epochs.png", "observed_vs_predicted.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert json.loads((out / "fit.json").read_text())["R_D_star"] == report["R_D_star"]


def test_cli_refuses_a_table_without_unique_tokens(tmp_path, capsys):
  from loam.scaling import fit as fit_cli

  (tmp_path / "r.csv").write_text("N,D,loss\n1e6,1e8,3.0\n")
  with pytest.raises(SystemExit) as e:
    fit_cli.main(["--results", str(tmp_path / "r.csv"), "--law", "data_constrained"])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:") and "lacks column(s) U" in err[0]
