"""Swarm throughput: K proxies in one compiled step vs the same K trained one after another.

    python -m loam.bench.swarm [--k 16] [--size tiny] [--seq_len 128] [--batch_size 4] [--steps 8]
                               [--member_loop vmap|map|both]

The swarm runs its members per device either vmapped (one set of batched kernels) or mapped
(lax.map: members in turn inside one compiled step); by default both are measured, side by side
with the sequential baseline, and the summary names the faster one and whether it is the
backend's default (`loam.mixing.swarm.default_member_loop`). All sides train the same members
(mixtures, seeds) on the same pre-built batches on the same devices, with compilation excluded;
the sequential side reuses one compiled ordinary train step (`loam.step.make_train_step`) for
every member, the most favourable way to run them one by one. Host-side batch construction is
measured separately (`data_tokens_per_s`), since all sides share it. Prints one JSON object per
line; the last line is the summary.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from loam import perf
from loam import run as run_lib
from loam import step as step_lib
from loam.configs import default
from loam.mixing import swarm as sw
from loam.model import sharding, sizes


def _block(tree):
    jax.block_until_ready(tree)
    return tree


def run(k: int = 16, size: str = "tiny", seq_len: int = 128, batch_size: int = 4,
        steps: int = 8, seed: int = 0, member_loop: str | None = "both") -> dict:
    """member_loop: "vmap", "map", "both", or None (the backend's default)."""
    loops = list(sw.MEMBER_LOOPS) if member_loop == "both" else [
        member_loop or sw.default_member_loop()]
    config = default.get_config(f"size={size},steps=1000,seq_len={seq_len},"
                                f"batch_size={batch_size}")
    rng = np.random.default_rng(seed)
    domains = run_lib.mixture_domains(config)
    members = [sw.Member(dict(zip(domains, rng.dirichlet(np.ones(len(domains))).tolist())),
                         seed=i) for i in range(k)]
    swarm = sw.Swarm(config, members, member_loop=loops[0])
    model_cfg = swarm.model_cfg
    counts = sizes.count_params(model_cfg)
    print(json.dumps({"k": k, "size": size, "seq_len": seq_len, "batch_size": batch_size,
                      "devices": jax.device_count(), "member_shards": swarm.shards,
                      "params_non_embedding": counts["non_embedding"],
                      "params_total": counts["total"]}), flush=True)

    t = time.perf_counter()
    host = [swarm.host_batch(s) for s in range(steps + 1)]
    data_s = time.perf_counter() - t
    tokens_per_member_step = batch_size * seq_len
    data_tokens_per_s = (steps + 1) * k * tokens_per_member_step / data_s

    # Swarm: one compiled step for all members, per member loop.
    swarm_s, swarm_compile_s, swarm_losses = {}, {}, {}
    for loop in loops:
        if loop != swarm.member_loop:
            swarm = sw.Swarm(config, members, member_loop=loop)
        state = swarm.init()
        batches = [swarm.device_batch(b) for b in host]
        t = time.perf_counter()
        state, m = swarm.train_step(state, batches[0])
        _block(m)
        swarm_compile_s[loop] = time.perf_counter() - t
        t = time.perf_counter()
        for s in range(1, steps + 1):
            state, m = swarm.train_step(state, batches[s])
        _block((state, m))
        swarm_s[loop] = time.perf_counter() - t
        swarm_losses[loop] = np.asarray(m["loss"])
        del state, batches

    # Sequential: the ordinary train step, one member after another.
    mesh = sharding.make_mesh(data=-1)
    optimizer = run_lib.build_optimizer(config)
    train_step = None
    seq_s, seq_compile_s, seq_losses = 0.0, 0.0, []
    for i in range(k):
        st, shardings = step_lib.init_state(swarm.model, optimizer, jax.random.PRNGKey(i), mesh,
                                            seq_len, batch_size)
        if train_step is None:
            train_step = run_lib.build_train_step(config, swarm.model, optimizer, mesh,
                                                  shardings)
        mb = [sharding.shard_batch({f: v[i] for f, v in b.items()}, mesh) for b in host]
        t = time.perf_counter()
        st, mm = train_step(st, mb[0])
        _block(mm)
        seq_compile_s += time.perf_counter() - t
        t = time.perf_counter()
        for s in range(1, steps + 1):
            st, mm = train_step(st, mb[s])
        _block((st, mm))
        seq_s += time.perf_counter() - t
        seq_losses.append(float(mm["loss"]))
        del st

    tokens = steps * k * tokens_per_member_step
    peak = perf.matmul_peak_flops(2048, 8, 2.0)
    fpt = sizes.flops_per_token(model_cfg, seq_len)
    fastest = min(swarm_s, key=lambda loop: swarm_s[loop])
    default_loop = sw.default_member_loop()
    result = {
        "k": k, "params_per_member": counts["non_embedding"],
        "params_total_per_member": counts["total"], "size": size, "seq_len": seq_len,
        "batch_size": batch_size, "timed_steps": steps, "devices": jax.device_count(),
        "backend": jax.default_backend(), "member_shards": swarm.shards,
        "loops": {loop: {
            "tokens_per_s": tokens / swarm_s[loop], "speedup": seq_s / swarm_s[loop],
            "mfu": fpt * tokens / swarm_s[loop] / peak, "compile_s": swarm_compile_s[loop],
            "max_loss_difference": float(np.max(np.abs(swarm_losses[loop]
                                                       - np.array(seq_losses))))}
            for loop in loops},
        # The faster loop, and whether the backend's default picks it.
        "member_loop": fastest, "default_member_loop": default_loop,
        "default_is_fastest": default_loop == fastest if len(loops) > 1 else None,
        "swarm_tokens_per_s": tokens / swarm_s[fastest],
        "sequential_tokens_per_s": tokens / seq_s,
        "speedup": seq_s / swarm_s[fastest],
        # Model FLOP utilisation against the float32 matmul peak seen here.
        "flops_per_token": fpt, "matmul_peak_flops": peak,
        "swarm_mfu": fpt * tokens / swarm_s[fastest] / peak,
        "sequential_mfu": fpt * tokens / seq_s / peak,
        "data_tokens_per_s": data_tokens_per_s,
        "swarm_compile_s": swarm_compile_s[fastest], "sequential_compile_s": seq_compile_s,
    }
    result["max_loss_difference"] = max(v["max_loss_difference"]
                                        for v in result["loops"].values())
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--size", default="tiny")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--member_loop", choices=["vmap", "map", "both", "default"], default="both",
                   help="how each device runs its members: both (measure each, report the "
                   "faster), or one; default: the backend's (map on CPU, vmap on accelerators, "
                   "see loam.mixing.swarm.default_member_loop)")
    a = p.parse_args(argv)
    print(json.dumps(run(a.k, a.size, a.seq_len, a.batch_size, a.steps,
                         member_loop=None if a.member_loop == "default" else a.member_loop)),
          flush=True)


if __name__ == "__main__":
    main()
