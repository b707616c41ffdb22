"""Log-likelihoods of continuations under a run's model: what every downstream evaluator asks.

A request is (context, continuation) as text. Both are tokenized as lm-evaluation-harness does
(the whole string, then the context alone: the continuation is what follows the context's
tokens; a trailing space of the context moves to the continuation), requests are packed several
to a row (segment ids and positions restart per request, as in training batches), and one jitted
forward pass of the model scores a batch of rows. A context longer than the model's window loses
its oldest tokens; an empty one is the end-of-document token that precedes every document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from loam import step as step_lib
from loam.model import sharding


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation's token log-probabilities (nats)
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens scored


def _forward(model):
    def scores(params, batch):
        logits_BxLxV = model.apply({"params": params}, batch["inputs"],
                                   segment_ids=batch["segment_ids"],
                                   positions=batch["positions"]).astype(jnp.float32)
        logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
        target_BxL = jnp.take_along_axis(logp_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
        greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]
        return target_BxL, greedy_BxL
    return scores


def _place(value: np.ndarray, sharding) -> jax.Array:
    """The same host array on every process; each places its own shards."""
    def shard(index):
        return value[index]
    return jax.make_array_from_callback(value.shape, sharding, shard)


class Scorer:
    """A model and its parameters on a mesh, scoring requests in fixed-shape batches (one
    compilation): ``rows`` rows of ``seq_len`` tokens."""

    def __init__(self, model, params, tokenizer, mesh, rows: int = 16):
        self.model, self.params, self.tokenizer, self.mesh = model, params, tokenizer, mesh
        self.seq_len = int(model.cfg.max_len)
        divisor = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES]))
        self.rows = max(divisor, -(-rows // divisor) * divisor)
        self._sharding = sharding.batch_sharding(mesh)
        self._step = step_lib.OnMesh(jax.jit(_forward(model)), mesh)
        self._cache: dict[str, list[int]] = {}

    def _encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tokenizer.encode([text])[0] if text else []
        return self._cache[text]

    def split_tokens(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) the way lm-evaluation-harness splits them."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else self._encode(continuation)
        return ctx, cont

    def token_requests(self, requests: Sequence[tuple[str, str]]
                       ) -> list[tuple[list[int], list[int]]]:
        return [self.split_tokens(c, x) for c, x in requests]

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Score]:
        return self.loglikelihood_tokens(self.token_requests(requests))

    def loglikelihood_tokens(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                             ) -> list[Score]:
        """Scores of token requests, in order. A continuation must have at least one token."""
        L = self.seq_len
        eos = int(self.tokenizer.eos_id)
        pieces = []  # (tokens, number of continuation tokens scored)
        for i, (ctx, cont) in enumerate(requests):
            if len(cont) == 0:
                raise ValueError(f"request {i} has an empty continuation: nothing to score")
            seq = list(ctx or [eos]) + list(cont)
            seq = seq[-(L + 1):]  # the oldest context tokens go first
            pieces.append((seq, min(len(cont), len(seq) - 1)))
        # First-fit packing, in request order: rows of at most L input positions.
        rows: list[list[int]] = []
        room: list[int] = []
        for i, (seq, _) in enumerate(pieces):
            need = len(seq) - 1
            for r, free in enumerate(room):
                if free >= need:
                    rows[r].append(i)
                    room[r] -= need
                    break
            else:
                rows.append([i])
                room.append(L - need)
        logprob = np.zeros(len(pieces))
        greedy = np.ones(len(pieces), bool)
        for start in range(0, len(rows), self.rows):
            chunk = rows[start:start + self.rows]
            batch = {k: np.zeros((self.rows, L), np.int32)
                     for k in ("inputs", "targets", "segment_ids", "positions")}
            owner = np.full((self.rows, L), -1)
            scored = np.zeros((self.rows, L), bool)
            for r, members in enumerate(chunk):
                at = 0
                for s, i in enumerate(members, start=1):
                    seq, n = pieces[i]
                    m = len(seq) - 1
                    batch["inputs"][r, at:at + m] = seq[:-1]
                    batch["targets"][r, at:at + m] = seq[1:]
                    batch["segment_ids"][r, at:at + m] = s
                    batch["positions"][r, at:at + m] = np.arange(m)
                    owner[r, at + m - n:at + m] = i
                    scored[r, at + m - n:at + m] = True
                    at += m
            placed = {k: _place(v, self._sharding) for k, v in batch.items()}
            lp, gr = jax.device_get(self._step(self.params, placed))
            ids = owner[scored]
            np.add.at(logprob, ids, np.asarray(lp, np.float64)[scored])
            np.logical_and.at(greedy, ids, np.asarray(gr)[scored])
        return [Score(float(logprob[i]), bool(greedy[i]), n)
                for i, (_, n) in enumerate(pieces)]
