"""Sampling speed: the key/value-cache decoder against full recomputation at every step.

    python -m loam.bench.generate [--size tiny] [--context 256] [--prompt_len 32] [--batch 1]

Both sides are `loam.generate.decoder` on the same freshly initialised model, prompt and
device, greedy, compiled before timing, with no end-of-sequence stop (every run produces
context - prompt_len tokens); the best of `--rounds` runs counts. Without the cache every new
token costs a forward pass over the whole context; with it, one token's pass over the cache.
Prints one JSON object per line; the last line is the summary (with `same_tokens`: whether
the two decoders produced the same greedy tokens).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from loam import generate
from loam import step as step_lib
from loam.data import vocab
from loam.model import sizes
from loam.model.transformer import Transformer


def _time(fn, rounds: int) -> float:
    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def run(size: str = "tiny", context: int = 256, prompt_len: int = 32, batch: int = 1,
        rounds: int = 3, seed: int = 0) -> dict:
    cfg = sizes.get_size(size, vocab.VOCAB_SIZE, max_len=context, tied_embeddings=False)
    model = Transformer(cfg)
    device = jax.local_devices()[0]
    init = jax.jit(lambda r: step_lib._unbox(model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]))
    params = jax.device_put(init(jax.random.key(seed)), device)
    new_tokens = context - prompt_len
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, cfg.vocab_size - vocab.NUM_SENTINELS, (batch, prompt_len),
                           dtype=np.int32)
    valid = np.ones_like(prompts)
    counts = sizes.count_params(cfg)
    print(json.dumps({"size": size, "params_total": counts["total"], "context": context,
                      "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch,
                      "device": str(device)}), flush=True)
    out, tokens = {}, {}
    for name, use_cache in (("cache", True), ("no_cache", False)):
        decode = generate.decoder(model, prompt_len, new_tokens, generate.Sampling(), eos_id=-1,
                                  pad_id=0, use_cache=use_cache)
        seconds = _time(lambda decode=decode: decode(params, prompts, valid), rounds)
        out[name] = batch * new_tokens / seconds
        tokens[name] = np.asarray(decode(params, prompts, valid)[0])
        print(json.dumps({"decoder": name, "seconds": round(seconds, 4),
                          "tokens_per_s": round(out[name], 1)}), flush=True)
    summary = {"bench": "generate", "size": size, "context": context, "batch": batch,
               "tokens_per_s_cache": round(out["cache"], 1),
               "tokens_per_s_no_cache": round(out["no_cache"], 1),
               "cache_speedup": round(out["cache"] / out["no_cache"], 2),
               # Both decoders produced the same greedy tokens.
               "same_tokens": bool(np.array_equal(tokens["cache"], tokens["no_cache"]))}
    print(json.dumps(summary), flush=True)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="tiny", choices=sizes.SIZE_NAMES)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if not 0 < args.prompt_len < args.context:
        p.error("--prompt_len must be in [1, --context)")
    run(args.size, args.context, args.prompt_len, args.batch, args.rounds)


if __name__ == "__main__":
    main()
