"""Continual pretraining: a run started from another run's checkpoint (config.init), and the
anneal branched from a checkpoint in the constant phase (loam/configs/anneal.py).

One miniature source run (infinite schedule, checkpoints at 4, 8, 12) is shared by the module;
the source directory is checked unchanged at the end."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from sentencepiece import sentencepiece_model_pb2
from test_online import records

from loam import hooks as hooks_lib
from loam import run as run_lib
from loam import step as step_lib
from loam import train as train_lib
from loam.configs import default
from loam.data import vocab as vocab_lib

from helpers import CONFIG, ROOT, SMALL, env, losses, run_train

SOURCE = [*SMALL, "--config.optim.schedule=infinite"]


def _kill_after_checkpoint(cmd, workdir: Path, step: int) -> None:
    """Start cmd; SIGKILL it once its checkpoint at `step` is complete (orbax's final name)."""
    proc = subprocess.Popen(cmd, env=env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "checkpoints" / str(step)).exists():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("init") / "source"
    run_train(src, *SOURCE, devices=1)
    before = _snapshot(src)
    yield src
    assert _snapshot(src) == before, "the source run was modified"


@pytest.fixture(scope="module")
def fresh(source):
    """A fresh training state of the source's config (on one device), and its shardings."""
    config = run_lib.read_config(source)
    model, optimizer = run_lib.build_model(config), run_lib.build_optimizer(config)
    mesh = run_lib.build_mesh(config, devices=jax.devices()[:1])
    return step_lib.init_state(model, optimizer, jax.random.PRNGKey(1), mesh,
                               config.data.seq_len, config.data.batch_size)


def _state_from(src: Path, fresh, workdir: Path, carry: str, step: int = 8):
    """The training state a run started from `src` begins with (before its first step)."""
    config = run_lib.read_config(src)
    config.init.checkpoint, config.init.carry = f"{src}:{step}", carry
    config, _ = run_lib.resolve_config(config)
    config = run_lib.resolve_init(config, workdir, resuming=False)
    state, shardings = fresh
    state, start, _ = run_lib.restore_init(config, state, shardings)
    return config, jax.device_get(state), jax.device_get(fresh[0]), start


def _adam(opt_state):
    return next(s for s in opt_state if isinstance(s, optax.ScaleByAdamState))


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_each_carry_choice_takes_what_it_names(source, fresh, tmp_path):
    run = run_lib.open_run(source)
    saved = jax.device_get(run.restore(8)[0])
    run.close()
    params, _, _ = run_lib.load_params(source, 8)
    params = jax.device_get(params)

    config, got, zero, start = _state_from(source, fresh, tmp_path / "p", "params")
    assert config.init.to_dict() == {
        "checkpoint": f"{source}:8", "carry": "params", "source": str(source), "step": 8,
        "source_config_sha256": hashlib.sha256(
            (source / "config.json").read_bytes()).hexdigest()}
    assert start == 0 and int(got.step) == 0
    assert _equal(got.params, params) and not _equal(zero.params, params)
    assert _equal(got.opt_state, zero.opt_state)  # moments zero, counts 0

    _, got, zero, start = _state_from(source, fresh, tmp_path / "po", "params+opt")
    assert start == 0 and int(got.step) == 0
    assert _equal(got.params, params)
    adam, theirs = _adam(got.opt_state), _adam(saved.opt_state)
    assert _equal((adam.mu, adam.nu), (theirs.mu, theirs.nu))
    assert np.abs(jax.tree.leaves(adam.mu)[0]).sum() > 0
    assert int(adam.count) == 8  # the moments keep their bias correction
    assert int(got.opt_state[-1].count) == 0  # the schedule starts again
    assert _equal(got.opt_state[-1], zero.opt_state[-1])

    _, got, _, start = _state_from(source, fresh, tmp_path / "all", "all", step=4)
    assert start == 4 and int(got.step) == 4
    run = run_lib.open_run(source)
    assert _equal(got, jax.device_get(run.restore(4)[0]))
    run.close()
    assert int(got.opt_state[-1].count) == 4


def test_a_started_run_records_its_start_and_resumes_bit_exactly_after_sigkill(source,
                                                                                  tmp_path):
    init = [f"--config.init.checkpoint={source}:8", "--config.init.carry=params+opt",
            "--config.steps=12"]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    proc = run_train(ref, *SMALL, *init, devices=1)
    assert f"started from {source} step 8 (init.carry=params+opt) at step 0" in proc.stdout
    want = records(ref)
    assert sorted(want) == list(range(1, 13))
    saved = json.loads((ref / "config.json").read_text())["init"]
    assert saved["source"] == str(source) and saved["step"] == 8
    meta = json.loads(next((ref / "checkpoints" / "4").rglob("meta/metadata")).read_text())
    assert meta["init"] == saved
    # The source's parameters after 8 steps start far below a fresh model's loss.
    assert want[1]["loss"] < records(source)[1]["loss"] - 0.5

    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", f"--workdir={killed}",
           *SMALL, *init]
    _kill_after_checkpoint(cmd, killed, 4)
    assert max(losses(killed)) < 12, "the run finished before it could be killed"
    # Resumed with init now naming another checkpoint: the run's own checkpoints win.
    other = [f"--config.init.checkpoint={source}:4", *init[1:]]
    proc = run_train(killed, *SMALL, *other, devices=1)
    assert "is ignored" in proc.stdout and "resumed from checkpoint at step 4" in proc.stdout
    got = records(killed)
    assert sorted(got) == sorted(want)
    for s in want:
        assert got[s]["loss"] == want[s]["loss"], s
    assert json.loads((killed / "config.json").read_text())["init"] == saved


