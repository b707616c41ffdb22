"""End-to-end behaviour of `python -m loam.train` and `python -m loam.eval`, run as real
subprocesses on the bundled corpus: metrics, exact resume after SIGKILL, fallback from a damaged
checkpoint, SIGTERM, the non-finite-loss stop, a different mesh on resume, and eval output."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import CONFIG, SMALL, env, losses, rewind, run_train

pytestmark = pytest.mark.e2e


def test_run_directory_contents(reference_run):
    w = reference_run
    config = json.loads((w / "config.json").read_text())
    assert config["steps"] == 12 and config["model"]["size"] == "nano"
    records = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    first, last = records[0], records[-1]
    for key in ("loss", "lr", "tokens_per_s", "mfu", "grad_norm", "mixture_weights",
                "loss_per_domain", "tokens_consumed"):
        assert key in last, key
    assert set(last["mixture_weights"]) == set(config["data"]["domains"])
    assert last["loss"] < first["loss"]
    assert 0 < last["mfu"] < 1
    events = list((w / "tensorboard" / "train").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 8, 12]
    final_eval = json.loads((w / "eval" / "step_12.json").read_text())
    assert set(final_eval["per_domain"]) == set(config["data"]["domains"])


def test_tensorboard_events_are_readable(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(reference_run / "tensorboard" / "train"))
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "loss" in scalars and "lr" in scalars
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 13))


def test_resume_after_sigkill_is_exact(reference_run, tmp_path):
    """Kill -9 mid-run, restart: the loss curve equals the uninterrupted one."""
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
           *SMALL]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until a checkpoint beyond step 4 exists, then kill
        if (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(tmp_path))
    assert killed_at < 12, "the run finished before it could be killed"
    run_train(tmp_path)
    ref, got = losses(reference_run), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s


def test_damaged_latest_checkpoint_falls_back(reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    rewind(tmp_path, 8)
    latest = tmp_path / "checkpoints" / "8"
    # Damage every array file of the newest checkpoint's state.
    damaged = 0
    for f in (latest / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\x00" * f.stat().st_size)
            damaged += 1
    assert damaged
    proc = run_train(tmp_path)
    assert "checkpoint 8 is corrupt or incomplete" in proc.stdout
    assert "resumed from checkpoint at step 4" in proc.stdout
    ref, got = losses(reference_run), losses(tmp_path)
    for s in range(5, 13):
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
           *SMALL, "--config.steps=400", "--config.checkpoint_every=1000"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved checkpoint at step" in out
    steps = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 3 <= steps[0] < 400


def test_non_finite_loss_stops_with_message_and_keeps_checkpoint(tmp_path):
    proc = run_train(tmp_path, "--config.optim.lr=1e30", "--config.optim.clip_norm=1e30",
                     "--config.optim.warmup_steps=0", "--config.optim.schedule=constant",
                     check=False)
    assert proc.returncode != 0
    assert "loss became non-finite" in proc.stderr
    assert "Lower optim.lr" in proc.stderr


def test_resume_on_a_different_mesh(reference_run, tmp_path):
    shutil.copytree(reference_run, tmp_path, dirs_exist_ok=True)
    rewind(tmp_path, 8)
    run_train(tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    ref, got = losses(reference_run), losses(tmp_path)
    for s in range(9, 13):
        assert got[s] == pytest.approx(ref[s], rel=1e-4), s


def test_eval_cli_writes_per_domain_results(reference_run):
    proc = subprocess.run([sys.executable, "-m", "loam.eval", f"--workdir={reference_run}",
                           "--all"], env=env(1), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for s in (4, 8, 12):
        rec = json.loads((reference_run / "eval" / f"step_{s}.json").read_text())
        for v in rec["per_domain"].values():
            assert v["loss"] > 0 and v["bits_per_byte"] > 0 and v["unigram_loss"] > 0
        assert rec["loss_token_weighted"] > 0
    bad = subprocess.run([sys.executable, "-m", "loam.eval", f"--workdir={reference_run}",
                          "--step", "5"], env=env(1), capture_output=True, text=True)
    assert bad.returncode != 0 and "no checkpoint for step(s) [5]" in bad.stderr


def test_bad_config_fails_with_one_clear_message(tmp_path):
    proc = run_train(tmp_path, "--config.data.weights=bogus-recipe", check=False)
    assert proc.returncode != 0
    assert "bogus-recipe" in proc.stderr


def test_parameters_only_load_on_any_device_count(reference_run):
    """What a notebook calls: the parameters of a run trained on 8 devices, on 1 device, without
    the optimizer state; equal to those of the full training-layout restore."""
    import jax
    import numpy as np

    from loam import run as run_lib

    params, run, step = run_lib.load_params(reference_run, devices=jax.devices()[:1])
    assert step == 12 and run.mesh.devices.size == 1
    leaves = jax.tree.leaves(params)
    assert all(len(x.sharding.device_set) == 1 for x in leaves)
    full = run_lib.open_run(reference_run)
    state, _ = full.restore(12)
    for a, b in zip(leaves, jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    run.close()
    full.close()
