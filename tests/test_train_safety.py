"""Nothing a user already has is lost by `python -m loam.train`, whatever they do: a changed
model on resume, damaged checkpoints, two processes on one workdir, bad intervals, a SIGTERM
during the first compile, kills at random points (even mid-save), a full disk. Each bad input
gives one `error:` line and a non-zero exit; each data-loss case checks every file that existed
before is still there, byte for byte."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CONFIG, SMALL, env, losses, rewind, run_train

pytestmark = pytest.mark.e2e


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def copy_of(reference_run, tmp_path) -> Path:
    w = tmp_path / "run"
    shutil.copytree(reference_run, w)
    return w


def test_resume_with_a_changed_model_is_refused_and_changes_nothing(reference_run, tmp_path):
    w = copy_of(reference_run, tmp_path)
    rewind(w, 8)
    before = tree_digest(w)
    proc = run_train(w, "--config.model.size=micro", check=False)
    line = one_error_line(proc)
    assert "model.size" in line and "'nano'" in line and "new workdir" in line
    assert tree_digest(w) == before  # config.json, checkpoints, metrics, eval: all untouched


def test_a_shape_change_the_config_check_misses_is_a_mismatch_not_damage(reference_run,
                                                                         tmp_path):
    """Tied -> untied embeddings under the same size name: caught by comparing the checkpoint's
    tree, reported as a mismatch; no checkpoint is moved aside, nothing is retrained."""
    w = copy_of(reference_run, tmp_path)
    saved = json.loads((w / "config.json").read_text())
    saved["model"]["tied_embeddings"] = True  # pretend the run was configured so
    (w / "config.json").write_text(json.dumps(saved))
    before = tree_digest(w)
    proc = run_train(w, "--config.model.tied_embeddings=true", "--config.steps=16", check=False)
    line = one_error_line(proc)
    assert "different model" in line and "corrupt" not in proc.stdout
    assert tree_digest(w) == before


def test_every_checkpoint_damaged_stops_and_moves_them_aside(reference_run, tmp_path):
    w = copy_of(reference_run, tmp_path)
    for f in (w / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts and "metadata" not in f.name and f.stat().st_size:
            f.write_bytes(b"\x00" * f.stat().st_size)
    metrics_before = (w / "metrics.jsonl").read_bytes()
    proc = run_train(w, check=False)
    line = one_error_line(proc)
    assert "every checkpoint" in line and "damaged" in line
    assert not [p for p in (w / "checkpoints").iterdir() if p.name.isdigit()]
    moved = sorted(p.name.split(".")[0] for p in (w / "checkpoints" / "damaged").iterdir())
    assert moved == ["12", "4", "8"]  # renamed, never deleted
    assert (w / "metrics.jsonl").read_bytes() == metrics_before  # no step 0 restart


@pytest.mark.parametrize("flag, value", [("checkpoint_every", 0), ("log_every", 0),
                                         ("eval_every", 0), ("optim.lr", "nan"),
                                         ("optim.lr", "-1")])
def test_bad_intervals_and_learning_rates_fail_before_training(tmp_path, flag, value):
    proc = run_train(tmp_path / "w", f"--config.{flag}={value}", check=False)
    line = one_error_line(proc)
    assert flag in line
    assert not (tmp_path / "w" / "metrics.jsonl").exists()
    assert not (tmp_path / "w" / "config.json").exists()


def test_a_short_run_clamps_its_warmup(tmp_path):
    proc = run_train(tmp_path, "--config.steps=3", "--config.optim.warmup_steps=30")
    assert "warmup_steps=30 exceeds steps=3" in proc.stdout
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["warmup_steps"] == 0
    assert sorted(losses(tmp_path)) == [1, 2, 3]


def test_sigterm_during_the_first_compile_saves_a_checkpoint(tmp_path):
    cmd = [sys.executable, "-u", "-m", "loam.train", f"--config={CONFIG}",
           f"--workdir={tmp_path}", *SMALL, "--config.steps=400"]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:  # the banner is printed just before the first step compiles
        if line.startswith("model nano"):
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "SIGTERM: saved checkpoint at step 1" in out
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


def test_a_second_process_on_the_same_workdir_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
           *SMALL, "--config.steps=400", "--config.checkpoint_every=1000"]
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
            time.sleep(0.1)
        second = run_train(tmp_path, check=False)
        line = one_error_line(second)
        assert "in use" in line and str(first.pid) in line
        assert first.poll() is None  # the first run is unharmed
    finally:
        first.kill()
        first.wait()
    # The dead holder's lock is taken over: the run resumes (from scratch: no checkpoint yet).
    run_train(tmp_path, "--config.steps=2")


def test_chaos_kills_at_random_points_resume_to_the_same_curve(reference_run, tmp_path):
    """SIGKILL at seeded random moments (some land mid-save, checkpoints every 2 steps), then
    resume each time; the final curve equals the uninterrupted one."""
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={tmp_path}",
           *SMALL, "--config.checkpoint_every=2", "--config.keep_checkpoints=3"]
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        done_before = len(losses(tmp_path)) if (tmp_path / "metrics.jsonl").exists() else 0
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # until it trains a new step
            if (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) > done_before:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    run_train(tmp_path, "--config.checkpoint_every=2", "--config.keep_checkpoints=3")
    ref, got = losses(reference_run), losses(tmp_path)
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_fails_clearly_and_keeps_what_was_saved(reference_run, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        w = mount / "run"
        proc = run_train(w, "--config.checkpoint_every=1", "--config.keep_checkpoints=50",
                         check=False)
        line = one_error_line(proc)
        assert "No space left" in line or "disk" in line
        # What was saved before the disk filled up is intact: it resumes on a roomier disk.
        roomy = tmp_path / "roomy"
        shutil.copytree(w, roomy)
        saved = [p for p in (roomy / "checkpoints").iterdir() if p.name.isdigit()]
        assert saved, "not even one checkpoint fitted; make the tmpfs larger"
        run_train(roomy)
        ref, got = losses(reference_run), losses(roomy)
        for s in ref:
            assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=1e-6), s
    finally:
        subprocess.run(["umount", "-l", str(mount)])

