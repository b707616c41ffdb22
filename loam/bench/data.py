"""Data-pipeline throughput: loam's MixtureStream against a plain seqio pipeline, same run.

    python -m loam.bench.data [--batches 150] [--batch_size 16] [--seq_len 512]

Both read the five bundled domains with the causal objective at the same per-domain weights
(proportional to training tokens): the stream through ``MixtureStream.batch(step)``, seqio
through ``seqio.get_dataset`` over a Mixture of the ``loam.<domain>.causal`` tasks with
``DecoderFeatureConverter(pack=True)``, iterated as numpy. Each is warmed up (tokenizer cache,
tfds preparation and pipeline start-up excluded), then timed over the same number of batches.
Tokens are non-padding positions. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np

from loam.data import corpora, recipes
from loam.data import stream as stream_lib


def _time_batches(next_batch, n: int, segment_key: str) -> tuple[float, int, int]:
    """(seconds, real tokens, positions) for n batches."""
    tokens = positions = 0
    start = time.perf_counter()
    for _ in range(n):
        seg = next_batch()[segment_key]
        tokens += int(np.count_nonzero(seg))
        positions += seg.size
    return time.perf_counter() - start, tokens, positions


def bench_stream(domains, weights, args) -> dict:
    t0 = time.perf_counter()
    stream = stream_lib.MixtureStream(domains, "causal", weights, seq_len=args.seq_len,
                                      batch_size=args.batch_size, seed=args.seed)
    for step in range(args.warmup):
        stream.batch(step)
    setup = time.perf_counter() - t0
    steps = iter(range(args.warmup, args.warmup + args.batches))
    secs, tokens, positions = _time_batches(lambda: stream.batch(next(steps)), args.batches,
                                            "segment_ids")
    return {"setup_s": setup, "seconds": secs, "tokens": tokens, "positions": positions}


@contextlib.contextmanager
def _native_stderr_silenced():
    """TensorFlow's C++ runtime prints CUDA-driver and oneDNN notices to the process's stderr
    when it loads, on every CPU-only machine; they are not errors of this benchmark. Python's
    own errors still surface: the descriptor is restored before any exception propagates."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def bench_seqio(domains, weights, args) -> dict:
    t0 = time.perf_counter()
    with _native_stderr_silenced():
        import seqio  # noqa: PLC0415 — only this half of the benchmark needs seqio/TF

        from loam.data import tasks  # noqa: PLC0415
    mix = seqio.Mixture("loam.bench.causal", [(tasks.task_name(d, "causal"), float(weights[d]))
                                              for d in domains])
    ds = seqio.get_dataset(mix, task_feature_lengths={"targets": args.seq_len},
                           feature_converter=seqio.DecoderFeatureConverter(pack=True),
                           dataset_split="train", shuffle=True, seed=args.seed,
                           num_epochs=None, batch_size=args.batch_size)
    it = ds.as_numpy_iterator()
    import_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        next(it)
    setup = time.perf_counter() - t0
    secs, tokens, positions = _time_batches(lambda: next(it), args.batches,
                                            "decoder_segment_ids")
    return {"setup_s": setup, "import_and_build_s": import_s, "seconds": secs, "tokens": tokens,
            "positions": positions}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=150, help="timed batches per pipeline")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.batches < 1 or args.warmup < 1:
        p.error("--batches and --warmup must be at least 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    domains = list(corpora.DOMAIN_NAMES)
    weights = recipes.proportional(dict(zip(domains, recipes.domain_sizes(domains))))
    stream = bench_stream(domains, weights, args)
    seq = bench_seqio(domains, weights, args)
    report = {
        "domains": domains,
        "objective": "causal",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "timed_batches": args.batches,
        "weights": {d: round(w, 4) for d, w in weights.items()},
        "stream_tokens_per_s": stream["tokens"] / stream["seconds"],
        "seqio_tokens_per_s": seq["tokens"] / seq["seconds"],
        "padding_fraction": 1.0 - stream["tokens"] / stream["positions"],
        "seqio_padding_fraction": 1.0 - seq["tokens"] / seq["positions"],
        "stream_seconds": stream["seconds"], "seqio_seconds": seq["seconds"],
        "stream_tokens": stream["tokens"], "seqio_tokens": seq["tokens"],
        "stream_setup_s": stream["setup_s"],
        "seqio_setup_s": seq["setup_s"],
        "seqio_pipeline": "seqio.get_dataset(Mixture of loam.<domain>.causal, "
                          "DecoderFeatureConverter(pack=True), shuffle=True)",
        "cpu_count": os.cpu_count(),
    }
    report["speedup"] = report["stream_tokens_per_s"] / report["seqio_tokens_per_s"]
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
