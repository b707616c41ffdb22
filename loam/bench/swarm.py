"""Swarm throughput: K proxies in one compiled step vs the same K trained one after another.

    python -m loam.bench.swarm [--k 16] [--size tiny] [--seq_len 128] [--batch_size 4] [--steps 8]
                               [--rounds 2] [--member_loop vmap|map|both] [--in_process]

The swarm runs its members per device either vmapped (one set of batched kernels) or mapped
(members in turn inside one compiled step); by default both are measured beside the sequential
baseline, and the summary names the faster one and whether it is the backend's default
(`loam.mixing.swarm.default_member_loop`). All sides train the same members (mixtures, seeds) on
the same batches on the same devices, with compilation excluded; the sequential side reuses one
compiled ordinary train step (`loam.step.make_train_step`) for every member, the most favourable
way to run them one by one.

Each side runs in a process of its own, as a swarm run or K single runs would: sides that share
a process change each other's speed through the host allocator (on a 2-core machine with huge
pages, a swarm step timed after the sequential side's steps in the same process took 1.5x as
long as in a fresh process). The sides take turns for ``rounds`` rounds (side A, B, C, A, B, C,
...), so a machine whose speed drifts is seen by all of them alike; each loop's speedup is the
total sequential time over its total time, with the speedup of every round beside it.
``--in_process`` runs the sides one after another in this process instead (quick, for tests).
Prints one JSON object per line; the last line is the summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

from loam import perf
from loam import run as run_lib
from loam import step as step_lib
from loam.configs import default
from loam.mixing import swarm as sw
from loam.model import sharding, sizes

SEQUENTIAL = "sequential"


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def _setup(k: int, size: str, seq_len: int, batch_size: int, seed: int):
    config = default.get_config(f"size={size},steps=1000,seq_len={seq_len},"
                                f"batch_size={batch_size}")
    rng = np.random.default_rng(seed)
    domains = run_lib.mixture_domains(config)
    members = [sw.Member(dict(zip(domains, rng.dirichlet(np.ones(len(domains))).tolist())),
                         seed=i) for i in range(k)]
    return config, members


def side(name: str, k: int = 16, size: str = "tiny", seq_len: int = 128, batch_size: int = 4,
         steps: int = 8, seed: int = 0) -> dict:
    """One side, in this process: a swarm (name = its member loop) or the members one after
    another (name = "sequential"). A compiled first step, then ``steps`` timed steps; the
    members' losses at the last step."""
    config, members = _setup(k, size, seq_len, batch_size, seed)
    swarm = sw.Swarm(config, members, member_loop=name if name != SEQUENTIAL else None)
    t = time.perf_counter()
    host = [swarm.host_batch(s) for s in range(steps + 1)]
    data_s = time.perf_counter() - t
    if name != SEQUENTIAL:
        state = swarm.init()
        batches = [swarm.device_batch(b) for b in host]
        t = time.perf_counter()
        state, m = swarm.train_step(state, batches[0])
        _block(m)
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        for s in range(1, steps + 1):
            state, m = swarm.train_step(state, batches[s])
        _block((state, m))
        seconds = time.perf_counter() - t
        losses = [float(x) for x in np.asarray(m["loss"])]
    else:
        mesh = sharding.make_mesh(data=-1)
        optimizer = run_lib.build_optimizer(config)
        train_step: Any = None
        compile_s, singles = 0.0, []
        for i in range(k):
            st, shardings = step_lib.init_state(swarm.model, optimizer, jax.random.PRNGKey(i),
                                                mesh, seq_len, batch_size)
            if train_step is None:
                train_step = run_lib.build_train_step(config, swarm.model, optimizer, mesh,
                                                      shardings)
            mb = [sharding.shard_batch({f: v[i] for f, v in b.items()}, mesh) for b in host]
            t = time.perf_counter()
            st, mm = train_step(st, mb[0])
            _block(mm)
            compile_s += time.perf_counter() - t
            singles.append((st, mb))
        t = time.perf_counter()
        losses = []
        for st, mb in singles:
            for s in range(1, steps + 1):
                st, mm = train_step(st, mb[s])
            losses.append(mm["loss"])
        _block(losses)
        seconds = time.perf_counter() - t
        losses = [float(x) for x in losses]
    return {"side": name, "seconds": seconds, "compile_s": compile_s, "losses": losses,
            "data_s": data_s, "member_shards": swarm.shards, "devices": jax.device_count()}


