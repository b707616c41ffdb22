"""The built-in scorers, registered by name for ``python -m loam.selection.score --scorer NAME``.

* ``heuristic``: Gopher/C4/FineWeb-style text signals and their combined ``quality`` in [0, 1]
  (``loam.selection.heuristics``).
* ``random``: a uniform [0, 1) number from a hash of the document id (a reproducible random
  subset: keep a range of it).
* ``model``: the mean per-token loss (nats) of a loam checkpoint on each document; the checkpoint
  is loaded once per worker, on its first document.

Scorers defined in other modules register themselves when imported: the block at the end of this
file imports them, so ``base.make`` finds every scorer.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from loam import paths
from loam import run as run_lib
from loam.selection import heuristics
from loam.selection.base import Doc, PerDocument, ScorerError, register


@register
@dataclasses.dataclass
class Heuristic(PerDocument):
    name = "heuristic"
    columns = (*heuristics.SIGNALS, "quality")

    def score(self, doc: Doc) -> dict[str, float]:
        s = heuristics.signals(doc.text)
        out = {k: float(s[k]) for k in heuristics.SIGNALS}
        out["quality"] = float(np.mean(list(heuristics.goodness(s).values())))
        return out

    def report(self, domain, columns, tokens):
        """How ``quality`` spreads over the domain: its deciles, and the documents and tokens
        above 0.5 (the point where the mean signal sits at its published threshold)."""
        q = np.asarray(columns["quality"], np.float64)
        ok = np.isfinite(q)
        good = ok & (q >= 0.5)
        return {"documents": int(ok.sum()), "tokens": int(np.asarray(tokens)[ok].sum()),
                "quality_deciles": [round(float(x), 4) for x in
                                    np.quantile(q[ok], np.linspace(0, 1, 11))] if ok.any()
                else [],
                "quality_above_half": {"documents": int(good.sum()),
                                       "tokens": int(np.asarray(tokens)[good].sum())}}


def id_uniform(doc_id: str) -> float:
    """A uniform [0, 1) number from a document id (float32-exact: the column's own value)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return float(np.float32(h / 2**64))


@register
@dataclasses.dataclass
class Random(PerDocument):
    name = "random"
    columns = ("random",)

    def score(self, doc: Doc) -> dict[str, float]:
        return {"random": id_uniform(doc.doc_id)}


@register
@dataclasses.dataclass
class Model(PerDocument):
    """Mean loss (nats/token) of every document under a trained run's checkpoint; NaN for a
    document with no predicted token. Long documents are scored in windows of the run's
    ``data.seq_len``."""
    name = "model"
    columns = ("ref_loss",)
    workdir: str = ""
    step: int = -1        # -1: the newest checkpoint
    column: str = "ref_loss"
    batch_size: int = 8

    def __post_init__(self):
        self.columns = (self.column,)
        self._state = None

    def __getstate__(self):  # the loaded model stays on the worker that loaded it
        return {k: v for k, v in self.__dict__.items() if k != "_state"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = None

    def check(self, catalog) -> None:
        if not self.workdir:
            raise ScorerError("--scorer model needs --param workdir=RUN (a trained loam run)")
        if not paths.exists(paths.Path(self.workdir, "config.json")):
            raise ScorerError(f"{self.workdir} is not a loam run (no config.json); pass "
                              "--param workdir=RUN of a trained run")

    def inputs(self) -> dict[str, str]:
        """The run and step, and its config.json's sha256 ("missing" once the run is gone)."""
        config = paths.Path(self.workdir or ".", "config.json")
        digest = (hashlib.sha256(paths.read_bytes(config)).hexdigest()
                  if self.workdir and paths.exists(config) else "missing")
        return {"checkpoint": f"{self.workdir}@{self.step}", "config.json": digest}

    def _load(self):
        if self._state is None:
            params, run, _ = run_lib.load_params(self.workdir,
                                                 None if self.step < 0 else self.step)
            model = run.model

            @jax.jit
            def nll(params, inputs, targets, segment_ids, positions):
                logits = model.apply({"params": params}, inputs, segment_ids=segment_ids,
                                     positions=positions)
                logp = jax.nn.log_softmax(logits.astype(jnp.float32))
                return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

            tokenizer = run_lib.build_catalog(run.config).tokenizer
            self._state = (params, nll, tokenizer, int(run.config.data.seq_len))
        return self._state

    def score(self, doc: Doc) -> dict[str, float]:
        params, nll, tokenizer, seq_len = self._load()
        ids = list(tokenizer.encode([doc.text])[0]) + [int(tokenizer.eos_id)]
        if len(ids) < 2:
            return {self.column: float("nan")}
        windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
        total, count = 0.0, 0
        for lo in range(0, len(windows), self.batch_size):
            rows = windows[lo:lo + self.batch_size]
            B = self.batch_size
            inputs = np.zeros((B, seq_len), np.int32)
            targets = np.zeros((B, seq_len), np.int32)
            weights = np.zeros((B, seq_len), np.float32)
            for r, w in enumerate(rows):
                n = len(w) - 1
                inputs[r, :n], targets[r, :n], weights[r, :n] = w[:-1], w[1:], 1.0
            segment_ids = (weights > 0).astype(np.int32)
            positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (B, seq_len))
            out = np.asarray(nll(params, inputs, targets, segment_ids, positions))
            total += float((out * weights).sum())
            count += int(weights.sum())
        return {self.column: total / count if count else float("nan")}


# Scorers defined in their own modules (they register themselves on import): one line each,
# in alphabetical order.
import loam.selection.color_filter  # noqa: E402,F401
import loam.selection.dedup  # noqa: E402,F401
import loam.selection.dsir  # noqa: E402,F401
import loam.selection.filters  # noqa: E402,F401
import loam.selection.perplexity  # noqa: E402,F401
import loam.selection.ratings  # noqa: E402,F401
import loam.selection.zipfit  # noqa: E402,F401
