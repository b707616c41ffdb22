"""Train-step throughput and model FLOP utilisation, measured against this process's matmul peak.

    python -m loam.bench.train [--quick] [--runs mini,peer-a,small] [--steps N]
                               [--variants 'attention_impl=xla;attention_impl=manual']
                               [--interleave] [--dots]

Prints one JSON line per model (and variant), then one JSON object {"runs": [...], ...} as the
last line. `--variants` measures ModelConfig settings side by side in one process (each line
carries its "variant"). Batches are synthetic (uniform random tokens, one full-length segment per
row), a fresh one for every timed step, built and placed before the clock starts: throughput does
not depend on token values, and the bench then needs no corpus. Each line also gives the minor
page faults per step (see loam/__init__.py on huge pages). The step is the real one
(loam.step.make_train_step: AdamW, clipping, z-loss, per-domain sums), on a 1-device mesh,
dispatched ahead: step i+1 is queued before step i's loss is fetched, as the training loop does.

MFU = flops_per_token * tokens_per_s / matmul_peak, with flops_per_token from
loam.model.sizes (6N + 12 L d T) and the peak the best 2048x2048 matmul seen in this process
(measured before the first model and after each; the last line's MFU uses the highest):
float32 on the CPU; on a GPU or TPU the runs compute in bfloat16 (config dtype, float32 weights)
and the peak is the device's bfloat16 one.

A variant may also set XLA compiler options for its compile (keys "xla_...", e.g.
'xla_cpu_experimental_ynn_fusion_type=' for XLA:CPU without YNNPACK's fusions), so that backend
settings are compared in one process like model settings. `--dots` adds, per run, the step's
matmuls timed alone (see `dots_alone`): how much of the step they are.

`--interleave` (with --variants) builds every variant of a model first, then runs them in turn,
round after round (the order turning by one each round): each turn is one unrecorded step, which
brings the variant's buffers back after another program ran, and two recorded steps. Each variant's
step time is reported relative to the first variant's in the same round (median, mean and its
standard error): on a machine whose speed drifts between runs, the paired ratio is the figure to
compare.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time

import jax
import numpy as np

from loam import perf
from loam import step as st
from loam.model import sharding as shd
from loam.model import sizes
from loam.model.transformer import ModelConfig, Transformer

# name -> (size, vocab, seq_len, batch, overrides). "mini" is the default job's model
# (loam/configs/default.py: untied embeddings, seq 256, batch 16).
RUNS = {
    "mini": ("mini", 8192, 256, 16, {"tied_embeddings": False}),
    "peer-a": ("peer-a", 16384, 256, 16, {}),
    "small": ("small", 8192, 256, 16, {}),
}
# Timed steps per run (after one warm-up step): keeps the whole bench near 2 minutes here.
TIMED_STEPS = {"mini": 4, "peer-a": 2, "small": 2}


def _batch(vocab: int, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_weights": np.ones((batch, seq_len), np.float32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "prefix": np.zeros((batch, seq_len), np.int32),
        "domain_ids": rng.integers(0, 5, (batch, seq_len)).astype(np.int32),
    }


class _Run:
    """One model (and variant) built, compiled and warmed up, ready to take timed steps."""

    def __init__(self, name: str, steps: int, variant: dict | None = None):
        if steps < 1:  # the timings and tokens/s need at least one timed step
            raise ValueError(f"bench_run needs steps >= 1 timed steps (after the warm-up), "
                             f"got {steps}")
        size, vocab, seq_len, batch_size, overrides = RUNS[name]
        self.name, self.size, self.vocab, self.variant = name, size, vocab, variant or {}
        self.seq_len, self.batch_size, self.steps = seq_len, batch_size, steps
        # A variant sets ModelConfig fields and XLA compiler options (keys "xla_...").
        model_fields = {k: v for k, v in self.variant.items() if not k.startswith("xla_")}
        compiler_options = {k: v for k, v in self.variant.items() if k.startswith("xla_")}
        self.cfg = cfg = sizes.get_size(size, vocab, max_len=seq_len,
                                        **{**overrides, **model_fields})
        model = Transformer(cfg)
        mesh = shd.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        optimizer = st.make_optimizer(st.lr_schedule("cosine", 1e-3, 1000, 10))
        self.state, shardings = st.init_state(model, optimizer, jax.random.key(0), mesh,
                                              seq_len, batch_size)
        train_step = st.make_train_step(model, optimizer, mesh, shardings, num_domains=5,
                                        z_loss=1e-4)
        # A fresh batch for every step, built and placed on the device before the clock starts.
        self.batches = [shd.shard_batch(_batch(vocab, batch_size, seq_len, seed=i), mesh)
                        for i in range(steps + 1)]
        t = time.perf_counter()
        with shd.activate(mesh):
            lowered = train_step.jitted.lower(self.state, self.batches[0])
            try:
                self.compiled = lowered.compile(compiler_options=compiler_options or None)
            except jax.errors.JaxRuntimeError as e:
                if not compiler_options:
                    raise
                raise ValueError(f"XLA refused the compiler options {compiler_options}: "
                                 f"{str(e).splitlines()[0]}") from None
        self.compile_s = time.perf_counter() - t
        # warm-up (the first execution allocates)
        self.state, metrics = self.compiled(self.state, self.batches[0])
        self.first_loss = float(metrics["loss"])
        self.last_loss = self.first_loss
        self.step_times: list[float] = []
        self.faults = 0
        self.taken = 0

    def run(self, steps: int, record: bool = True) -> list[float]:
        """``steps`` timed steps, dispatched ahead: step i+1 is queued before step i's loss is
        read, as the training loop does; returns their times. ``record=False``: taken but not
        counted (a step that brings this model's buffers back after another program ran)."""
        faults = perf.minor_faults()
        ready = [time.perf_counter()]
        batches = [self.batches[1 + (self.taken + i) % self.steps] for i in range(steps)]
        self.state, pending = self.compiled(self.state, batches[0])
        for batch in batches[1:]:
            self.state, metrics = self.compiled(self.state, batch)
            pending["loss"].block_until_ready()
            ready.append(time.perf_counter())
            pending = metrics
        pending["loss"].block_until_ready()
        ready.append(time.perf_counter())
        self.taken += steps
        times = np.diff(ready).tolist()
        if not record:
            return times
        self.step_times.extend(times)
        self.faults += perf.minor_faults() - faults
        self.last_loss = float(pending["loss"])
        return times

    def result(self, peak: float) -> dict:
        cfg, steps = self.cfg, len(self.step_times)
        step_times = np.asarray(self.step_times)
        tokens_per_s = self.batch_size * self.seq_len * steps / step_times.sum()
        fpt = sizes.flops_per_token(cfg, self.seq_len)
        counts = sizes.count_params(cfg)
        mem = jax.devices()[0].memory_stats() or {}
        return {
            "name": self.name, "variant": self.variant, "size": self.size, "vocab": self.vocab,
            "seq_len": self.seq_len, "batch": self.batch_size,
            "tied_embeddings": cfg.tied_embeddings, "dtype": cfg.dtype,
            "params": counts["total"], "non_embedding_params": counts["non_embedding"],
            "flops_per_token": fpt, "steps": steps, "compile_s": round(self.compile_s, 2),
            "step_time_median_s": float(np.median(step_times)),
            "step_time_min_s": float(step_times.min()),
            "step_time_max_s": float(step_times.max()),
            "tokens_per_s": tokens_per_s, "mfu": fpt * tokens_per_s / peak,
            "matmul_peak_flops": peak,
            "loss_first": self.first_loss, "loss_last": self.last_loss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "page_faults_per_step": self.faults / steps,
            "device_peak_bytes": mem.get("peak_bytes_in_use"),
        }


def bench_run(name: str, steps: int, peak: float, variant: dict | None = None,
              dots: bool = False) -> dict:
    run = _Run(name, steps, variant)
    run.run(steps)
    result = run.result(peak)
    if dots:
        result.update(dots_alone(run, result))
    return result


def dots_alone(run: _Run, result: dict) -> dict:
    """The step's matmuls, each timed alone (loam.perf.dots_alone: every dot of the compiled
    step at its shapes), measured right after the run's timed steps: the FLOPs they execute
    against the model's (``matmul_flops_vs_model``: above 1 by what the backward pass recomputes),
    the sum of their times and its share of the median step time, and ``mfu_dots_alone``: the
    MFU of a step that took exactly that sum. A share near 1 says the step's time is its matmuls
    at the rates this machine's kernels reach for their shapes, not the work around them (the
    step can beat the sum a little: it runs independent matmuls side by side, one per core).
    The share is against the mean of the median step time before the dots were timed and that
    of as many steps again right after (``step_time_after_dots_s``): the machine's speed drifts
    less over the pair than from either side alone."""
    dots = perf.dots_alone(run.compiled.as_text())
    run.run(1, record=False)  # brings the step's buffers back after the dots ran
    after = float(np.median(run.run(max(2, run.steps), record=False)))
    around = (result["step_time_median_s"] + after) / 2
    model_flops = result["flops_per_token"] * run.batch_size * run.seq_len
    return {"matmul_flops_per_step": dots["matmul_flops"],
            "matmul_flops_vs_model": dots["matmul_flops"] / model_flops,
            "dots_alone_s": dots["seconds"], "step_time_after_dots_s": after,
            "dots_alone_share": dots["seconds"] / around,
            "mfu_dots_alone": model_flops / (dots["seconds"] * result["matmul_peak_flops"]),
            "distinct_dots": dots["distinct_dots"], "slowest_dots": dots["slowest_dots"]}


def interleaved(name: str, steps: int, peak: float, variants: list[dict],
                block: int = 2, dots: bool = False) -> list[dict]:
    """All ``variants`` of one model built first, then timed in alternation: each round gives each
    variant one unrecorded step and ``block`` recorded ones, in an order that turns every
    round, so that drift in the machine's speed (other tenants, clocks) and the place in a
    round fall on all of them alike. Each result carries ``vs_first``: the median over
    rounds of its mean step time divided by the first variant's in the same round, with the
    standard error of that ratio."""
    runs = [_Run(name, steps, v) for v in variants]
    for r in range(steps):
        # The order turns by one each round, so each variant takes each place in a round
        # equally often: a step right after another program's runs slower or faster.
        for run in runs[r % len(runs):] + runs[:r % len(runs)]:
            # One unrecorded step first: the step right after another program's pays for
            # bringing this one's buffers back (page faults, caches), more for the variant
            # with the larger footprint; the recorded steps are the steady state.
            run.run(1, record=False)
            run.run(block)
    base = np.asarray(runs[0].step_times).reshape(steps, block).mean(axis=1)
    out = []
    for run in runs:
        ratio = np.asarray(run.step_times).reshape(steps, block).mean(axis=1) / base
        result = run.result(peak)
        result["vs_first"] = {"step_time_ratio_median": float(np.median(ratio)),
                              "step_time_ratio_mean": float(ratio.mean()),
                              "step_time_ratio_se": float(ratio.std(ddof=1) / np.sqrt(len(ratio)))
                              if len(ratio) > 1 else None,
                              "rounds": len(ratio)}
        if dots:
            result.update(dots_alone(run, result))
        out.append(result)
    return out


def _xla_value(text: str) -> bool | int | float | str:
    """An XLA option's value as the compiler takes it: true/false as booleans, numbers as
    numbers, anything else (enums, lists) as text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_variant(text: str) -> dict:
    """'loss_impl=logits,scan_unroll=6' -> {"loss_impl": "logits", "scan_unroll": 6}; keys
    starting "xla_" are XLA compiler options for the run's compile, their values as
    `_xla_value` reads them (a list value keeps its commas:
    'xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE')."""
    fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    out: dict = {}
    last = None
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep and last is not None and last.startswith("xla_"):
            out[last] = f"{out[last]},{item}"  # an XLA option's list value: 'xla_x=A,B'
            continue
        if sep and key.startswith("xla_"):  # an XLA compiler option
            out[key], last = _xla_value(value), key
            continue
        if not sep or key not in fields:
            raise ValueError(f"{item!r} is not FIELD=VALUE with a ModelConfig field "
                             f"({', '.join(fields)}) or an XLA option (xla_...=VALUE)")
        last = key
        kind = str(fields[key])
        out[key] = (value.lower() in ("1", "true") if "bool" in kind
                    else int(value) if "int" in kind and "None" not in kind
                    else float(value) if "float" in kind else value)
    return out


def _run_all(args, names: list[str], variants: list[dict], dtype: str, peaks: list[float],
             runs: list[dict]) -> None:
    """Every run of every variant, each line printed as it finishes; a peak sample after each
    model."""
    for name in names:
        steps = args.steps or (1 if args.quick else TIMED_STEPS[name])
        if args.interleave and len(variants) > 1:
            results = interleaved(name, steps, max(peaks), variants, dots=args.dots)
        else:
            results = [bench_run(name, steps, max(peaks), variant, args.dots)
                       for variant in variants]
        for run in results:
            runs.append(run)
            print(json.dumps(run), flush=True)
        peaks.append(perf.matmul_peak_flops.__wrapped__(2048, 8, 2.0, dtype))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (a smoke test)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated run names")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per run (0: auto)")
    parser.add_argument("--variants", default="",
                        help="model settings to compare side by side, ';'-separated, each "
                        "'field=value,...' of ModelConfig (e.g. 'loss_impl=logits;"
                        "loss_impl=fused'); every run is measured once per variant")
    parser.add_argument("--interleave", action="store_true",
                        help="with --variants: time the variants in alternation, one step "
                        "each per round, and report each one's step time relative to the "
                        "first variant's in the same round (for a machine whose speed drifts)")
    parser.add_argument("--dots", action="store_true",
                        help="after each run, time every matmul of its compiled step alone and "
                        "report their sum (dots_alone_s), its share of the step time, the MFU "
                        "of a step that took just that (mfu_dots_alone) and the slowest dots")
    args = parser.parse_args(argv)
    try:
        variants = [_parse_variant(v) for v in args.variants.split(";")] if args.variants \
            else [{}]
    except ValueError as e:
        print(f"--variants: {e}", file=sys.stderr)
        return 2
    if args.steps < 0:
        print(f"--steps must be >= 0 (0: auto), got {args.steps}", file=sys.stderr)
        return 2
    names = [n for n in args.runs.split(",") if n]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        print(f"unknown run(s) {unknown}; choose from {list(RUNS)}", file=sys.stderr)
        return 2
    # On an accelerator the model computes in bfloat16 (mixed precision) and MFU is against the
    # device's bfloat16 matmul peak; on the CPU both are float32.
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    if dtype != "float32":
        variants = [{"dtype": dtype, **v} for v in variants]
    # The peak is measured before the first run and again after each model: this machine's
    # speed drifts (other tenants, clocks), and MFU is against the highest figure seen, so a
    # slow moment during one measurement can only lower the MFU, never raise it.
    peaks = [perf.matmul_peak_flops(2048, 8, 2.0, dtype)]
    runs: list[dict] = []
    try:
        _run_all(args, names, variants, dtype, peaks, runs)
    except ValueError as e:  # a variant the model or XLA refuses
        print(f"--variants: {e}", file=sys.stderr)
        return 2
    peak = max(peaks)
    for run in runs:
        run["mfu"] = run["flops_per_token"] * run["tokens_per_s"] / peak
        if "mfu_dots_alone" in run:
            run["mfu_dots_alone"] *= run["matmul_peak_flops"] / peak
        run["matmul_peak_flops"] = peak
    print(json.dumps({
        "runs": runs, "matmul_peak_flops": peak, "matmul_peak_dtype": dtype,
        "matmul_peak_samples": peaks,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
        "batches": "synthetic uniform random tokens, one segment per row",
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
