"""Curves: every run's curves.png, and python -m loam.plot overlaying runs (per-domain loss,
realised mixture weights, downstream metrics). Uses copies of the shared miniature run."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from loam import eval as eval_lib
from loam import hooks, plot
from loam.data import corpora

import helpers


def test_every_run_draws_its_curves(reference_run):
    assert (reference_run / "curves.png").stat().st_size > 0
    assert (reference_run / "schedule.png").exists()
    c = plot.read_curves(reference_run)
    assert c.domains == list(corpora.DOMAIN_NAMES)
    losses = helpers.losses(reference_run)
    for d in corpora.DOMAIN_NAMES:
        steps, values = c.train_loss[d]
        assert list(steps) == list(range(1, 13)) and np.all(values > 0)
        assert list(c.eval_loss[d][0]) == [12]
        w_steps, w = c.weights[d]
        assert np.allclose(w, 0.2)  # the default run's uniform mixture, as realised
    rec = json.loads((reference_run / "eval" / "step_12.json").read_text())
    assert c.eval_loss["code"][1][0] == pytest.approx(rec["per_domain"]["code"]["loss"])
    assert len(losses) == 12


def test_plot_overlays_runs_with_downstream_metrics(reference_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(reference_run, a)
    shutil.copytree(reference_run, b)
    helpers.rewind(b, 8)  # another run: stopped at step 8
    (b / "eval.jsonl").unlink()
    eval_lib.evaluate_workdir(a, all_steps=True, evals_override=[{"kind": "probes", "items": 4}])
    runs = [plot.read_curves(a, "full"), plot.read_curves(b, "stopped")]
    assert list(runs[0].downstream) == ["probes/acc", "probes/acc_norm"]
    assert list(runs[0].downstream["probes/acc"][0]) == [4, 8, 12]
    assert runs[0].chance == {"probes": 0.25}
    assert runs[1].train_loss["code"][0][-1] == 8 and not runs[1].eval_loss
    axes = plot.plot_runs(runs, tmp_path / "out.png")
    assert axes.shape == (3, 5) and (tmp_path / "out.png").stat().st_size > 0
    # per domain: run a's train line and eval markers, run b's train line; one weight line each
    assert all(len(axes[0, j].get_lines()) == 3 for j in range(5))
    assert all(len(axes[1, j].get_lines()) == 2 for j in range(5))
    assert [ln.get_label() for ln in axes[2, 0].get_lines()][:2] == ["full acc", "full acc_norm"]
    x, y = axes[2, 0].get_lines()[0].get_data()
    assert list(x) == [4, 8, 12] and list(y) == list(runs[0].downstream["probes/acc"][1])
    assert axes[0, 0].get_title() == "literature"

    plot.main(["--runs", str(a), str(b), "--out", str(tmp_path / "cli.png"), "--smooth", "3"])
    assert (tmp_path / "cli.png").stat().st_size > 0


def test_plot_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loam.plot", "--runs", str(tmp_path),
                           "--out", str(tmp_path / "x.png")], env=helpers.env(1),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (f"error: {tmp_path} has no metrics.jsonl: give the directory "
                                   "of a run trained by python -m loam.train")



def test_bad_profile_steps_are_refused():
    """(A trace written by a training run: tests/test_evals.py, the training test.)"""
    for bad in ([0], [13], [1.5], [True], ["a"], "5"):
        with pytest.raises(ValueError, match=r"each must be an update number from 1 to "
                                             r"steps=12, e.g. --config.profile_steps='\[5,6\]'"):
            hooks.Profile("unused", bad, 12)