def _side_in_subprocess(name: str, **kw) -> dict:
    cmd = [sys.executable, "-m", "loam.bench.swarm", "--side", name,
           *[f"--{key}={value}" for key, value in kw.items()]]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(k: int = 16, size: str = "tiny", seq_len: int = 128, batch_size: int = 4,
        steps: int = 8, seed: int = 0, member_loop: str | None = "both", rounds: int = 2,
        in_process: bool = False) -> dict:
    """member_loop: "vmap", "map", "both", or None (the backend's default)."""
    loops = list(sw.MEMBER_LOOPS) if member_loop == "both" else [
        member_loop or sw.default_member_loop()]
    config, _ = _setup(k, size, seq_len, batch_size, seed)
    model_cfg = run_lib.build_model(config).cfg
    counts = sizes.count_params(model_cfg)
    print(json.dumps({"k": k, "size": size, "seq_len": seq_len, "batch_size": batch_size,
                      "devices": jax.device_count(), "in_process": in_process,
                      "params_non_embedding": counts["non_embedding"],
                      "params_total": counts["total"]}), flush=True)
    kw: dict[str, Any] = dict(k=k, size=size, seq_len=seq_len, batch_size=batch_size,
                              steps=steps, seed=seed)
    results: dict[str, list[dict]] = {name: [] for name in [*loops, SEQUENTIAL]}
    for r in range(max(1, rounds)):
        for name in results:
            out = side(name, **kw) if in_process else _side_in_subprocess(name, **kw)
            print(json.dumps({"round": r, **{k_: v for k_, v in out.items() if k_ != "losses"}}),
                  flush=True)
            results[name].append(out)

    seq = results.pop(SEQUENTIAL)
    seq_s = sum(o["seconds"] for o in seq)
    seq_losses = np.array(seq[-1]["losses"])
    tokens_per_round = steps * k * batch_size * seq_len
    tokens = tokens_per_round * len(seq)
    peak = perf.matmul_peak_flops(2048, 8, 2.0)
    fpt = sizes.flops_per_token(model_cfg, seq_len)
    loop_s = {loop: sum(o["seconds"] for o in results[loop]) for loop in loops}
    fastest = min(loop_s, key=lambda loop: loop_s[loop])
    default_loop = sw.default_member_loop()
    per_loop = {}
    for loop in loops:
        rounds_speedup = [a["seconds"] / b["seconds"] for a, b in zip(seq, results[loop])]
        per_loop[loop] = {
            "tokens_per_s": tokens / loop_s[loop], "speedup": seq_s / loop_s[loop],
            "round_speedups": rounds_speedup, "min_round_speedup": min(rounds_speedup),
            "mfu": fpt * tokens / loop_s[loop] / peak,
            "compile_s": results[loop][-1]["compile_s"],
            "max_loss_difference": float(np.max(np.abs(np.array(results[loop][-1]["losses"])
                                                       - seq_losses)))}
    result = {
        "k": k, "params_per_member": counts["non_embedding"],
        "params_total_per_member": counts["total"], "size": size, "seq_len": seq_len,
        "batch_size": batch_size, "timed_steps": steps, "rounds": len(seq),
        "in_process": in_process, "devices": seq[-1]["devices"],
        "backend": jax.default_backend(), "member_shards": results[fastest][-1]["member_shards"],
        "loops": per_loop,
        # The faster loop, and whether the backend's default picks it.
        "member_loop": fastest, "default_member_loop": default_loop,
        "default_is_fastest": default_loop == fastest if len(loops) > 1 else None,
        "swarm_tokens_per_s": tokens / loop_s[fastest],
        "sequential_tokens_per_s": tokens / seq_s,
        "speedup": seq_s / loop_s[fastest],
        "min_round_speedup": per_loop[fastest]["min_round_speedup"],
        # Model FLOP utilisation against the float32 matmul peak seen here.
        "flops_per_token": fpt, "matmul_peak_flops": peak,
        "swarm_mfu": fpt * tokens / loop_s[fastest] / peak,
        "sequential_mfu": fpt * tokens / seq_s / peak,
        # Host-side batch construction, shared by all sides (so outside their timings).
        "data_tokens_per_s": (steps + 1) * k * batch_size * seq_len / seq[-1]["data_s"],
        "swarm_compile_s": per_loop[fastest]["compile_s"],
        "sequential_compile_s": seq[-1]["compile_s"],
        "max_loss_difference": max(v["max_loss_difference"] for v in per_loop.values()),
    }
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2,
                   help="rounds of the sides taking turns, each side a fresh process")
    p.add_argument("--in_process", action="store_true",
                   help="run the sides in this process, one after another")
    p.add_argument("--member_loop", choices=["vmap", "map", "both", "default"], default="both",
                   help="how each device runs its members: both (measure each, report the "
                   "faster), or one; default: the backend's (map on CPU, vmap on accelerators, "
                   "see loam.mixing.swarm.default_member_loop)")
    p.add_argument("--side", choices=[*sw.MEMBER_LOOPS, SEQUENTIAL], default=None,
                   help=argparse.SUPPRESS)  # one side only: what each process of a round runs
    a = p.parse_args(argv)
    kw: dict[str, Any] = dict(k=a.k, size=a.size, seq_len=a.seq_len, batch_size=a.batch_size,
                              steps=a.steps, seed=a.seed)
    if a.side:
        if a.side != SEQUENTIAL:
            sw.use_host_cores()  # as the mixture search does (single runs keep one device)
        print(json.dumps(side(a.side, **kw)), flush=True)
        return
    print(json.dumps(run(**kw, member_loop=None if a.member_loop == "default" else a.member_loop,
                         rounds=a.rounds, in_process=a.in_process)), flush=True)


if __name__ == "__main__":
    main()
