"""Per-domain evaluation: validation loss and bits per byte, against a unigram baseline.

    python -m loam.eval --workdir DIR [--step N | --all]

The held-out set is fixed by the config (the validation split of each domain, packed
deterministically, capped at `config.eval_tokens` tokens per domain), so numbers from different
steps and runs are comparable. The downstream evaluators of `config.evals` (loam/evals/: probes
built from held-out documents, multiple-choice and cloze task files) add their metrics under
"downstream". Results go to DIR/eval/step_N.json, eval.jsonl and TensorBoard (DIR a local path
or gs://bucket/run, as loam.train takes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import jax
import numpy as np

from loam import cli, evals, paths
from loam import metrics as metrics_lib
from loam import run as run_lib
from loam import step as step_lib
from loam.data import heldout
from loam.data.stream import BLOCK_TOKENS
from loam.evals.scoring import Scorer
from loam.model import sharding
from loam.workdir import write_json

LN2 = math.log(2.0)


class EvalSet:
    """One domain's fixed held-out batches, the bytes of text they cover, and a unigram baseline."""

    def __init__(self, domain: str, config, vocab_size: int):
        objective = run_lib.build_objective(config)
        self.domain = domain
        self.batches, self.bytes = heldout.eval_batches(
            domain, objective, config.data.seq_len, config.eval_batch_size, config.eval_tokens,
            catalog=run_lib.build_catalog(config))
        self.tokens = float(sum(b["loss_weights"].sum() for b in self.batches))
        self.unigram_loss = self._unigram(domain, config, vocab_size)

    def _unigram(self, domain, config, vocab_size) -> float:
        """Cross-entropy of an add-½ unigram model fitted on the domain's training tokens."""
        counts = np.full(vocab_size, 0.5)
        for block in run_lib.build_catalog(config).blocks(domain, "train", BLOCK_TOKENS):
            counts += np.bincount(block.tokens, minlength=vocab_size)
        logp = np.log(counts / counts.sum())
        total = sum(float(-(logp[b["targets"]] * b["loss_weights"]).sum()) for b in self.batches)
        return total / max(self.tokens, 1.0)


def _same_on_every_process(value: np.ndarray, sharding) -> jax.Array:
    def shard(index):
        return value[index]
    return jax.make_array_from_callback(value.shape, sharding, shard)


class Evaluator:
    def __init__(self, model, mesh, config, stream=None):
        self.config = config
        self.mesh = mesh
        self.domains = run_lib.mixture_domains(config)
        self.eval_step = step_lib.make_eval_step(model, mesh, run_lib.num_domains(config))
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._sets = None
        self._vocab_size = model.cfg.vocab_size
        self.stream = stream
        self.model = model
        # Checked (and task files read) now: a bad entry stops a run before it trains.
        self.downstream = evals.build(config.get("evals") or [], config)

    @property
    def sets(self) -> list[EvalSet]:
        if self._sets is None:
            self._sets = [EvalSet(d, self.config, self._vocab_size) for d in self.domains]
        return self._sets

    def run(self, params, step: int, writer: metrics_lib.MetricWriter | None = None,
            out_dir: paths.PathLike | None = None) -> dict:
        per_domain = {}
        for es in self.sets:
            loss_sum = 0.0
            for b in es.batches:
                # The same host array on every process; each places its own shards.
                batch = {k: _same_on_every_process(v, self.batch_sharding) for k, v in b.items()}
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
        if self.downstream:
            scorer = Scorer(self.model, params, run_lib.build_catalog(self.config).tokenizer,
                            self.mesh, rows=int(self.config.eval_batch_size))
            record["downstream"] = {e.name: e.run(scorer) for e in self.downstream}
        if self.stream is not None:
            record["mixture_weights"] = dict(zip(
                self.domains, map(float, self.stream.weights_at(max(step - 1, 0)))))
        if writer is not None and writer.enabled:  # process 0 of a multi-process run
            writer.write(step, record)
            writer.flush()
            out = paths.mkdir(out_dir or writer.workdir / "eval")
            write_json(out / f"step_{step}.json", record, indent=2)  # never left half-written
        return record