def test_anneal_branches_from_the_named_checkpoint(source, tmp_path):
    out = tmp_path / "anneal"
    run_train(out, "--config.eval_dense.until=2", base=[], devices=1,
              config=f"{ROOT}/loam/configs/anneal.py:from={source}:8,steps=3")
    got, src = records(out), records(source)
    assert sorted(got) == [9, 10, 11]
    # Step 9's loss is that of the source's batch 8 on its checkpoint 8: the same floats.
    assert got[9]["loss"] == src[9]["loss"]
    assert got[9]["lr"] == src[9]["lr"] and got[11]["lr"] < got[10]["lr"] < src[11]["lr"]
    config = json.loads((out / "config.json").read_text())
    assert config["init"]["carry"] == "all" and config["init"]["step"] == 8
    assert config["optim"]["anneal_start"] == 8 and config["steps"] == 11
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["11"]
    # Dense early evaluation from the run's first step (8 for carry=all), then the end.
    evals = [json.loads(line)["step"] for line in (out / "eval.jsonl").read_text().splitlines()]
    assert evals == [8, 9, 10, 11]
    gap = json.loads((out / "stability_gap.json").read_text())
    assert gap["first_step"] == 8 and gap["eval_steps"] == [8, 9, 10, 11]
    assert set(gap["domains"]) == {"literature", "dialogue", "code", "docs", "reference"}
    assert (out / "stability_gap.png").stat().st_size > 0


def test_dense_evaluation_cadence():
    c = default.get_config()
    c.steps, c.eval_every, c.eval_dense.every, c.eval_dense.until = 100, 50, 2, 10
    due = [s for s in range(101) if run_lib.eval_due(c, s, 100)]
    assert due == [0, 2, 4, 6, 8, 10, 50, 100]
    c.init = {"checkpoint": "x:40", "carry": "all", "step": 40}  # counts on from step 40
    assert [s for s in range(40, 101) if run_lib.eval_due(c, s, 100)] == [
        40, 42, 44, 46, 48, 50, 100]
    c.eval_dense.until = 0  # off: the usual cadence, no evaluation before the first step
    assert [s for s in range(101) if run_lib.eval_due(c, s, 100)] == [50, 100]
    c.eval_dense.every = 0
    with pytest.raises(ValueError, match="eval_dense"):
        run_lib.resolve_config(c)


def test_stability_gap_report():
    def rec(step, loss):
        return {"step": step, "per_domain": {"old": {"loss": loss}}}
    records = [rec(0, 9.0), rec(4, 3.0), rec(5, 3.6), rec(6, 3.2), rec(7, 2.9), rec(8, 3.5)]
    report = hooks_lib.stability_gap(records, first=4, old=["old"])
    r = report["domains"]["old"]
    assert report["eval_steps"] == [4, 5, 6, 7, 8]
    assert (r["start"], r["worst_step"], r["recovery_step"]) == (3.0, 5, 7)
    assert r["gap"] == pytest.approx(0.6)


def _sentencepiece(path: Path, drop: bool) -> Path:
    """The bundled SentencePiece model with one piece dropped (another vocabulary) or one score
    changed (the same size, another tokenizer)."""
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(Path(vocab_lib.MODEL_PATH).read_bytes())
    if drop:
        del m.pieces[-1]
    else:
        m.pieces[500].score -= 1.0
    path.write_bytes(m.SerializeToString())
    return path


