"""Sampling from a trained run: greedy, temperature, top-k and top-p, with a key/value cache.

    python -m loam.generate --workdir DIR --prompt "And God said" [--max_new_tokens 64]
        [--temperature 0.8 --top_k 40 --top_p 0.95 --seed 0] [--num_samples 3] [--step N]

In a notebook::

    from loam import generate
    sampler = generate.Sampler("runs/default")          # parameters and tokenizer, loaded once
    sampler.sample("And God said", max_new_tokens=40)  # greedy
    sampler.sample("def main(", temperature=0.8, top_p=0.95, seed=1)

The whole decode is one jitted function: the prompt fills the cache in one pass (prefill), then
a `lax.while_loop` samples one token per step through the cache, stopping when every sequence
has produced the end-of-sequence token. `use_cache=False` recomputes the full forward pass at
every step instead (the reference the cache is tested and benchmarked against). The model
continues the prompt as a document of the run's training data (no BOS: loam's documents have
none); the context is the run's `data.seq_len`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import unicodedata
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loam import cli
from loam import run as run_lib
from loam.data import vocab as vocab_lib
from loam.model.transformer import Transformer, init_cache


class GenerateError(cli.UserError):
    """A sampling request that cannot run; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax; top_k and top_p unused);
    top_k 0 and top_p 1 keep the whole distribution."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self, vocab_size: int) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerateError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 <= self.top_k <= vocab_size:
            raise GenerateError(f"top_k={self.top_k} must be in [0, {vocab_size}] (0: no top-k)")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p={self.top_p} must be in (0, 1] (1: no nucleus cut)")


def sample_logits(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token id per row: argmax at temperature 0, else a draw from softmax(logits / T)
    restricted to the top_k largest logits and to the smallest set of tokens whose probability
    reaches top_p (ties at either threshold are kept)."""
    logits = logits_BxV.astype(jnp.float32)
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth_Bx1, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        kept = jnp.where(before < sampling.top_p, sorted_BxV, jnp.inf)
        threshold_Bx1 = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold_Bx1, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.cache
def decoder(model: Transformer, prompt_len: int, max_new_tokens: int, sampling: Sampling,
            eos_id: int, pad_id: int, use_cache: bool = True):
    """jit(params, prompts_BxP, valid_BxP) -> (tokens_BxN, steps): N new tokens per row (pad_id
    after a row's EOS) and the number of decode steps run. Prompts are left-padded (valid 0 on
    the padding), so every row's next token goes to the same slot."""
    p, n = prompt_len, max_new_tokens
    slots = p + n

    def run(params, prompts_BxP, valid_BxP):
        b = prompts_BxP.shape[0]
        variables: dict[str, Any] = {"params": params}
        pad_B = p - valid_BxP.sum(axis=1)
        positions_BxS = jnp.maximum(jnp.arange(slots)[None, :] - pad_B[:, None], 0)
        base_key = jax.random.key(sampling.seed)
        if use_cache:
            prefill: Any = model.apply(variables, prompts_BxP, segment_ids=valid_BxP,
                                       positions=positions_BxS[:, :p],
                                       cache=init_cache(model.cfg, b, slots))
            logits, cache = prefill
            state: tuple[Any, Any] = (logits[:, -1], cache)
        else:
            tokens_BxS = jnp.zeros((b, slots), jnp.int32).at[:, :p].set(prompts_BxP)
            segments_BxS = jnp.ones((b, slots), jnp.int32).at[:, :p].set(valid_BxP)
            full: Any = model.apply(variables, tokens_BxS, segment_ids=segments_BxS,
                                    positions=positions_BxS)
            state = (full[:, p - 1], tokens_BxS)

        def step(carry):
            i, done_B, out_BxN, (last_BxV, memory) = carry
            token_B = sample_logits(last_BxV, jax.random.fold_in(base_key, i), sampling)
            token_B = jnp.where(done_B, pad_id, token_B)
            out_BxN = out_BxN.at[:, i].set(token_B)
            done_B = done_B | (token_B == eos_id)
            if use_cache:
                logits, memory = model.apply(variables, token_B[:, None],
                                             positions=(p + i - pad_B)[:, None], cache=memory)
                last_BxV = logits[:, 0]
            else:  # the whole sequence again; causal attention ignores the slots not yet filled
                memory = memory.at[:, p + i].set(token_B)
                logits = model.apply(variables, memory, segment_ids=segments_BxS,
                                     positions=positions_BxS)
                last_BxV = jax.lax.dynamic_index_in_dim(logits, p + i, axis=1, keepdims=False)
            return i + 1, done_B, out_BxN, (last_BxV, memory)

        def going(carry):
            i, done_B = carry[:2]
            return (i < n) & ~jnp.all(done_B)

        carry = (jnp.zeros((), jnp.int32), jnp.zeros((b,), bool),
                 jnp.full((b, n), pad_id, jnp.int32), state)
        i, _, out_BxN, _ = jax.lax.while_loop(going, step, carry)
        return out_BxN, i

    return jax.jit(run)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxP, valid_BxP): token lists right-aligned in one array."""
    p = max(len(t) for t in prompts)
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    valid = np.zeros((len(prompts), p), np.int32)
    for row, t in enumerate(prompts):
        if len(t):
            tokens[row, p - len(t):] = t
            valid[row, p - len(t):] = 1
    return tokens, valid


def generate_tokens(model: Transformer, params, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int, sampling: Sampling = Sampling(), *, eos_id: int,
                    pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """The new tokens of every prompt (token ids), each up to and including its EOS."""
    context = model.cfg.max_len
    if not prompts or any(len(t) == 0 for t in prompts):
        raise GenerateError("a prompt is empty: give at least one token to continue")
    longest = max(len(t) for t in prompts)
    if longest >= context:
        raise GenerateError(f"the prompt is {longest} tokens but the model's context is {context} "
                            f"(the run's data.seq_len): shorten it to at most {context - 1} "
                            "tokens, leaving room for at least one new token")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if longest + max_new_tokens > context:
        raise GenerateError(f"the prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} "
                            f"exceed the model's context of {context} tokens (the run's "
                            f"data.seq_len): ask for at most {context - longest} new tokens")
    sampling.check(model.cfg.vocab_size)
    tokens, valid = left_pad(prompts, pad_id)
    run = decoder(model, tokens.shape[1], max_new_tokens, sampling, eos_id, pad_id, use_cache)
    out, steps = jax.device_get(run(params, tokens, valid))
    result = []
    for row in np.asarray(out)[:, : int(steps)]:
        row = row.tolist()
        result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return result


def _describe(ch: str) -> str:
    return f"{ch!r} (U+{ord(ch):04X} {unicodedata.name(ch, 'unnamed')})"


def encode_prompt(tokenizer: vocab_lib.Tokenizer, text: str) -> list[int]:
    """The prompt's ids; GenerateError naming the characters the tokenizer cannot represent
    (a tokenizer without byte fallback maps them to its unknown token)."""
    ids = tokenizer.encode([text])[0]
    if tokenizer.decode(ids) != text:
        lost = [c for c in dict.fromkeys(text)
                if not c.isspace() and c not in tokenizer.decode(tokenizer.encode([c])[0])]
        if lost:
            shown = ", ".join(_describe(c) for c in lost[:5])
            more = f" and {len(lost) - 5} more" if len(lost) > 5 else ""
            raise GenerateError(
                f"the tokenizer ({tokenizer.spec}) cannot encode {shown}{more} in the prompt: it "
                "has no token for them and no byte fallback; remove or replace those characters")
    return ids


class Sampler:
    """A run's model, parameters (one checkpoint) and tokenizer, loaded once; `sample` many
    times. Parameters go to one device unless `devices` says otherwise."""

    def __init__(self, workdir, step: int | None = None, devices=None):
        self.params, run, self.step = load(workdir, step, devices)
        self.model = run.model
        self.config = run.config
        self.tokenizer = vocab_lib.get_tokenizer(run.config.data.get("tokenizer") or "bundled")
        run.close()

    @property
    def context(self) -> int:
        return self.model.cfg.max_len

    def sample(self, prompt: str | Sequence[str], max_new_tokens: int | None = None, *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               use_cache: bool = True) -> str | list[str]:
        """The continuation of a prompt (or of each prompt of a list), as text. Without
        max_new_tokens: up to 64 tokens, or as many as the context leaves."""
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [encode_prompt(self.tokenizer, t) for t in texts]
        if max_new_tokens is None:
            longest = max((len(t) for t in prompts), default=0)
            max_new_tokens = max(1, min(64, self.context - longest))
        out = generate_tokens(self.model, self.params, prompts, max_new_tokens,
                              Sampling(temperature, top_k, top_p, seed),
                              eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                              use_cache=use_cache)
        decoded = [self._continuation(p, t) for p, t in zip(prompts, out)]
        return decoded[0] if isinstance(prompt, str) else decoded

    def _continuation(self, prompt: list[int], new: list[int]) -> str:
        """The new tokens' text as it reads after the prompt (decoded with it: a SentencePiece
        piece's leading space is dropped at the start of a text, not after the prompt)."""
        before = self.tokenizer.decode(prompt)
        whole = self.tokenizer.decode(prompt + new)
        return whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(new)


