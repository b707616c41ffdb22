"""lm-evaluation-harness tasks over a trained run: loam as one of the harness's models.

    python -m loam.evals.harness --workdir DIR --tasks T1,T2 [--include_path DIR_OF_YAMLS]
        [--limit N] [--step N] [--num_fewshot K]

Needs the ``[lmeval]`` extra (lm-eval). Any task the harness knows, or one defined by a YAML file
in ``--include_path``, runs unchanged, provided its data is on this machine: nothing is
downloaded (Hugging Face datasets and hub are put in offline mode), so a built-in task needs its
dataset in the local ``datasets`` cache, and a task of your own can read local files
(``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``). The results are printed as
the harness's table and written to DIR/harness/step_N.json (merged with the tasks evaluated
there before; samples in DIR/harness/step_N.<task>.samples.jsonl).

The adapter scores with loam's own scorer (loam/evals/scoring.py: the harness's tokenization of
context and continuation, requests packed into one jitted forward pass) and decodes with the
key/value-cache sampler of loam/generate.py; ``loglikelihood_rolling`` scores a document in the
harness's disjoint windows of the run's context, after the end-of-document token that precedes
every loam document.

In Python::

    from loam.evals import harness
    lm = harness.LoamLM("runs/a")
    results = harness.evaluate(lm, ["my_task"], include_path="tasks/")
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

# Before datasets is imported (by lm_eval): a task reads data already on this machine.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from loam import cli, generate, paths  # noqa: E402
from loam import run as run_lib
from loam.evals.scoring import Scorer
from loam.workdir import read_json, write_json

try:  # the [lmeval] extra; without it, require() says how to install it
    from lm_eval.api.model import LM as _HarnessLM
except ImportError:
    _HarnessLM = object

EXTRA = "pip install -e '.[lmeval]'"
RESULT_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
               "higher_is_better", "n-samples")


class HarnessError(cli.UserError):
    """A harness evaluation that cannot run; the message names the problem and the fix."""


def require() -> None:
    if _HarnessLM is object:
        raise HarnessError(f"lm-evaluation-harness is not installed; install the extra that "
                           f"provides it: {EXTRA}")


class LoamLM(_HarnessLM):
    """A run's checkpoint (default: the newest) as an lm-evaluation-harness model."""

    def __init__(self, workdir, step: int | None = None, batch_size: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0, devices=None):
        require()
        super().__init__()

        self.workdir = os.fspath(workdir)
        self.params, run, self.step = generate.load(self.workdir, step, devices)
        try:
            self.model, self.config = run.model, run.config
            self.tokenizer = _tokenizer(run.config)
            rows = int(batch_size or run.config.get("eval_batch_size", 16))
            self.scorer = Scorer(run.model, self.params, self.tokenizer, run.mesh, rows=rows)
        finally:
            run.close()
        self.batch_size = rows
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)

    @property
    def max_length(self) -> int:
        return int(self.model.cfg.max_len)

    @property
    def tokenizer_name(self) -> str:
        return str(self.config.data.get("tokenizer") or "bundled")

    def get_model_info(self) -> dict:
        return {"loam_workdir": self.workdir, "loam_step": int(self.step)}

    # ------------------------------------------------------------------ log-likelihoods

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        scores = self.scorer.loglikelihood([pairs[i] for i in scored])
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # "" is certain
        for i, s in zip(scored, scores):
            out[i] = (s.logprob, s.greedy)
        for pair, result in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """(context, scored) token windows that predict every token of ``text`` once, after the
        end-of-document token, each with as much context as the model's window leaves."""
        from lm_eval import utils as harness_utils

        tokens = self.tokenizer.encode([text])[0] if text else []
        return [harness_utils.make_disjoint_window(w) for w in
                harness_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=int(self.tokenizer.eos_id),
                    max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests) -> list[float]:
        owner, windows = [], []
        for i, r in enumerate(requests):
            for w in self.rolling_windows(r.args[0]):
                owner.append(i)
                windows.append(w)
        scores = self.scorer.loglikelihood_tokens(windows) if windows else []
        totals = np.zeros(len(requests))
        np.add.at(totals, np.asarray(owner, int), [s.logprob for s in scores])
        out = [float(t) for t in totals]
        for r, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), result)
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests) -> list[str]:
        from lm_eval.models import utils as model_utils


        groups: dict[tuple, list[tuple[int, list[int], list[str]]]] = defaultdict(list)
        for i, r in enumerate(requests):
            context, kwargs = r.args
            g = dict(model_utils.normalize_gen_kwargs(dict(kwargs or {}), self.max_gen_toks))
            until = [u for u in g.get("until") or [] if u]
            temperature = float(g.get("temperature") or 0.0) if g.get("do_sample") else 0.0
            sampling = generate.Sampling(temperature, int(g.get("top_k") or 0),
                                         float(g.get("top_p") or 1.0), self.seed)
            sampling.check(self.model.cfg.vocab_size)
            new = max(1, min(int(g["max_gen_toks"]), self.max_length - 1))
            ids = self.tokenizer.encode([context])[0] if context else []
            ids = ids[-(self.max_length - new):] or [int(self.tokenizer.eos_id)]
            groups[(sampling, new)].append((i, ids, until))
        out = [""] * len(requests)
        for (sampling, new), members in groups.items():
            members.sort(key=lambda m: len(m[1]))
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                tokens = self._decode([m[1] for m in chunk], new, sampling)
                for (i, ids, until), toks in zip(chunk, tokens):
                    text = self._continuation(ids, toks)
                    for u in until:
                        text = text.split(u)[0]
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _decode(self, prompts: Sequence[list[int]], new: int, sampling) -> list[list[int]]:
        """New tokens of each prompt, up to its EOS; prompts are left-padded to a width rounded
        up to 32 (fewer compilations)."""

        pad, eos = int(self.tokenizer.pad_id), int(self.tokenizer.eos_id)
        tokens, valid = generate.left_pad(prompts, pad)
        width = min(-(-tokens.shape[1] // 32) * 32, self.max_length - new)
        extra = width - tokens.shape[1]
        tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad)
        valid = np.pad(valid, ((0, 0), (extra, 0)))
        run = generate.decoder(self.model, width, new, sampling, eos, pad)
        out, steps = run(self.params, tokens, valid)
        rows = []
        for row in np.asarray(out)[:, :int(steps)].tolist():
            rows.append(row[:row.index(eos)] if eos in row else row)
        return rows

    def _continuation(self, prompt: list[int], new: list[int]) -> str:
        before = self.tokenizer.decode(prompt)
        whole = self.tokenizer.decode(prompt + new)
        return whole[len(before):] if whole.startswith(before) else self.tokenizer.decode(new)


def _tokenizer(config):
    return run_lib.build_catalog(config).tokenizer


# ---------------------------------------------------------------------- tasks and results

def task_manager(tasks: Sequence[str], include_path: str | None = None):
    """A TaskManager that knows every task named: the --include_path YAMLs alone when they
    define them all (indexing the harness's thousands of built-in tasks takes seconds), else
    the built-in tasks too. HarnessError naming an unknown task and the nearest known names."""
    require()
    from lm_eval.tasks import TaskManager

    if include_path is not None and not paths.is_dir(include_path):
        raise HarnessError(f"--include_path {include_path} is not a directory; give the "
                           "directory of your task YAML files")
    if include_path is not None:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    for t in tasks:
        if t not in manager.all_tasks and not (t.endswith((".yaml", ".yml"))
                                               and paths.exists(t)):
            close = difflib.get_close_matches(t, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            where = f" nor in --include_path {include_path}" if include_path else ""
            raise HarnessError(
                f"unknown task {t!r}{hint}: it is not a task of lm-evaluation-harness{where}; "
                "name a harness task (lm-eval ls tasks) or a task defined by a YAML "
                "file in --include_path")
    return manager


def evaluate(lm: LoamLM, tasks: Sequence[str], include_path: str | None = None,
             limit: float | None = None, num_fewshot: int | None = None,
             bootstrap_iters: int = 1000, log_samples: bool = True, manager=None) -> dict:
    """The harness's results dict (lm_eval.simple_evaluate) for these tasks."""
    from lm_eval import evaluator

    manager = manager or task_manager(tasks, include_path)
    try:
        results = evaluator.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
            num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    except ConnectionError as e:  # a dataset not on this machine (offline mode)
        raise HarnessError(
            f"a task's data is not on this machine ({cli.one_line(e)[:300]}); nothing is "
            "downloaded here: fetch the dataset into the Hugging Face cache first, or point the "
            "task's dataset_path/data_files at local files") from None
    if results is None:  # not the process that reports
        return {}
    return results


def write_results(workdir, step: int, results: dict) -> paths.epath.Path:
    """DIR/harness/step_N.json (the tasks of earlier evaluations at that step kept) and each
    task's samples beside it; returns the JSON file."""
    from lm_eval.utils import handle_non_serializable


    out = paths.mkdir(paths.Path(workdir) / "harness")
    target = out / f"step_{step}.json"
    record: dict[str, Any] = {}
    if paths.exists(target):
        record = read_json(target)
    plain = json.loads(json.dumps({k: results.get(k) for k in RESULT_KEYS if k in results},
                                  default=handle_non_serializable))
    for key, value in plain.items():
        if isinstance(value, dict):
            record.setdefault(key, {}).update(value)
    record["step"] = int(step)
    record["config"] = json.loads(json.dumps(results.get("config", {}),
                                             default=handle_non_serializable))
    write_json(target, record, indent=2)
    for task, samples in (results.get("samples") or {}).items():
        lines = "".join(json.dumps(s, default=handle_non_serializable) + "\n" for s in samples)
        paths.atomic_write(out / f"step_{step}.{task}.samples.jsonl", lines.encode("utf-8"))
    return target


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", required=True, help="a run directory (python -m loam.train)")
    p.add_argument("--tasks", required=True, help="comma-separated harness task names")
    p.add_argument("--include_path", default=None, help="a directory of task YAML files")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction below 1: that share of them)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None,
                   help="rows of the model's context scored at once (default: eval_batch_size)")
    p.add_argument("--bootstrap_iters", type=int, default=1000,
                   help="resamples for the standard errors of non-mean metrics (0: none)")
    args = p.parse_args(argv)
    cli.quiet_logs()
    with cli.user_errors():
        require()
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not tasks:
            raise HarnessError("--tasks names no task; give comma-separated task names")
        if args.limit is not None and args.limit <= 0:
            raise HarnessError(f"--limit={args.limit:g} must be > 0")
        manager = task_manager(tasks, args.include_path)  # refused before the model loads
        lm = LoamLM(args.workdir, args.step, batch_size=args.batch_size)
        limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
        results = evaluate(lm, tasks, args.include_path, limit, args.num_fewshot,
                           args.bootstrap_iters, manager=manager)
        from lm_eval.utils import make_table
        print(make_table(results))
        if "groups" in results and results["groups"]:
            print(make_table(results, "groups"))
        target = write_results(args.workdir, lm.step, results)
        print(f"results of step {lm.step} in {target}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
