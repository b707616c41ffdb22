"""Perplexity under a reference model, with CCNet-style terciles, as a scorer.

Columns, per document: ``ppl_loss`` (the mean per-token loss in nats of a reference loam
checkpoint, EOS included, as training and evaluation count it), ``ppl`` (its exponential) and
``ppl_tercile`` (CCNet, Wenzek et al. 2020): 0 = head, 1 = middle, 2 = tail, cut at the 33rd
and 66th percentiles of the perplexities of the document's own domain.

A document is tokenized with the checkpoint's tokenizer (its ``data.tokenizer``), EOS appended,
and cut into chunks of the run's ``data.seq_len`` tokens, each predicted from its own start as
loam's causal objective lays it out (the first token of a chunk from the zero input), one chunk
per row: the loss of a document does not depend on which documents share its batch.

As Beam: documents in batches (BatchElements) through a DoFn that loads the checkpoint once per
worker (``setup``), then per domain (CombinePerKey) the two cut points, applied by a Map with
them as a side input.

    python -m loam.selection.score --scorer perplexity --param workdir=RUN [--param step=N]
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loam import paths
from loam import run as run_lib
from loam.data import objectives
from loam.data import vocab as vocab_lib
from loam.selection.base import Doc, PerDocument, Scorer, ScorerError, register

TERCILE_PERCENTILES = (33.0, 66.0)


class DocumentLoss:
    """A reference checkpoint, loaded once: the mean per-token loss of texts."""

    def __init__(self, workdir: str, step: int | None = None, batch_size: int = 8):


        # One device: a Beam worker is one process per core, and parameters replicated over a
        # host's devices would make every device run each whole batch.
        self.params, run, self.step = run_lib.load_params(workdir, step,
                                                          devices=jax.local_devices()[:1])
        config = run.config
        self.tokenizer = vocab_lib.get_tokenizer(config.data.get("tokenizer") or "bundled")
        self.seq_len = int(config.data.seq_len)
        self.chunk = objectives.get_objective("causal", self.tokenizer).max_input_len(
            self.seq_len)
        self.batch_size = batch_size
        model = run.model

        @jax.jit
        def token_nll(params, b):
            logits = model.apply({"params": params}, b["inputs"], segment_ids=b["segment_ids"],
                                 positions=b["positions"])  # causal: no prefix
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
            return nll * (b["segment_ids"] > 0)

        self._token_nll = token_nll

    def tokens(self, text: str) -> list[int]:
        return list(self.tokenizer.encode([text])[0]) + [int(self.tokenizer.eos_id)]

    def losses(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(mean loss in nats per token, tokens) of every text."""
        chunks: list[tuple[int, list[int]]] = []  # (text number, tokens)
        for i, ids in enumerate(self.tokenizer.encode(list(texts))):
            ids = list(ids) + [int(self.tokenizer.eos_id)]
            chunks += [(i, ids[s:s + self.chunk]) for s in range(0, len(ids), self.chunk)]
        total = np.zeros(len(texts))
        count = np.zeros(len(texts), np.int64)
        B, L = self.batch_size, self.seq_len
        for lo in range(0, len(chunks), B):
            rows = chunks[lo:lo + B]
            b = {k: np.zeros((B, L), np.int32) for k in
                 ("inputs", "targets", "segment_ids", "positions")}
            for r, (_, c) in enumerate(rows):
                n = len(c)
                b["targets"][r, :n] = c
                b["inputs"][r, 1:n] = c[:-1]
                b["segment_ids"][r, :n] = 1
                b["positions"][r, :n] = np.arange(n)
            nll = np.asarray(self._token_nll(self.params, b), np.float64)
            for r, (i, c) in enumerate(rows):
                total[i] += nll[r, :len(c)].sum()
                count[i] += len(c)
        return [(float(t / n), int(n)) for t, n in zip(total, count)]

    def loss(self, text: str) -> tuple[float, int]:
        return self.losses([text])[0]


def terciles(values, cuts) -> np.ndarray:
    """0 (head: at or below the first cut), 1 (middle) or 2 (tail: above the second cut)."""
    return np.searchsorted(np.asarray(cuts), np.asarray(values), side="left")


def tercile_cuts(values) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return (float("nan"), float("nan"))
    c = np.percentile(v, TERCILE_PERCENTILES)
    return float(c[0]), float(c[1])


class _ScoreBatch:
    """DoFn body: a batch of Docs -> (domain, index, loss) each; the model loads in setup."""

    def __init__(self, workdir: str, step: int | None, batch_size: int):
        self.workdir, self.step, self.batch_size = workdir, step, batch_size
        self.model: DocumentLoss | None = None

    def setup(self):
        if self.model is None:
            self.model = DocumentLoss(self.workdir, self.step, self.batch_size)

    def process(self, docs):
        self.setup()
        assert self.model is not None
        for d, (loss, _) in zip(docs, self.model.losses([d.text for d in docs])):
            yield d.domain, d.index, loss


