"""CoLoR-Filter (Brandfonbrener et al. 2024): conditional loss reduction, as a scorer.

    color(x) = loss_prior(x) - loss_conditional(x)

``prior`` is a loam run trained on the broad data (``DIR`` or ``DIR:STEP``); the conditional
model is that prior fine-tuned on the target set. A document the fine-tuning made easier to
predict looks like the target: the higher ``color``, the more useful for it (select the top).
The losses are the perplexity scorer's mean per-token losses (``loam.selection.perplexity.
DocumentLoss``: EOS included, documents in chunks of the run's ``seq_len``), one instance per
checkpoint, both held by one DoFn and evaluated on each batch of documents in one pass.

The target (``target=``): ``DOMAIN`` (every document of a domain of the config), ``DOMAIN:train``
or ``DOMAIN:validation`` (one split), or a JSON-lines file with a ``text`` field, as for DSIR.

The conditional model is either given (``conditional=DIR[:STEP]``, a run fine-tuned elsewhere)
or trained by ``prepare`` (run by ``check``, so before the pipeline reads any document): the
prior's own config with ``init.checkpoint=PRIOR:STEP`` (parameters only: fresh optimizer and
schedule), trained for ``finetune_steps`` on the target documents (written as a JSON-lines source
beside the run), at ``finetune_lr`` (0: the prior's peak rate). It goes into
``{conditional_dir}/{key}/run`` (default ``$LOAM_CACHE_DIR/color_filter``, else
``~/.cache/loam/color_filter``), ``key`` a hash of the prior's and the target's fingerprints and
the fine-tuning parameters, and is reused while they are the same (an interrupted fine-tuning
resumes). The prior run is only read.

Columns: ``color``, and the two losses ``color_prior_loss`` and ``color_conditional_loss``
(nats per token; NaN for a document with no predicted token).

    python -m loam.selection.score --scorer color_filter --param prior=runs/ref \
        --param target=docs:train --param finetune_steps=50
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from loam import paths
from loam import run as run_lib
from loam import train as train_lib
from loam.selection.base import ScorerError, register
from loam.selection.dsir import TargetScorer
from loam.selection.perplexity import DocumentLoss


def resolve_run(spec: str, what: str, trained_by: str) -> tuple[str, int]:
    """(absolute DIR, STEP) of a run's checkpoint; ScorerError naming the fix otherwise."""
    if not spec:
        raise ScorerError(f"--scorer color_filter needs --param {what}=DIR[:STEP] ({trained_by})")
    try:
        where, step = run_lib.parse_init(spec, what)
    except run_lib.ConfigError as e:
        raise ScorerError(str(e)) from None
    if not paths.exists(paths.Path(where, "config.json")):
        raise ScorerError(f"{what}={spec}: {where} is not a loam run (no config.json); pass "
                          f"--param {what}=DIR[:STEP] of a trained run ({trained_by})")
    steps = run_lib.checkpoint_steps(where)
    if not steps:
        raise ScorerError(f"{what}={spec}: {where} has no checkpoints; train it until it saves "
                          f"one (config.checkpoint_every) or pass another run ({trained_by})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ScorerError(f"{what}={spec}: {where} has no checkpoint at step {step}; its "
                          f"checkpoints are at steps {steps}")
    return str(paths.absolute(where)), int(step)


def run_fingerprint(workdir: str, step: int) -> str:
    cfg = paths.read_bytes(paths.Path(workdir, "config.json"))
    return f"{workdir}@{step} (config.json sha256 {hashlib.sha256(cfg).hexdigest()})"


def default_conditional_dir() -> str:
    root = os.environ.get("LOAM_CACHE_DIR") or str(Path.home() / ".cache" / "loam")
    return str(Path(root) / "color_filter")


class _ScoreBatch:
    """DoFn body: a batch of Docs -> (domain, index, columns) each under both models, which
    load once per worker (setup)."""

    def __init__(self, prior: tuple[str, int], conditional: tuple[str, int], batch_size: int):
        self.runs, self.batch_size = (prior, conditional), batch_size
        self.models: tuple | None = None

    def setup(self):
        if self.models is None:
            self.models = tuple(DocumentLoss(w, s, self.batch_size) for w, s in self.runs)

    def process(self, docs):
        self.setup()
        assert self.models is not None
        texts = [d.text for d in docs]
        prior, conditional = (m.losses(texts) for m in self.models)
        for d, (p, _), (c, _) in zip(docs, prior, conditional):
            yield d.domain, d.index, {"color": p - c, "color_prior_loss": p,
                                      "color_conditional_loss": c}


def _dofn(prior, conditional, batch_size):
    import apache_beam as beam  # noqa: PLC0415

    class ScoreBatch(_ScoreBatch, beam.DoFn):
        pass

    return ScoreBatch(prior, conditional, batch_size)


