"""Per-domain evaluation: validation loss and bits per byte, against a unigram baseline.

    python -m loam.eval --workdir DIR [--step N | --all]

The held-out set is fixed by the config (the validation split of each domain, packed
deterministically, capped at `config.eval_tokens` tokens per domain), so numbers from different
steps and runs are comparable. Results go to DIR/eval/step_N.json, eval.jsonl and TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np

from loam import checkpoint as ckpt_lib
from loam import metrics as metrics_lib
from loam import step as step_lib
from loam.data import corpora, mixture, objectives, tokenized
from loam.model import sharding

LN2 = math.log(2.0)


class EvalSet:
    """One domain's fixed held-out batches, the bytes of text they cover, and a unigram baseline."""

    def __init__(self, domain: str, config, vocab_size: int):
        objective = objectives.get_objective(config.data.objective)
        self.domain = domain
        self.batches, self.bytes = mixture.eval_batches(
            domain, objective, config.data.seq_len, config.eval_batch_size, config.eval_tokens,
            data_dir=config.data.dir or None)
        self.tokens = float(sum(b["loss_weights"].sum() for b in self.batches))
        self.unigram_loss = self._unigram(domain, config, vocab_size)

    def _unigram(self, domain, config, vocab_size) -> float:
        """Cross-entropy of an add-½ unigram model fitted on the domain's training tokens."""
        corpus = tokenized.TokenizedCorpus(domain, data_dir=config.data.dir or None)
        counts = np.bincount(corpus.split("train").tokens, minlength=vocab_size) + 0.5
        logp = np.log(counts / counts.sum())
        total = sum(float(-(logp[b["targets"]] * b["loss_weights"]).sum()) for b in self.batches)
        return total / max(self.tokens, 1.0)


class Evaluator:
    def __init__(self, model, mesh, config, stream=None):
        self.config = config
        self.mesh = mesh
        self.domains = list(config.data.domains)
        self.eval_step = step_lib.make_eval_step(model, mesh, len(corpora.DOMAIN_NAMES))
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._sets = None
        self._vocab_size = model.cfg.vocab_size
        self.stream = stream

    @property
    def sets(self) -> list[EvalSet]:
        if self._sets is None:
            self._sets = [EvalSet(d, self.config, self._vocab_size) for d in self.domains]
        return self._sets

    def run(self, params, step: int, writer: metrics_lib.MetricWriter | None = None,
            out_dir: Path | None = None) -> dict:
        per_domain = {}
        for i, es in enumerate(self.sets):
            loss_sum = 0.0
            for b in es.batches:
                # The same host array on every process; each places its own shards.
                batch = {k: jax.make_array_from_callback(v.shape, self.batch_sharding,
                                                         lambda idx, v=v: v[idx])
                         for k, v in b.items()}
                loss_sum += float(jax.device_get(self.eval_step(params, batch))["loss_sum"])
            loss = loss_sum / max(es.tokens, 1.0)
            per_domain[es.domain] = {
                "loss": loss, "bits_per_byte": loss_sum / LN2 / max(es.bytes, 1),
                "tokens": es.tokens, "bytes": es.bytes,
                "unigram_loss": es.unigram_loss,
                "unigram_bits_per_byte": es.unigram_loss * es.tokens / LN2 / max(es.bytes, 1)}
        tokens = sum(v["tokens"] for v in per_domain.values())
        record = {
            "eval_step": step,
            "per_domain": per_domain,
            "loss_token_weighted": sum(v["loss"] * v["tokens"] for v in per_domain.values())
            / max(tokens, 1),
            "loss_domain_mean": float(np.mean([v["loss"] for v in per_domain.values()])),
            "bits_per_byte_domain_mean": float(np.mean(
                [v["bits_per_byte"] for v in per_domain.values()])),
            "unigram_loss_domain_mean": float(np.mean(
                [v["unigram_loss"] for v in per_domain.values()])),
        }
        if self.stream is not None:
            record["mixture_weights"] = dict(zip(
                self.domains, map(float, self.stream.weights_at(max(step - 1, 0)))))
        if writer is not None and writer.enabled:  # process 0 of a multi-process run
            writer.write(step, record)
            writer.flush()
            out = Path(out_dir or writer.workdir / "eval")
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step_{step}.json").write_text(json.dumps(record, indent=2))
        return record


