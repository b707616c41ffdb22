"""CMR law (critical mixture ratio of continual pretraining): recovery of known constants from
synthetic runs with noise, the critical ratio, the budget law R(T), bootstrap, holdout, CLI and
bad input."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from loam.scaling import cmr
from loam.scaling import fit as fit_cli
from loam.scaling.parametric import ScalingFitError

REPO = pathlib.Path(__file__).resolve().parents[1]
TRUTH = cmr.CMRLaw(L0=3.0, A=5.6e-4, a=1.5, b=0.3, B=1.5e-3, c=0.2)
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
BUDGETS = np.logspace(7, 9, 7)  # 10M .. 1B tokens


def synthetic_runs(noise=0.001, seed=0, ratios=RATIOS, budgets=BUDGETS):
  r, t = map(np.ravel, np.meshgrid(ratios, budgets))
  rng = np.random.default_rng(seed)
  return r, t, TRUTH.loss(r, t) * np.exp(noise * rng.standard_normal(r.size))


def test_critical_ratio_is_the_largest_share_within_tolerance():
  T = np.array([1e7, 1e8, 1e9])
  cmr_T = TRUTH.critical_ratio(T, 0.05)
  np.testing.assert_allclose(TRUTH.delta(cmr_T, T), 0.05, atol=1e-9)  # on the boundary
  assert np.all(TRUTH.delta(cmr_T + 1e-3, T) > 0.05)
  assert np.all(np.diff(cmr_T) < 0)  # longer continual training forgets more at a given share
  assert TRUTH.critical_ratio([1e7], 10.0)[0] == 1.0  # a loose tolerance admits every share
  steep = cmr.CMRLaw(L0=3.0, A=1.0, a=1.0, b=0.5, B=0.0, c=0.2)
  assert steep.critical_ratio([1e8], 0.05)[0] == pytest.approx(0.05 / 1e4, rel=1e-6)
  assert TRUTH.loss(0.0, 0.0) == TRUTH.L0


def test_fit_recovers_known_law_and_critical_ratio():
  r, t, l = synthetic_runs()
  fit = cmr.fit_cmr(r, t, l, start_loss=3.0)
  assert fit.converged
  got = fit.law
  assert got.a == pytest.approx(TRUTH.a, rel=0.03)
  assert got.b == pytest.approx(TRUTH.b, rel=0.05)
  assert got.c == pytest.approx(TRUTH.c, rel=0.1)
  assert got.A == pytest.approx(TRUTH.A, rel=0.2)
  assert got.B == pytest.approx(TRUTH.B, rel=0.2)
  np.testing.assert_allclose(got.critical_ratio(BUDGETS, 0.05),
                             TRUTH.critical_ratio(BUDGETS, 0.05), atol=0.01)


def test_budget_law_recovers_known_constants():
  truth = cmr.BudgetLaw(beta0=0.1, beta1=30.0, s=-0.25)
  T = np.logspace(7, 9.5, 8)
  rng = np.random.default_rng(0)
  fit = cmr.fit_budget_law(T, truth(T) + 0.002 * rng.standard_normal(T.size))
  assert fit.converged
  assert fit.law.s == pytest.approx(truth.s, abs=0.04)
  assert fit.law.beta0 == pytest.approx(truth.beta0, abs=0.03)
  assert fit.law(1e11) == pytest.approx(truth(1e11), abs=0.02)  # 30x beyond the last budget


def test_procedure_fits_r_of_t_and_extrapolates():
  r, t, l = synthetic_runs()
  res = cmr.fit_cmr_law(r, t, l, start_loss=3.0, tolerance=0.05)
  np.testing.assert_array_equal(res.budget.T, BUDGETS)
  np.testing.assert_allclose(res.budget.law(BUDGETS), res.budget.R, atol=0.01)
  pred = res.predict(np.array([1e10]))
  truth = TRUTH.critical_ratio([1e10], 0.05)[0]
  assert pred["cmr_loss_law"][0] == pytest.approx(truth, abs=0.03)
  # R(T) is the paper's form, not this loss law's exact CMR curve: 10x out it drifts further.
  assert pred["cmr_budget_law"][0] == pytest.approx(truth, abs=0.07)


def test_start_loss_from_rows_at_zero_tokens():
  r, t, l = synthetic_runs()
  with_start = cmr.fit_cmr(np.r_[0.0, r], np.r_[0.0, t], np.r_[3.0, l])
  given = cmr.fit_cmr(r, t, l, start_loss=3.0)
  assert with_start.law.L0 == 3.0 and with_start.n_points == r.size
  assert with_start.raw == given.raw


def test_bootstrap_intervals_contain_truth():
  # 95% intervals of five correlated constants: at some noise seeds one misses its constant
  # narrowly (seed 1: A and b), as intervals do; seed 0 is the one these tests use throughout.
  r, t, l = synthetic_runs(noise=0.002, seed=0)
  res = cmr.fit_cmr_law(r, t, l, start_loss=3.0)
  boot = cmr.bootstrap_cmr(r, t, l, res, start_loss=3.0, samples=30, seed=0)
  assert boot.raw.shape == (30, 5) and boot.budget_raw.shape == (30, 3)
  intervals = boot.param_intervals()
  for name in cmr.PARAM_NAMES:
    lo, hi = intervals[name]
    assert lo < getattr(TRUTH, name) < hi, (name, lo, hi)
  for name in ("a", "b", "c"):  # the exponents are pinned to within ~15%
    lo, hi = intervals[name]
    assert hi / lo < 1.3, (name, lo, hi)
  b0_lo, b0_hi = intervals["beta0"]
  assert b0_hi > b0_lo  # each resample has its own budget law
  # CMR inside the budgets the runs cover (at their edge, 1e9, this seed's interval misses the
  # truth by 0.003: percentile intervals from 30 resamples of 49 points under-cover there).
  (lo,), (hi,) = boot.predict(np.array([1e8]))["cmr_loss_law"]
  assert lo < TRUTH.critical_ratio([1e8], 0.05)[0] < hi
  assert hi - lo < 0.05


def test_holdout_fits_short_runs_and_predicts_long_ones():
  r, t, l = synthetic_runs()
  short, held = cmr.holdout(r, t, l, t > 2.2e8, start_loss=3.0)
  assert held.rows.size == 2 * len(RATIOS)
  assert short.fit.n_points == r.size - held.rows.size
  assert held.as_dict()["max_abs_error"] < 0.02
  pred = short.predict(np.array([1e9]))
  assert pred["cmr_loss_law"][0] == pytest.approx(TRUTH.critical_ratio([1e9], 0.05)[0], abs=0.02)
  with pytest.raises(ScalingFitError, match="selects no run"):
    cmr.holdout(r, t, l, t > 1e12, start_loss=3.0)
  with pytest.raises(ScalingFitError, match="leaves 4 run"):
    cmr.holdout(r, t, l, ~((t == 1e7) & (r < 0.5)), start_loss=3.0)


@pytest.mark.parametrize("change,match", [
    (lambda r, t, l: (r[:5], t[:5], l[:5]), "at least 6 runs"),
    (lambda r, t, l: (np.where(r > 0.1, 0.1, r), t, l), "3 or more different mixture ratios"),
    (lambda r, t, l: (r, np.full_like(t, 1e8), l), "2 or more token counts"),
    (lambda r, t, l: (r * 100, t, l), "in \\[0, 1\\]"),
    (lambda r, t, l: (r, -t, l), "tokens must be >= 0"),
    (lambda r, t, l: (r, t, -l), "non-positive"),
])
def test_bad_points_are_one_clear_error(change, match):
  with pytest.raises(ScalingFitError, match=match):
    cmr.fit_cmr(*change(*synthetic_runs()), start_loss=3.0)


def test_bad_procedure_input():
  r, t, l = synthetic_runs()
  with pytest.raises(ScalingFitError, match="start_loss"):
    cmr.fit_cmr(r, t, l)
  with pytest.raises(ScalingFitError, match="tolerance"):
    cmr.fit_cmr_law(r, t, l, start_loss=3.0, tolerance=0.0)
  few = synthetic_runs(budgets=(1e7, 1e8, 1e9))
  with pytest.raises(ScalingFitError, match="4 or more different token budgets, got 3"):
    cmr.fit_cmr_law(*few, start_loss=3.0)


def _write(path, rows, header=("ratio", "tokens", "status", "loss/general")):
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)
  return path


@pytest.mark.e2e
def test_cli_writes_json_and_plots(tmp_path):
  r, t, l = synthetic_runs()
  rows = [(0.0, 0, "ok", 3.0)] + [(a, b, "ok", c) for a, b, c in zip(r, t, l)]
  rows.append((0.5, 1e8, "failed", ""))
  path = _write(tmp_path / "cmr.csv", rows)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "loam.scaling.fit", "--results", str(path), "--law", "cmr",
       "--general-column", "loss/general", "--predict-at", "1e9,1e10", "--holdout",
       "tokens>2.2e8", "--bootstrap", "8", "--out", str(out)],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env={**os.environ, "PYTHONPATH": str(REPO)})
  assert proc.returncode == 0, proc.stderr
  assert "dropping 1 run(s)" in proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["law"] == "cmr" and report["loss_law"]["L0"] == 3.0
  assert set(report) >= {"beta0", "beta1", "s", "budget_law", "predictions", "holdout"}
  p1e10 = report["predictions"][1]
  assert p1e10["T"] == 1e10 and p1e10["extrapolated"]
  assert p1e10["cmr_loss_law"] == pytest.approx(TRUTH.critical_ratio([1e10], 0.05)[0], abs=0.03)
  lo, hi = p1e10["cmr_loss_law_interval"]
  assert lo <= p1e10["cmr_loss_law"] <= hi
  assert report["holdout"]["n_heldout"] == 2 * len(RATIOS)
  assert [c["T"] for c in report["holdout"]["cmr"]] == list(BUDGETS[-2:])
  for name in ("general_loss.png", "cmr.png"):
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,match", [
    (["--law", "cmr"], "lacks column(s) loss"),
    (["--law", "cmr", "--general-column", "loss/general", "--holdout", "tokens<3"],
     "not COLUMN>VALUE"),
    (["--law", "cmr", "--general-column", "loss/general", "--holdout", "steps>3"],
     "names column 'steps'"),
    (["--law", "cmr", "--general-column", "loss/general", "--predict-at", "1e9,-1"],
     "--predict-at must be positive"),
    (["--law", "chinchilla", "--tolerance", "0.1"], "--tolerance belongs to --law cmr"),
    (["--law", "cmr", "--approach", "all"], "--approach belongs to --law chinchilla"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, args, match):
  r, t, l = synthetic_runs()
  path = _write(tmp_path / "cmr.csv", [(a, b, "ok", c) for a, b, c in zip(r, t, l)])
  with pytest.raises(SystemExit) as e:
    fit_cli.main(["--results", str(path), "--start-loss", "3.0", *args]
                 if "chinchilla" not in args else ["--results", str(path), *args])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error:"), err
  assert match in err[0]


def test_json_points_read_like_csv(tmp_path):
  r, t, l = synthetic_runs()
  path = _write(tmp_path / "cmr.csv", [(a, b, "ok", c) for a, b, c in zip(r, t, l)])
  points = [{"ratio": a, "tokens": b, "status": "ok", "loss/general": c}
            for a, b, c in zip(r, t, l)]
  (tmp_path / "cmr.json").write_text(json.dumps(points))
  from loam.scaling import reports

  a = reports.load_cmr_table(path, "loss/general")
  b = reports.load_cmr_table(tmp_path / "cmr.json", "loss/general")
  for k in ("ratio", "tokens", "loss"):
    np.testing.assert_array_equal(a[k], b[k])
  (tmp_path / "bad.json").write_text('{"runs": 3}')
  with pytest.raises(ScalingFitError, match="list of objects"):
    reports.load_cmr_table(tmp_path / "bad.json")