def load(workdir, step: int | None = None, devices=None):
    """(params, run, step) of a run directory's checkpoint (default: the newest), with a
    message that says what to do when the directory holds none."""
    if devices is None:
        devices = jax.local_devices()[:1]
    try:
        return run_lib.load_params(os.fspath(workdir), step, devices=devices)
    except FileNotFoundError as e:
        if "no checkpoints" in str(e):
            raise GenerateError(f"{e}: {workdir} has no trained checkpoint yet; train it first "
                                f"(python -m loam.train --config FILE --workdir {workdir}) or "
                                "point --workdir at a run that has one") from None
        raise


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run directory (python -m loam.train)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="default: 64, or what the context leaves")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
    p.add_argument("--top_k", type=int, default=0, help="0: no top-k cut")
    p.add_argument("--top_p", type=float, default=1.0, help="1: no nucleus cut")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_samples", type=int, default=1,
                   help="samples of the same prompt (one batch; each row its own draws)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--no_cache", action="store_true",
                   help="recompute the whole sequence at every step (slow; for comparison)")
    args = p.parse_args(argv)
    cli.quiet_logs()
    with cli.user_errors():
        if args.num_samples < 1:
            raise GenerateError(f"--num_samples={args.num_samples} must be >= 1")
        sampler = Sampler(args.workdir, args.step)
        texts = sampler.sample([args.prompt] * args.num_samples, args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               seed=args.seed, use_cache=not args.no_cache)
        for i, text in enumerate(texts):
            if args.num_samples > 1:
                print(f"--- sample {i + 1} (step {sampler.step})")
            print(args.prompt + text, flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