def quiet_orbax():
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)


def format_table(record: dict) -> str:
    rows = [f"{'domain':12s} {'loss':>7s} {'bpb':>7s} {'unigram':>8s} {'unigram bpb':>11s}"]
    for d, v in record["per_domain"].items():
        rows.append(f"{d:12s} {v['loss']:7.3f} {v['bits_per_byte']:7.3f} "
                    f"{v['unigram_loss']:8.3f} {v['unigram_bits_per_byte']:11.3f}")
    rows.append(f"{'mean':12s} {record['loss_domain_mean']:7.3f} "
                f"{record['bits_per_byte_domain_mean']:7.3f} "
                f"{record['unigram_loss_domain_mean']:8.3f}")
    return f"eval at step {record['eval_step']}\n" + "\n".join(rows)


def open_run(workdir: str | Path) -> dict:
    """A run directory's config, model, mesh and checkpointer, ready to restore any step."""
    import ml_collections

    from loam import train as train_lib
    from loam.data import vocab as vocab_lib
    from loam.model.transformer import Transformer

    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: --workdir must be a loam run directory "
                                "(created by python -m loam.train)")
    config = ml_collections.ConfigDict(json.loads(cfg_path.read_text()))
    vocab = vocab_lib.default_vocabulary()
    model = Transformer(train_lib.build_model_config(config, vocab.vocab_size))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    optimizer = step_lib.make_optimizer(train_lib.lr_schedule(config), config.optim.weight_decay)
    state, shardings = step_lib.init_state(model, optimizer, jax.random.PRNGKey(0), mesh,
                                           config.data.seq_len, config.data.batch_size)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    if not checkpointer.steps():
        raise FileNotFoundError(f"no checkpoints in {workdir / 'checkpoints'}")
    return {"workdir": workdir, "config": config, "model": model, "mesh": mesh,
            "checkpointer": checkpointer, "abstract": ckpt_lib.abstract_like(state, shardings)}


def load_run(workdir: str | Path, step: int | None = None) -> dict:
    """open_run plus the parameters of `step` (default: the newest checkpoint)."""
    run = open_run(workdir)
    available = run["checkpointer"].steps()
    step = available[-1] if step is None else step
    if step not in available:
        raise ValueError(f"no checkpoint for step {step} in {run['workdir']}; available: "
                         f"{available}")
    state, _ = run["checkpointer"].restore(step, run["abstract"])
    return dict(run, params=state.params, step=step)


def evaluate_workdir(workdir: str | Path, steps: list[int] | None = None,
                     all_steps: bool = False) -> list[dict]:
    """Evaluates checkpoints of a run directory (default: the newest)."""
    run = open_run(workdir)
    checkpointer = run["checkpointer"]
    available = checkpointer.steps()
    if all_steps:
        wanted = available
    elif steps:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise ValueError(f"no checkpoint for step(s) {missing}; available: {available}")
        wanted = steps
    else:
        wanted = [available[-1]]
    evaluator = Evaluator(run["model"], run["mesh"], run["config"])
    writer = metrics_lib.MetricWriter(run["workdir"], "eval", jsonl="eval.jsonl",
                                      enabled=jax.process_index() == 0)
    records = []
    try:
        for s in wanted:
            restored, _ = checkpointer.restore(s, run["abstract"])
            records.append(evaluator.run(restored.params, s, writer))
            print(format_table(records[-1]), flush=True)
    finally:
        writer.close()
        checkpointer.close()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-domain evaluation of a loam run's checkpoints.")
    p.add_argument("--workdir", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, action="append", help="checkpoint step (repeatable)")
    g.add_argument("--all", action="store_true", help="every checkpoint in the run")
    args = p.parse_args(argv)
    quiet_orbax()
    try:
        evaluate_workdir(args.workdir, args.step, args.all)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