def _dofn(workdir: str, step: int | None, batch_size: int):
    import apache_beam as beam  # noqa: PLC0415

    class ScoreBatch(_ScoreBatch, beam.DoFn):
        pass

    return ScoreBatch(workdir, step, batch_size)


@register
@dataclasses.dataclass
class Perplexity(Scorer):
    """Columns ``ppl_loss``, ``ppl`` and ``ppl_tercile`` under a reference checkpoint."""

    name = "perplexity"
    columns = ("ppl_loss", "ppl", "ppl_tercile")

    workdir: str = ""
    step: int = -1          # -1: the newest checkpoint
    batch_size: int = 32    # rows of seq_len tokens per forward pass

    def _step(self) -> int:
        steps = run_lib.checkpoint_steps(self.workdir)
        if not steps:
            raise ScorerError(f"{self.workdir} has no checkpoints; train the reference run "
                              "first or pass --param workdir=RUN of a trained run")
        if self.step < 0:
            return steps[-1]
        if self.step not in steps:
            raise ScorerError(f"{self.workdir} has no checkpoint for step {self.step}; "
                              f"available: {steps}")
        return self.step

    def check(self, catalog) -> None:
        if not self.workdir:
            raise ScorerError("--scorer perplexity needs --param workdir=RUN (a trained loam "
                              "run: the reference model)")
        if not paths.exists(paths.Path(self.workdir, "config.json")):
            raise ScorerError(f"{self.workdir} is not a loam run (no config.json); pass "
                              "--param workdir=RUN of a trained run")
        if self.batch_size < 1:
            raise ScorerError(f"perplexity batch_size must be >= 1, got {self.batch_size}")
        self._step()

    def inputs(self) -> dict[str, str]:
        cfg = paths.read_bytes(paths.Path(self.workdir, "config.json"))
        return {"checkpoint": f"{self.workdir}@{self._step()}",
                "config.json": hashlib.sha256(cfg).hexdigest()}

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        losses = (docs
                  | "PplBatch" >> beam.BatchElements(min_batch_size=1,
                                                     max_batch_size=4 * self.batch_size)
                  | "PplLoss" >> beam.ParDo(_dofn(self.workdir, self._step(), self.batch_size)))
        cuts = (losses
                | "PplByDomain" >> beam.Map(lambda s: (s[0], s[2]))
                | "PplDomainValues" >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
                | "PplCuts" >> beam.Map(lambda kv: (kv[0], tercile_cuts(kv[1]))))
        return losses | "PplTerciles" >> beam.Map(
            lambda s, c: (s[0], s[1], {"ppl_loss": s[2], "ppl": float(np.exp(s[2])),
                                       "ppl_tercile": float(terciles(s[2], c[s[0]]))}),
            c=beam.pvalue.AsDict(cuts))

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict | None:
        t = np.asarray(columns["ppl_tercile"], np.float64)
        loss = np.asarray(columns["ppl_loss"], np.float64)
        ok = np.isfinite(t)
        if not ok.any():
            return None
        tok = np.asarray(tokens, np.float64) if tokens is not None else np.ones_like(t)
        return {"documents": {name: int((t == k).sum()) for k, name in
                              enumerate(("head", "middle", "tail"))},
                "tokens": {name: int(tok[t == k].sum()) for k, name in
                           enumerate(("head", "middle", "tail"))},
                "mean_loss": float(loss[ok].mean()),
                "cuts_ppl": [float(x) for x in np.exp(tercile_cuts(loss[ok]))]}


@register
@dataclasses.dataclass
class Model(PerDocument):
    """``--scorer model``: the perplexity scorer's mean loss (nats/token, EOS included) alone,
    into a column named by ``column`` (``ref_loss`` by default), without terciles; NaN for an
    empty text. The checkpoint is loaded once per worker, on its first document."""
    name = "model"
    columns = ("ref_loss",)
    workdir: str = ""
    step: int = -1        # -1: the newest checkpoint
    column: str = "ref_loss"
    batch_size: int = 8

    def __post_init__(self):
        self.columns = (self.column,)
        self._loss: DocumentLoss | None = None

    def __getstate__(self):  # the loaded model stays on the worker that loaded it
        return {k: v for k, v in self.__dict__.items() if k != "_loss"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._loss = None

    def _reference(self) -> Perplexity:
        if not self.workdir:
            raise ScorerError("--scorer model needs --param workdir=RUN (a trained loam run)")
        return Perplexity(workdir=self.workdir, step=self.step, batch_size=self.batch_size)

    def check(self, catalog) -> None:
        self._reference().check(catalog)

    def inputs(self) -> dict[str, str]:
        """The run and step, and its config.json's sha256."""
        return self._reference().inputs()

    def score(self, doc: Doc) -> dict[str, float]:
        if not doc.text:
            return {self.column: float("nan")}
        if self._loss is None:
            self._loss = DocumentLoss(self.workdir, self._reference()._step(), self.batch_size)
        return {self.column: self._loss.loss(doc.text)[0]}
