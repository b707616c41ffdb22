"""Two processes with 4 CPU devices each, joined by jax.distributed over loopback (gloo
collectives), each feeding its own half of the global batch, train the same model as one
8-device process: the loss curves match."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from helpers import CONFIG, SMALL, env, losses

pytestmark = pytest.mark.e2e

STEPS = ["--config.steps=6", "--config.checkpoint_every=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}", *SMALL, *STEPS]
    one = subprocess.run([*cmd, f"--workdir={single}"], env=env(8), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [subprocess.Popen(
        [*cmd, f"--workdir={multi}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
         f"--process_id={i}"], env=env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out}\n{err[-3000:]}"
    ref, got = losses(single), losses(multi)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5), s
    # Both processes wrote one shared checkpoint series.
    steps = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
