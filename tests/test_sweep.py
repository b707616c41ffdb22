"""Sweeps: expansion into runs with stable ids, bad sweep configs, launch commands, and a real
micro sweep run through `python -m loam.sweep` (a finished run is skipped on rerun, a failing run
is marked failed while the others finish, the results table is complete and fit-ready)."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from loam import sweep
from loam.configs import default
from loam.data.corpora import DOMAIN_NAMES
from loam.model import sizes

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = list(DOMAIN_NAMES)  # the default config's sources: every run's eval domains


def _sweep(axes, **extra):
    s = ml_collections.ConfigDict()
    s.base = default.get_config("size=nano,seq_len=32,batch_size=4,steps=4")
    s.axes = axes
    for k, v in extra.items():
        s[k] = v
    return s


def test_expansion_is_a_product_with_zipped_keys_and_derived_sizes():
    runs = sweep.expand(_sweep([
        {"params": [2e4, 8e4], "optim.lr": [1e-2, 3e-3]},  # zipped: one rate per size
        {"flops": [1e10, 4e10]},
        {"seed": [0, 1, 2]},
    ], warmup_fraction=0.25))
    assert len(runs) == 2 * 2 * 3
    assert len({r.run_id for r in runs}) == len(runs)
    for r in runs:
        c = r.config
        assert c["optim"]["lr"] == {2e4: 1e-2, 8e4: 3e-3}[r.values["params"]]
        picked = sizes.pick_size(r.values["params"], 8192)
        assert (c["model"]["d_model"], c["model"]["n_layers"], c["model"]["mlp_dim"]) == (
            picked.d_model, picked.n_layers, picked.mlp_dim)
        n = sizes.count_params(picked)["non_embedding"]
        # IsoFLOP: D = C / 6N, rounded to whole steps of batch_size * seq_len tokens.
        assert c["steps"] == max(1, round(r.values["flops"] / (6 * n) / (4 * 32)))
        assert c["optim"]["warmup_steps"] == max(1, round(0.25 * c["steps"]))
        assert c["seed"] == r.values["seed"]
    # The named size is overridden by the picked shape in the trainer's model config.
    from loam import run as run_lib
    model_cfg = run_lib.model_config(ml_collections.ConfigDict(runs[0].config), 8192)
    assert sizes.count_params(model_cfg)["non_embedding"] == sizes.count_params(
        sizes.pick_size(2e4, 8192))["non_embedding"]


def test_ids_are_stable_and_change_only_where_values_change():
    axes = [{"optim.lr": [1e-3, 3e-3]}, {"seed": [0, 1]}]
    first = [r.run_id for r in sweep.expand(_sweep(axes))]
    assert first == [r.run_id for r in sweep.expand(_sweep(axes))]
    edited = [r.run_id
              for r in sweep.expand(_sweep([{"optim.lr": [1e-3, 1e-2]}, {"seed": [0, 1]}]))]
    assert edited[:2] == first[:2]  # lr=1e-3 runs keep their ids
    assert not set(edited[2:]) & set(first)
    assert all("lr=" in i and "seed=" in i for i in first)


def test_tokens_per_param_and_holdout():
    runs = sweep.expand(_sweep([{"params": [3e4]}, {"tokens_per_param": [20]}],
                               holdout=[{"params": 6e4, "tokens_per_param": 20}]))
    grid, held = runs
    assert not grid.holdout and held.holdout and held.run_id.startswith("holdout_")
    n = sizes.count_params(sizes.pick_size(6e4, 8192))["non_embedding"]
    assert held.config["steps"] == round(20 * n / 128)


@pytest.mark.parametrize("axes, message", [
    ([{"optim.lrr": [1e-3]}], "'optim' has fields accum_steps"),
    ([{"nosuch": [1]}], "top level of the base config"),
    ([{"optim": [1]}], "whole section"),
    ([], "grid is empty"),
    ([{"optim.lr": []}], "grid is empty"),
    ([{"optim.lr": [1e-3], "seed": [0, 1]}], "different lengths"),
    ([{"seed": 3}], "not a list"),
    ([{"seed": [1, 1]}], "same values"),
    ([{"flops": [1e10], "tokens": [1e5]}], "one of tokens"),
])
def test_bad_sweeps_name_the_fix(axes, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.expand(_sweep(axes))


SWEEP_FILE = """
import ml_collections
from loam.configs import default

