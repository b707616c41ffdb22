"""What online mixing costs: each method's training step against static weights, in one process,
and Aioli's probe round as a swarm against the same probes one after another.

    python -m loam.bench.mixing [--size nano] [--steps 40] [--update_steps 10] [--repeats 2]

Step time: every method trains ``--steps`` steps of the real trainer (``loam.train.train``: batch
construction, the weight source's proposals and feedback, the compiled step, metrics, rounds);
its step time is the mean wall time between consecutive logged steps after the first
``--skip`` (compilation and the first round's compilation excluded; later rounds included, so a
rounds method's time is amortised over its ``update_steps``). ``step_overhead`` is that mean
over the static run's, measured ``--repeats`` times in alternation (static first and last) and
averaged. DoReMi's reference is the static (token-proportional) run itself.

Probe round: K probes (K = the domains) branched from one state and trained ``--probe_steps``
steps, then evaluated, as one swarm and one after another, each timed after a warm-up call.
Prints one JSON object per line; the last line is the summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from loam import run as run_lib
from loam import step as step_lib
from loam import train as train_lib
from loam.configs import default
from loam.mixing.online import aioli as aioli_lib
from loam.mixing.online import rounds

METHODS = ("proportional", "stratified", "odm", "doremi", "skillit", "aioli")


def _config(args, method: str, workdir: Path, reference: Path | None):
    c = default.get_config(f"size={args.size},steps={args.steps},seq_len={args.seq_len},"
                           f"batch_size={args.batch_size}")
    c.optim.warmup_steps = 2
    c.log_every = 1
    c.eval_every = c.checkpoint_every = 10 * args.steps  # the final ones only
    c.eval_tokens = 1024
    c.mixing.method = method
    c.data.weights = "proportional"
    if method == "static":
        c.mixing.method = "static"
    if method == "doremi":
        c.mixing.doremi.reference = str(reference)
    for block in ("aioli", "skillit"):
        c.mixing[block].update_steps = args.update_steps
        c.mixing[block].eval_tokens = args.eval_tokens
    c.mixing.aioli.probe_steps = args.probe_steps
    c.mixing.skillit.graph_steps = args.probe_steps
    return c


def _step_time(workdir: Path, skip: int, tokens_per_step: int) -> float:
    """Mean seconds per step from the run's logged throughput (tokens per second over the
    window since the previous logged step), steps after ``skip``."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [tokens_per_step / r["tokens_per_s"] for r in rows
             if "tokens_per_s" in r and r["step"] > skip]
    return float(np.mean(times))


def time_method(args, method: str, root: Path, reference: Path | None, tag: str) -> float:
    workdir = root / f"{method}_{tag}"
    with contextlib.redirect_stdout(io.StringIO()):
        train_lib.train(_config(args, method, workdir, reference), workdir)
    return _step_time(workdir, args.skip, args.batch_size * args.seq_len)


def probe_round(args) -> dict:
    """Seconds of one Aioli probe round as a swarm and one after another (after warm-ups)."""
    c = _config(args, "aioli", Path("."), None)
    model, mesh = run_lib.build_model(c), run_lib.build_mesh(c)
    state, _ = step_lib.init_state(model, run_lib.build_optimizer(c), jax.random.PRNGKey(0),
                                   mesh, c.data.seq_len, c.data.batch_size)
    domains = run_lib.mixture_domains(c)
    mixtures = aioli_lib.probe_mixtures(len(domains), 0.5)
    out: dict = {}
    losses = {}
    for mode in rounds.PROBE_MODES:
        lab = rounds.Lab(c, model, mesh, domains, args.eval_tokens, mode).at(0, state)
        lab.probes(mixtures, args.probe_steps)  # compiles
        best = np.inf
        for _ in range(args.repeats):
            t = time.perf_counter()
            losses[mode] = lab.probes(mixtures, args.probe_steps)
            best = min(best, time.perf_counter() - t)
        out[f"{mode}_s"] = best
    out["max_loss_difference"] = float(np.max(np.abs(losses["swarm"] - losses["sequential"])))
    out["speedup"] = out["sequential_s"] / out["swarm_s"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="nano")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--skip", type=int, default=5, help="steps left out of the means")
    p.add_argument("--update_steps", type=int, default=10, help="Aioli's and Skill-it's rounds")
    p.add_argument("--probe_steps", type=int, default=4)
    p.add_argument("--eval_tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        times: dict[str, list[float]] = {m: [] for m in ["static", *methods]}
        reference = root / "static_0"
        for r in range(args.repeats):
            times["static"].append(time_method(args, "static", root, None, str(r)))
            print(json.dumps({"method": "static", "repeat": r,
                              "step_s": times["static"][-1]}), flush=True)
            for m in methods:
                times[m].append(time_method(args, m, root, reference, str(r)))
                print(json.dumps({"method": m, "repeat": r, "step_s": times[m][-1]}), flush=True)
        times["static"].append(time_method(args, "static", root, None, "last"))
    static = float(np.mean(times["static"]))
    summary = {m: {"step_s": float(np.mean(t)), "step_overhead": float(np.mean(t)) / static,
                   "repeats": len(t)} for m, t in times.items()}
    probes = probe_round(args)
    print(json.dumps({"probe_round": probes}), flush=True)
    print(json.dumps({
        "setup": {"size": args.size, "seq_len": args.seq_len, "batch_size": args.batch_size,
                  "steps": args.steps, "skip": args.skip, "update_steps": args.update_steps,
                  "probe_steps": args.probe_steps, "eval_tokens": args.eval_tokens,
                  "backend": jax.default_backend(), "devices": jax.device_count()},
        "methods": summary, "aioli_probe_swarm_speedup": probes["speedup"],
        "aioli_probe_round_s": {"swarm": probes["swarm_s"], "sequential": probes["sequential_s"]},
        "aioli_probe_max_loss_difference": probes["max_loss_difference"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