@register
@dataclasses.dataclass
class ColorFilter(TargetScorer):
    """Column ``color``: the prior's loss minus the target-conditioned model's."""

    name = "color_filter"
    columns = ("color", "color_prior_loss", "color_conditional_loss")

    prior: str = ""
    target: str = ""
    finetune_steps: int = 50
    finetune_lr: float = 0.0       # 0: the prior's optim.lr
    conditional: str = ""          # a fine-tuned run DIR[:STEP]; empty: trained by prepare()
    conditional_dir: str = ""      # where prepare() trains it; empty: default_conditional_dir()
    batch_size: int = 8            # rows of seq_len tokens per forward pass of each model

    # ------------------------------------------------------------------ checks and inputs

    def check(self, catalog) -> None:
        if self.finetune_steps < 1 and not self.conditional:
            raise ScorerError(f"color_filter finetune_steps must be >= 1, got "
                              f"{self.finetune_steps}")
        if self.finetune_lr < 0:
            raise ScorerError(f"color_filter finetune_lr must be >= 0 (0: the prior's), got "
                              f"{self.finetune_lr}")
        if self.batch_size < 1:
            raise ScorerError(f"color_filter batch_size must be >= 1, got {self.batch_size}")
        resolve_run(self.prior, "prior", "a run trained on the broad data")
        if self.conditional:
            resolve_run(self.conditional, "conditional", "the prior fine-tuned on the target")
        super().check(catalog)   # the target: a domain, a split of one, or a file
        self.prepare()

    def _prior(self) -> tuple[str, int]:
        return resolve_run(self.prior, "prior", "a run trained on the broad data")

    def _key(self) -> str:
        target = self.inputs_target()
        blob = json.dumps({"prior": run_fingerprint(*self._prior()), "target": target,
                           "finetune_steps": int(self.finetune_steps),
                           "finetune_lr": float(self.finetune_lr)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def inputs_target(self) -> str:
        return TargetScorer.inputs(self)["target"]

    def conditional_run(self) -> tuple[str, int]:
        """(DIR, STEP) of the conditional model: the given one, or where prepare() trains it
        (which may not exist yet)."""
        if self.conditional:
            return resolve_run(self.conditional, "conditional",
                               "the prior fine-tuned on the target")
        root = self.conditional_dir or default_conditional_dir()
        return str(paths.absolute(paths.Path(root, self._key(), "run"))), int(self.finetune_steps)

    def inputs(self) -> dict[str, str]:
        workdir, step = self.conditional_run()
        done = step in run_lib.checkpoint_steps(workdir) and paths.exists(
            paths.Path(workdir, "config.json"))
        return {"prior": run_fingerprint(*self._prior()),
                "conditional": run_fingerprint(workdir, step) if done
                else f"{workdir}@{step} (not trained)",
                "target": self.inputs_target()}

    # ------------------------------------------------------------------ the conditional model

    def finetune_config(self, target_file: str, validation_file: str, prepared_dir: str):
        """The prior's config, fine-tuning from its checkpoint on the target documents (all of
        them train; ``validation_file``, the first of them under other ids, is what the run's
        own evaluation reads)."""

        prior, step = self._prior()
        c = run_lib.read_config(prior)
        n = int(self.finetune_steps)
        name = self.resolve().source.domain if self.resolve().source is not None else "target"
        with c.unlocked():
            c.steps = n
            del c["init"]
            c.init = {"checkpoint": f"{prior}:{step}", "carry": "params"}
            data = {"sources": {name: {"source": f"jsonl:{target_file}",
                                       "validation": f"jsonl:{validation_file}"}},
                    "prepared_dir": prepared_dir, "domains": [], "weights": "uniform",
                    "stages": [], "selection": {}}
            for key, value in data.items():  # replaced whole: the saved types may differ
                if key in c.data:
                    del c.data[key]
                c.data[key] = value
            c.data.replay.fraction = 0.0
            c.mixing.method = "static"
            if self.finetune_lr > 0:
                c.optim.lr = float(self.finetune_lr)
            c.optim.warmup_steps = max(1, n // 10)
            c.optim.anneal_start = 0
            c.eval_every = c.checkpoint_every = n
            c.keep_checkpoints = 1
            c.eval_dense.until = 0
            c.evals = []
            c.profile_steps = []
        return c

    def prepare(self) -> tuple[str, int]:
        """The conditional model's (DIR, STEP), fine-tuned from the prior on the target first
        unless it is given or already trained."""
        workdir, step = self.conditional_run()
        if self.conditional or step in run_lib.checkpoint_steps(workdir):
            return workdir, step

        root = paths.Path(workdir).parent
        paths.mkdir(root)
        files = {split: root / f"target.{split}.jsonl" for split in ("train", "validation")}
        if not all(paths.exists(f) for f in files.values()):
            texts = [t for t in self.resolve().texts() if t.strip()]
            for split, f in files.items():
                lines = [json.dumps({"id": f"{split}-{i}", "text": t}) for i, t in
                         enumerate(texts if split == "train" else texts[:16])]
                paths.atomic_write(f, "".join(line + "\n" for line in lines))
        print(f"color_filter: fine-tuning {self.prior} on {self.target} for "
              f"{self.finetune_steps} steps into {workdir}", flush=True)
        train_lib.train(self.finetune_config(str(files["train"]), str(files["validation"]),
                                             str(root / "prepared")), workdir)
        if step not in run_lib.checkpoint_steps(workdir):
            raise ScorerError(f"the fine-tuning into {workdir} ended without its checkpoint at "
                              f"step {step}; run the scoring again to resume it")
        return workdir, step

    # ------------------------------------------------------------------ scoring

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        return (docs
                | "ColorBatch" >> beam.BatchElements(min_batch_size=1,
                                                     max_batch_size=4 * self.batch_size)
                | "ColorLosses" >> beam.ParDo(_dofn(self._prior(), self.conditional_run(),
                                                    self.batch_size)))

    def report(self, domain, columns, tokens) -> dict[str, Any] | None:

        v = np.asarray(columns["color"], np.float64)
        ok = np.isfinite(v)
        if not ok.any():
            return None
        q = np.percentile(v[ok], [10, 50, 90])
        return {"documents": int(ok.sum()), "mean": float(v[ok].mean()),
                "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2]),
                "mean_prior_loss": float(np.nanmean(columns["color_prior_loss"])),
                "mean_conditional_loss": float(np.nanmean(columns["color_conditional_loss"]))}