def get_config(arg=None):
    n = int(arg or 3)
    c = ml_collections.ConfigDict()
    c.base = default.get_config("size=nano,seq_len=32,batch_size=4,steps=3")
    c.base.eval_tokens = 128
    c.base.eval_batch_size = 4
    c.base.eval_every = c.base.checkpoint_every = 1000
    c.base.optim.warmup_steps = 1
    c.base.mesh.data = 1
    # zipped: the third run asks for a schedule train does not know, so it fails
    c.axes = [{"seed": [0, 1, 2][:n], "optim.schedule": ["cosine", "constant", "bogus"][:n]}]
    return c
"""


def _cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    return subprocess.run([sys.executable, "-m", "loam.sweep", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def test_list_prints_one_launch_command_per_run(tmp_path, capsys):
    cfg = tmp_path / "s.py"
    cfg.write_text(SWEEP_FILE)
    assert sweep.main(["sweep", "--config", str(cfg), "--workdir", str(tmp_path / "w"),
                       "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    runs = sweep.expand(sweep.load_sweep(str(cfg)))
    assert len(lines) == len(runs) == 3
    for line, run in zip(lines, runs):
        argv = shlex.split(line)
        assert argv[1:3] == ["-m", "loam.train"]
        assert argv[4] == f"--workdir={tmp_path / 'w' / 'runs' / run.run_id}"
        # The --config argument is loam/sweep.py:<materialised run config>.
        path = argv[3].removeprefix("--config=").split(":", 1)[1]
        assert sweep.get_config(path).to_dict() == run.config
    assert not (tmp_path / "w" / "results.csv").exists()


def test_unknown_field_is_a_cli_error(tmp_path, capsys):
    cfg = tmp_path / "s.py"
    cfg.write_text(SWEEP_FILE.replace('"optim.schedule"', '"optim.shedule"'))
    with pytest.raises(SystemExit) as e:
        sweep.main(["sweep", "--config", str(cfg), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 1
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("error: ")
    assert "optim.shedule" in err and "schedule" in err and "warmup_steps" in err


def _table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_micro_sweep_resumes_skips_finished_runs_and_marks_failures(tmp_path, capsys):
    cfg = tmp_path / "s.py"
    cfg.write_text(SWEEP_FILE)
    work = tmp_path / "w"
    # Part of the sweep first (its first run only), as if the sweep had been stopped.
    first = _cli("--config", f"{cfg}:1", "--workdir", str(work))
    assert first.returncode == 0, first.stdout + first.stderr
    runs = sweep.expand(sweep.load_sweep(str(cfg)))
    done = work / "runs" / runs[0].run_id
    snapshot = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    assert any("checkpoints" in str(p) for p in snapshot)
    assert len(_table(work / "results.csv")) == 1

    full = _cli("--config", str(cfg), "--workdir", str(work), "--parallel", "2")
    assert full.returncode == 1, full.stdout + full.stderr  # one run failed
    assert json.loads(full.stdout.strip().splitlines()[-1]) == {"ok": 1, "failed": 1, "skipped": 1}
    # The finished run was not trained again: none of its files changed.
    assert {p: p.stat().st_mtime_ns for p in snapshot} == snapshot
    assert (done / "train.log").read_text().count("=== sweep launch") == 1

    rows = {r["run_id"]: r for r in _table(work / "results.csv")}
    assert list(rows) == [r.run_id for r in runs]  # complete, in sweep order
    header = list(next(iter(rows.values())))
    for col in ["run_id", "status", "seed", "optim.schedule", "N", "N_total", "D", "C", "C_attn",
                "loss", "wall_seconds", "error"] + [
                    f"loss/{d}" for d in DOMAINS]:
        assert col in header, col
    ok, bad = [rows[r.run_id] for r in runs[:2]], rows[runs[2].run_id]
    nano = sizes.count_params(sizes.get_size("nano", 8192, tied_embeddings=False))
    for row in ok:
        assert row["status"] == "ok" and row["error"] == ""
        assert int(row["N"]) == nano["non_embedding"] and int(row["N_total"]) == nano["total"]
        assert int(row["D"]) == 3 * 4 * 32
        assert float(row["C"]) == 6 * int(row["N"]) * int(row["D"])
        assert float(row["C_attn"]) > float(row["C"])
        domain_losses = [float(row[f"loss/{d}"]) for d in DOMAINS]
        assert abs(float(row["loss"]) - sum(domain_losses) / 5) < 1e-9
        assert float(row["wall_seconds"]) > 0
    assert bad["status"] == "failed" and "bogus" in bad["error"] and bad["loss"] == ""

    # The fitter reads the table, drops the failed row and says so; two runs are too few.
    from loam.scaling import fit as fit_lib
    with pytest.raises(SystemExit) as e:
        fit_lib.main(["--results", str(work)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "status is not 'ok'" in err and "needs at least" in err

    # --collect rebuilds the same table from the run directories.
    before = (work / "results.csv").read_text()
    (work / "results.csv").unlink()
    assert sweep.main(["sweep", "--config", str(cfg), "--workdir", str(work), "--collect"]) == 0
    assert (work / "results.csv").read_text() == before


def _write_rows(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("shift", [1.0, 16.0])
def test_fit_predicts_holdout_and_flags_unbracketed_budgets(tmp_path, shift):
    from loam.scaling.laws import ChinchillaLaw
    law = ChinchillaLaw(E=1.8, A=480.0, B=2100.0, alpha=0.35, beta=0.37)
    rows = []
    for C in (1e18, 1e19, 1e20):
        n_opt = float(law.compute_optimal(C)[0])
        for k in (0.25, 0.5, 1.0, 2.0, 4.0):
            N = n_opt * k * shift
            D = C / (6 * N)
            rows.append({"run_id": f"{C:g}-{k}", "status": "ok", "N": N, "D": D,
                         "loss": float(law.loss(N, D))})
    rows.append({"run_id": "broken", "status": "failed", "N": 1e8, "D": 1e9, "loss": ""})
    _write_rows(tmp_path / "results.csv", rows)
    N, D = 3e9, 6e10
    _write_rows(tmp_path / "holdout.csv", [{"run_id": "big", "status": "ok", "N": N, "D": D,
                                            "loss": float(law.loss(N, D))}])
    report = sweep.fit_and_predict(tmp_path)
    assert any("status is not 'ok'" in w for w in report["warnings"])
    (held,) = report["holdout"]
    assert abs(held["loss"]["relative_error"]) < 0.01
    unbracketed = [w for w in report["warnings"] if "does not bracket" in w]
    assert bool(unbracketed) == (shift > 1)


# ------------------------------------------------------------------- the LR x curriculum grid

def test_lr_curriculum_grid_is_a_sweep_of_every_cell_and_seed():
    from loam.configs import lr_curriculum as grid

    spec = "loam/configs/lr_curriculum.py:seeds=2,steps=24,size=nano"
    runs = sweep.expand(sweep.load_sweep(spec))
    assert len(runs) == len(grid.LR) * len(grid.ORDERS) * 2 == 12
    from loam.experiments import lr_curriculum as summary
    cells = sorted((*summary._cell(r.config), r.config["seed"]) for r in runs)
    assert cells == sorted((o, lr, s) for o in grid.ORDERS for lr in grid.LR for s in (0, 1))
    for r in runs:
        (stage,) = r.config["data"]["stages"]
        assert f"stages={stage['name']}" in r.run_id
        schedule, final = grid.LR[summary._cell(r.config)[1]]
        assert (r.config["optim"]["schedule"], r.config["optim"]["final_lr_fraction"]) == (
            schedule, final)
        ordered = {"quality:asc"} if stage["name"] == "asc" else set()
        assert set(stage["order"].values()) == ordered
        assert stage["keep"] == runs[0].config["data"]["stages"][0]["keep"]  # same documents
        assert r.config["checkpoint_every"] == 2 and r.config["keep_checkpoints"] == 4
    with pytest.raises(Exception, match="steps >= 12"):
        sweep.load_sweep("loam/configs/lr_curriculum.py:steps=8")


def test_lr_curriculum_summary_pairs_seeds():
    from loam.experiments import lr_curriculum as summary

    rows, gains = [], []
    for seed, (rand, asc) in enumerate([(3.0, 2.9), (3.2, 3.0), (3.1, 3.05)]):
        for cell in summary.CELLS:
            rows += [{"seed": seed, "order": "random", "lr": cell, "loss": rand},
                     {"seed": seed, "order": "asc", "lr": cell, "loss": asc}]
        gains.append(rand - asc)
    rows.append({"seed": 7, "order": "asc", "lr": "cosine", "loss": 9.0})  # unpaired: ignored
    out = summary.summarise(rows)
    assert list(out) == list(summary.CELLS)
    s = out["cosine"]
    assert s["seeds"] == 3 and s["curriculum_gain"] == pytest.approx(np.mean(gains))
    assert s["gain_se"] == pytest.approx(np.std(gains, ddof=1) / np.sqrt(3))
    assert s["random_mean"] == pytest.approx(3.1) and s["asc_mean"] == pytest.approx(2.983333333)


@pytest.mark.e2e
@pytest.mark.slow
def test_lr_curriculum_grid_trains_through_the_sweep_and_summarises(tmp_path):
    work = tmp_path / "grid"
    proc = _cli("--config", "loam/configs/lr_curriculum.py:seeds=1,steps=12,size=nano",
                "--workdir", str(work), "--parallel", "2", "--config.base.eval_tokens=1024")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ok": 6, "failed": 0, "skipped": 0}
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "loam.experiments.lr_curriculum", "--workdir",
                           str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((work / "results.json").read_text())
    assert list(result["summary"]) == ["constant", "cosine", "moderate", "moderate+avg"]
    for cell in result["summary"].values():
        assert cell["seeds"] == 1
        assert 4.0 < cell["random_mean"] < 9.2 and 4.0 < cell["asc_mean"] < 9.2
    averaged = sorted(work.glob("runs/*/avg_last4/averaged.json"))
    assert len(averaged) == 2
    assert all(json.loads(p.read_text())["steps"] == [9, 10, 11, 12] for p in averaged)
    assert "| moderate+avg |" in (work / "results.md").read_text()
    assert (work / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_saved_with_its_resolved_config_counts_as_finished(tmp_path):
    """loam.train saves the resolved config (a warmup longer than a short run is clamped); the
    sweep must recognise that run as its own, or every rerun would train it again."""
    from loam import run as run_lib

    base = default.get_config("size=nano,steps=3")  # warmup 30 > 3 steps: clamped to 0
    sw = ml_collections.ConfigDict({"base": base, "axes": [{"seed": [0]}]})
    (r,) = sweep.expand(sw)
    d = sweep.materialise(tmp_path, r).parent
    (d / "checkpoints" / "3").mkdir(parents=True)
    (d / "eval").mkdir()
    (d / "eval" / "step_3.json").write_text(json.dumps(
        {"per_domain": {dom: {"loss": 3.0} for dom in DOMAINS}}))
    resolved, notes = run_lib.resolve_config(ml_collections.ConfigDict(r.config))
    assert notes and resolved.optim.warmup_steps == 0
    (d / "config.json").write_text(resolved.to_json_best_effort())
    assert sweep.is_finished(tmp_path, r)
    other = ml_collections.ConfigDict(r.config)
    other.seed = 5  # a different run's config is not mistaken for this one's
    (d / "config.json").write_text(other.to_json_best_effort())
    assert not sweep.is_finished(tmp_path, r)