def test_bad_init_is_one_line_and_writes_nothing(source, tmp_path):
    def edited(name, edit):  # the source's checkpoints with an edited config
        directory = tmp_path / name
        directory.mkdir()
        (directory / "checkpoints").symlink_to(source / "checkpoints")
        saved = json.loads((source / "config.json").read_text())
        edit(saved)
        (directory / "config.json").write_text(json.dumps(saved))
        return directory

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((source / "config.json").read_text())
    other_vocab = edited("vocab", lambda c: c["data"].update(
        tokenizer=str(_sentencepiece(tmp_path / "small.model", drop=True))))
    other_tok = edited("tok", lambda c: c["data"].update(
        tokenizer=str(_sentencepiece(tmp_path / "other.model", drop=False))))
    # Through the command line: one error line, exit 1, nothing written.
    out = tmp_path / "cli"
    proc = run_train(out, *SOURCE, f"--config.init.checkpoint={empty}", check=False,
                     devices=1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "holds no checkpoints to start from" in line, line
    assert not out.exists()
    assert os.listdir(empty) == ["config.json"]

    # The other checks in this process (the same train() the command calls).
    cases = [
        ({"init.checkpoint": f"{source}:5"},
         "has no checkpoint at step 5; its checkpoints are at steps [4, 8, 12]"),
        ({"init.checkpoint": str(other_vocab)}, "vocabulary mismatch"),
        ({"init.checkpoint": str(other_tok)}, "tokenizer mismatch"),
        ({"init.checkpoint": str(source), "model.size": "micro"},
         "model shape mismatch: d_model"),
        ({"init.checkpoint": str(source), "init.carry": "moments"}, "init.carry='moments'"),
        ({"init.checkpoint": f"{source}:8", "init.carry": "all", "steps": 8},
         "steps=8 leaves nothing to train"),
    ]
    for i, (fields, message) in enumerate(cases):
        config = run_lib.read_config(source)
        for key, value in fields.items():
            *parents, leaf = key.split(".")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        out = tmp_path / f"out{i}"
        with pytest.raises(ValueError) as e:
            train_lib.train(config, out)
        assert message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
        assert not out.exists(), message


def test_resume_may_edit_only_the_future_of_an_infinite_schedule(source, tmp_path):
    """The source (infinite, warmup 2, no cooldown, no anneal) saved step 12. A resume may add
    steps and an anneal from step 12 on; an anneal start or a cooldown end moved before 12 would
    change updates already taken: refused in one line, nothing written."""
    run = tmp_path / "resume"
    run.mkdir()
    (run / "checkpoints").symlink_to(source / "checkpoints")
    (run / "config.json").write_text((source / "config.json").read_text())
    def unchanged():  # all but the lock file train() takes
        return {k: v for k, v in _snapshot(run).items() if k != ".lock"}

    before = unchanged()

    def edited(**optim):
        config = run_lib.read_config(run)
        config.steps = 20
        config.optim.update(optim)
        return config

    train_lib._check_resume(edited(anneal_start=12), run)  # the future: allowed
    # (an anneal from 6 changes update 7 on: at update 6 it is still at the constant level)
    train_lib._check_resume(edited(anneal_start=16, final_lr_fraction=0.0), run)
    for optim, edit, update in (({"anneal_start": 6}, "optim.anneal_start 0 -> 6", 7),
                                ({"cooldown_steps": 8}, "optim.cooldown_steps 0 -> 8", 2)):
        with pytest.raises(train_lib.TrainingError) as e:
            train_lib.train(edited(**optim), run)
        message = str(e.value)
        assert "\n" not in message and edit in message, message
        assert f"changes the learning rate of update {update}, before the checkpoint's step 12" \
            in message, message
        assert "anneal_start 0 or >= 12" in message
        assert unchanged() == before


def test_a_checkpoint_of_another_model_names_both_fixes(source):
    """Restoring the source's checkpoint into another model's state: nothing restored, and the
    message says how to resume (the saved settings) and how to start a new run from it."""
    config = run_lib.read_config(source)
    config.model.size = "micro"
    mesh = run_lib.build_mesh(config, devices=jax.devices()[:1])
    abstract, _ = step_lib.abstract_state(run_lib.build_model(config),
                                          run_lib.build_optimizer(config), mesh,
                                          config.data.seq_len)
    from loam import checkpoint as ckpt_lib
    checkpointer = ckpt_lib.Checkpointer(source / "checkpoints", async_save=False)
    try:
        with pytest.raises(ckpt_lib.CheckpointMismatch) as e:
            checkpointer.restore(12, abstract)
    finally:
        checkpointer.close()
    message = str(e.value)
    assert "restore the model and optimizer settings it was saved with" in message
    assert f"--config.init.checkpoint={source}:12" in message and "\n" not in message
