"""Proxy swarms: K members in one vmapped step equal K ordinary runs; a diverging member is frozen
without disturbing the others; a resumed swarm reproduces the uninterrupted one exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from loam import run as run_lib
from loam import step as step_lib
from loam.configs import default
from loam.mixing import swarm as sw
from loam.model import sharding

import helpers

STEPS = 3


def small_config(steps=STEPS):
    c = default.get_config(f"size=nano,steps={steps},seq_len=32,batch_size=4")
    c.optim.warmup_steps = 2
    c.eval_tokens, c.eval_batch_size = 256, 4
    c.log_every, c.checkpoint_every = 1, 2
    return c


MEMBERS = [sw.Member({"code": 1.0, "literature": 1.0}, seed=0, name="a"),
           sw.Member("uniform", seed=1, lr=1e-2, name="b"),
           sw.Member({"dialogue": 2.0, "docs": 1.0, "reference": 0.5}, seed=2, name="c"),
           sw.Member("uniform", seed=3, lr=1e30, name="diverges")]


_STEPS = {}  # compiled ordinary steps by learning rate (members a and c share one)


def separate_run_losses(config, member, steps):
    """Losses of the ordinary single-run pieces (loam.train / loam.step) for one member."""
    mc = sw.member_config(config, member)
    mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
    stream = run_lib.build_stream(mc)
    o = mc.optim
    if o.lr not in _STEPS:
        opt = run_lib.build_optimizer(mc)
        model = run_lib.build_model(mc)
        _, shardings = step_lib.abstract_state(model, opt, mesh, mc.data.seq_len)
        _STEPS[o.lr] = (model, opt, run_lib.build_train_step(mc, model, opt, mesh, shardings))
    model, opt, train_step = _STEPS[o.lr]
    state, _ = step_lib.init_state(model, opt, jax.random.PRNGKey(mc.seed), mesh,
                                   mc.data.seq_len, mc.data.batch_size)
    out = []
    for t in range(steps):
        state, m = train_step(state, sharding.shard_batch(stream.batch(t), mesh))
        out.append(float(m["loss"]))
    return out


@pytest.mark.parametrize("member_loop", ["map", "vmap"])
def test_swarm_equals_separate_runs_and_freezes_diverging_member(member_loop):
    config = small_config()
    swarm = sw.Swarm(config, MEMBERS, member_loop=member_loop)
    assert swarm.mesh.shape["data"] == min(4, jax.device_count())  # members split over devices
    state = swarm.init()
    for leaf in jax.tree.leaves(state.params):  # the member axis is split over the devices
        assert leaf.sharding.spec[0] == "data" and leaf.shape[0] == 4
    init_params = jax.device_get(state.params)
    losses, alive = [], []
    for t in range(STEPS):
        state, m = swarm.train_step(state, swarm.batch(t))
        losses.append(np.asarray(m["loss"]))
        alive.append(np.asarray(m["alive"]))
    losses = np.stack(losses)
    for i, member in enumerate(MEMBERS[:3]):
        np.testing.assert_allclose(losses[:, i], separate_run_losses(config, member, STEPS),
                                   rtol=2e-5, err_msg=f"member {member.name}")
    # Member b's larger learning rate makes its curve differ from the others (not a copy).
    assert abs(losses[-1, 1] - losses[-1, 0]) > 1e-3
    # The huge-lr member is refused at its first update and stays at its initial parameters.
    assert [a[3] for a in alive] == [False] * STEPS and all(a[:3].all() for a in alive)
    assert not bool(state.alive[3]) and int(state.diverged_at[3]) == 0
    assert list(np.asarray(state.diverged_at[:3])) == [-1, -1, -1]
    final = jax.device_get(state.params)
    for a, b in zip(jax.tree.leaves(init_params), jax.tree.leaves(final)):
        np.testing.assert_array_equal(a[3], b[3])
        assert np.isfinite(b).all()
    evals = swarm.evaluate(state.params)
    assert set(evals) == {"literature", "dialogue", "code", "docs", "reference"}
    assert all(v.shape == (4,) and np.isfinite(v).all() for v in evals.values())


@pytest.mark.e2e
def test_swarm_resume_is_exact(tmp_path, capsys):
    config = small_config(steps=4)
    members = MEMBERS[:2] + MEMBERS[3:]
    ref = sw.train_swarm(config, members, tmp_path / "ref", eval_domains=["code", "docs"],
                         verbose=False, member_loop="vmap")
    assert "member 2 (diverges) diverged at step 0" in capsys.readouterr().out
    assert [m["alive"] for m in ref["members"]] == [True, True, False]
    assert [m["finite"] for m in ref["members"]] == [True, True, False]

    # Interrupted after the step-2 checkpoint: drop what came later and rerun.
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ref", resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    (resumed / "results.json").unlink()
    again = sw.train_swarm(config, members, resumed, eval_domains=["code", "docs"],
                           verbose=True, member_loop="vmap")
    assert "swarm resumed from checkpoint at step 2" in capsys.readouterr().out
    for a, b in zip(ref["members"], again["members"]):
        assert a["eval_loss"] == b["eval_loss"] and a["train_loss"] == b["train_loss"]
        assert a["diverged_at"] == b["diverged_at"] == (0 if a["name"] == "diverges" else -1)
    records = [json.loads(l) for l in (resumed / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r["loss"])
    assert all(len({json.dumps(v) for v in vs}) == 1 for vs in by_step.values())  # replay equal

    with pytest.raises(ValueError, match="different swarm"):
        sw.train_swarm(config, members[:2], resumed, verbose=False)
    # The member loop is part of the swarm: kept on resume, a different one refused.
    assert json.loads((resumed / "swarm.json").read_text())["member_loop"] == "vmap"
    with pytest.raises(ValueError, match="member_loop='vmap'"):
        sw.train_swarm(config, members, resumed, verbose=False, member_loop="map")


def test_swarm_bad_input():
    config = small_config()
    with pytest.raises(ValueError, match="at least one member"):
        sw.Swarm(config, [])
    staged = small_config()
    staged.data.stages = [{"start": 0, "weights": "uniform"}]
    with pytest.raises(ValueError, match="ignore config.data.stages"):
        sw.Swarm(staged, MEMBERS[:1])
    with pytest.raises(ValueError, match="not in the mixture's domains"):
        sw.Swarm(config, [sw.Member({"poetry": 1.0})])
    mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="member_loop='scan'"):
        sw.Swarm(config, MEMBERS[:1], member_loop="scan")
    with pytest.raises(ValueError, match="cannot be split"):
        sw.Swarm(config, MEMBERS[:3], mesh=mesh)


def test_cpu_swarms_run_members_in_turn_inside_one_step():
    """On CPU the measured-faster member loop (lax.map) is the default, so a swarm is never
    slower than training its members one by one (loam.bench.swarm measures both)."""
    assert jax.default_backend() == "cpu"
    assert sw.default_member_loop() == "map"
    assert sw.Swarm(small_config(), MEMBERS[:1], build_streams=False).member_loop == "map"


def test_swarm_commands_take_one_cpu_device_per_core():
    """use_host_cores (called first by the mixture search and the swarm bench) gives a fresh
    process one CPU device per core; it leaves a chosen device count, or started backends,
    alone."""
    code = ("import json, os, jax\n"
            "from loam.mixing import swarm as sw\n"
            "asked = sw.use_host_cores()\n"
            "again = sw.use_host_cores()\n"
            "print(json.dumps([asked, again, jax.device_count(),"
            " len(os.sched_getaffinity(0))]))\n")
    fresh = dict(helpers.env(), XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", code], env=fresh, capture_output=True,
                         text=True, timeout=300, check=True)
    asked, again, devices, cores = json.loads(out.stdout.strip().splitlines()[-1])
    assert cores == len(os.sched_getaffinity(0))
    assert (asked, devices) == ((cores, cores) if cores > 1 else (0, 1))
    assert again == 0  # the count is chosen now
    chosen = subprocess.run([sys.executable, "-c", code], env=helpers.env(devices=3),
                            capture_output=True, text=True, timeout=300, check=True)
    assert json.loads(chosen.stdout.strip().splitlines()[-1])[:3] == [0, 0, 3]
    # In this process the backends have started: nothing changes.
    assert sw.use_host_cores() == 0
    assert jax.device_count() == 8
