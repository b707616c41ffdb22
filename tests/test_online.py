"""Online weight sources through the real trainer and swarm: a toy controller (raise the weight of
the domain with the highest recent loss) changes the mixture from the losses it observes, is
killed with SIGKILL, resumes, and reproduces the uninterrupted run exactly: on one device and in
a swarm of 4."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import CONFIG, SMALL, env, losses, run_train

pytestmark = pytest.mark.e2e

ONLINE = [*SMALL, "--config.mixing.method=greedy_loss", "--config.steps=16",
          "--config.checkpoint_every=5"]


def records(workdir) -> dict[int, dict]:
    out = {}
    for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec  # a resumed run rewrites the replayed steps
    return out


def kill_after(cmd, workdir: Path, steps: int, environ) -> None:
    """Start cmd, SIGKILL it once `steps` steps are logged."""
    proc = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(losses(workdir)) >= steps:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_online_controller_resumes_bit_exactly_on_one_device(tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    run_train(ref, *ONLINE, devices=1)
    want = records(ref)
    assert sorted(want) == list(range(1, 17))
    weights = [tuple(want[s]["mixture_weights"].values()) for s in sorted(want)]
    assert len(set(weights)) > 2, "the controller never moved the mixture"
    ckpt_meta = json.loads(next((ref / "checkpoints" / "10").rglob("meta/metadata")).read_text())
    assert len(ckpt_meta["data"]["weights_log"]) == 10  # the log travels with the position

    cmd = [sys.executable, "-m", "loam.train", f"--config={CONFIG}",
           f"--workdir={killed}", *SMALL, *ONLINE[len(SMALL):]]
    kill_after(cmd, killed, 7, env(1))
    assert max(losses(killed)) < 16, "the run finished before it could be killed"
    run_train(killed, *ONLINE, devices=1)
    got = records(killed)
    assert sorted(got) == sorted(want)
    for s in want:  # bit-exact: same floats, not just close
        assert got[s]["loss"] == want[s]["loss"], s
        assert got[s]["mixture_weights"] == want[s]["mixture_weights"], s


SWARM_SCRIPT = textwrap.dedent("""
    import sys
    from loam.configs import default
    from loam.mixing import swarm as sw

    c = default.get_config("size=nano,steps=10,seq_len=32,batch_size=4")
    c.optim.warmup_steps = 2
    c.eval_tokens, c.eval_batch_size = 256, 4
    c.log_every, c.checkpoint_every = 1, 3
    online = {"method": "greedy_loss"}
    members = [sw.Member("uniform", seed=0, name="m0", mixing=online),
               sw.Member({"code": 2.0, "docs": 1.0}, seed=1, name="static"),
               sw.Member("uniform", seed=2, lr=1e-2, name="m2", mixing=online),
               sw.Member({"code": 1.0, "literature": 3.0}, seed=3, name="m3", mixing=online)]
    sw.train_swarm(c, members, sys.argv[1], eval_domains=["code"], verbose=False)
""")


def test_online_controller_resumes_bit_exactly_in_a_swarm(tmp_path):
    script = tmp_path / "swarm.py"
    script.write_text(SWARM_SCRIPT)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(ref)], env=env(4), check=True,
                   timeout=600, capture_output=True)
    kill_after([sys.executable, str(script), str(killed)], killed, 5, env(4))
    assert not (killed / "results.json").exists(), "the swarm finished before it was killed"
    subprocess.run([sys.executable, str(script), str(killed)], env=env(4), check=True,
                   timeout=600, capture_output=True)
    a = json.loads((ref / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    assert [m["train_loss"] for m in a["members"]] == [m["train_loss"] for m in b["members"]]
    assert [m["eval_loss"] for m in a["members"]] == [m["eval_loss"] for m in b["members"]]
    ref_log, got_log = records(ref), records(killed)
    assert sorted(ref_log) == sorted(got_log) == list(range(1, 11))
    for s in ref_log:
        assert ref_log[s]["loss"] == got_log[s]["loss"], s
        assert ref_log[s]["mixture_weights"] == got_log[s]["mixture_weights"], s
    # The online members' mixtures moved; the static member's did not.
    moving = [len({json.dumps(ref_log[s]["mixture_weights"][i]) for s in ref_log})
              for i in range(4)]
    assert moving[1] == 1 and min(moving[0], moving[2], moving[3]) >= 2