def format_table(record: dict) -> str:
    rows = [f"{'domain':12s} {'loss':>7s} {'bpb':>7s} {'unigram':>8s} {'unigram bpb':>11s}"]
    for d, v in record["per_domain"].items():
        rows.append(f"{d:12s} {v['loss']:7.3f} {v['bits_per_byte']:7.3f} "
                    f"{v['unigram_loss']:8.3f} {v['unigram_bits_per_byte']:11.3f}")
    rows.append(f"{'mean':12s} {record['loss_domain_mean']:7.3f} "
                f"{record['bits_per_byte_domain_mean']:7.3f} "
                f"{record['unigram_loss_domain_mean']:8.3f}")
    for name, metrics in record.get("downstream", {}).items():
        rows.append(f"{name}: acc {metrics.get('acc', float('nan')):.3f} acc_norm "
                    f"{metrics.get('acc_norm', float('nan')):.3f} (chance "
                    f"{metrics.get('chance', float('nan')):.3f})")
        for part, m in {**metrics.get("tasks", {}), **metrics.get("domains", {})}.items():
            rows.append(f"  {part:12s} acc {m['acc']:.3f} acc_norm {m['acc_norm']:.3f} "
                        f"chance {m['chance']:.3f} n {m['n']}")
    return f"eval at step {record['eval_step']}\n" + "\n".join(rows)


def evaluate_workdir(workdir: paths.PathLike, steps: list[int] | None = None,
                     all_steps: bool = False, evals_override: list | None = None) -> list[dict]:
    """Evaluates checkpoints of a run directory (default: the newest); ``evals_override``
    replaces the run's config.evals (the downstream evaluators)."""
    run = run_lib.open_run(os.fspath(workdir))
    if evals_override is not None:
        with run.config.unlocked():
            run.config.evals = evals_override
    try:
        available = run.steps()
        if not available:
            raise FileNotFoundError(f"no checkpoints in {run.workdir / 'checkpoints'}")
        missing = sorted(set(steps or ()) - set(available))
        if missing:
            raise ValueError(f"no checkpoint for step(s) {missing}; available: {available}")
        wanted = available if all_steps else (steps or [available[-1]])
        evaluator = Evaluator(run.model, run.mesh, run.config)
        writer = metrics_lib.MetricWriter(run.workdir, "eval", jsonl="eval.jsonl",
                                          enabled=jax.process_index() == 0)
        records = []
        try:
            for s in wanted:
                params = run.checkpointer.restore_params(s, run.abstract.params)
                records.append(evaluator.run(params, s, writer))
                print(format_table(records[-1]), flush=True)
        finally:
            writer.close()
    finally:
        run.close()
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description="Per-domain evaluation of a loam run's checkpoints.")
    p.add_argument("--workdir", required=True)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, action="append", help="checkpoint step (repeatable)")
    g.add_argument("--all", action="store_true", help="every checkpoint in the run")
    p.add_argument("--evals", default=None,
                   help="downstream evaluators instead of the run's config.evals: a JSON list, "
                        "e.g. '[{\"kind\": \"probes\"}]' (loam/evals/)")
    args = p.parse_args(argv)
    cli.quiet_logs()
    with cli.user_errors():
        override = None
        if args.evals is not None:
            try:
                override = json.loads(args.evals)
            except json.JSONDecodeError as e:
                raise ValueError(f"--evals is not valid JSON ({e}); give a list such as "
                                 "'[{\"kind\": \"probes\"}]'") from None
            if not isinstance(override, list):
                override = [override]
        evaluate_workdir(args.workdir, args.step, args.all, override)


if __name__ == "__main__":
    main()
