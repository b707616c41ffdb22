"""Choice items, task files in lm-evaluation-harness's conventions, and their accuracies.

An item is a list of (context, continuation) requests, one per choice, and the index of the
right one. The model picks the choice whose continuation has the highest log-likelihood
(``acc``), or the highest log-likelihood per UTF-8 byte of the continuation (``acc_norm``, the
harness's length normalisation); ``chance`` is the expected accuracy of a uniform guess.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

import numpy as np

from loam import paths
from loam.evals.scoring import Scorer


class EvalConfigError(ValueError):
    """An entry of config.evals that cannot run; the message names the entry and the fix."""


class TaskFileError(EvalConfigError):
    """A task file that cannot be evaluated; the message names the file, the line and the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int


def accuracy(scorer: Scorer, items: Sequence[Item]) -> dict[str, float]:
    """acc, acc_norm, chance and n over the items (one batch of requests for all of them)."""
    flat = [r for item in items for r in item.requests]
    scores = scorer.loglikelihood(flat)
    acc, acc_norm, chance, at = [], [], [], 0
    for item in items:
        k = len(item.requests)
        s = scores[at:at + k]
        at += k
        lp = np.array([x.logprob for x in s])
        nbytes = np.array([max(len(c.encode("utf-8")), 1) for _, c in item.requests])
        acc.append(float(np.argmax(lp) == item.gold))
        acc_norm.append(float(np.argmax(lp / nbytes) == item.gold))
        chance.append(1.0 / k)
    n = len(items)
    return {"acc": float(np.mean(acc)) if n else 0.0,
            "acc_norm": float(np.mean(acc_norm)) if n else 0.0,
            "chance": float(np.mean(chance)) if n else 0.0, "n": n}


def task_files(pattern: str | Sequence[str], where: str) -> list[paths.epath.Path]:
    """The files a ``tasks`` entry names (glob patterns), sorted; one clear error if none."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise TaskFileError(f"{where}: 'tasks' must be a glob of JSONL task files (or a list "
                            f"of globs), e.g. \"tasks/*.jsonl\"; got {pattern!r}")
    found: list[paths.epath.Path] = []
    for p in patterns:
        hits = paths.glob(p) if any(ch in p for ch in "*?[") else (
            [paths.Path(p)] if paths.exists(p) else [])
        if not hits:
            raise TaskFileError(f"{where}: no task file matches {p!r}; give the path (or glob) "
                                "of JSONL files, one example per line")
        found += hits
    return sorted(set(found), key=str)


def read_task(path: paths.PathLike, parse: Callable[[dict, str], Item]) -> list[Item]:
    """Items of a JSONL task file; ``parse(record, where)`` raises TaskFileError for a bad one."""
    items = []
    text = paths.read_text(path)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskFileError(f"{where}: not valid JSON ({e}); write one JSON object per "
                                "line") from None
        if not isinstance(record, dict):
            raise TaskFileError(f"{where}: a line must be a JSON object, got "
                                f"{type(record).__name__}")
        items.append(parse(record, where))
    if not items:
        raise TaskFileError(f"{path}: the task file has no examples; write one JSON object per "
                            "line")
    return items


def field(record: dict, names: Sequence[str], where: str, kind: type | tuple = str):
    """The first of ``names`` present in the record, checked to be of ``kind``."""
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                want = kind.__name__ if isinstance(kind, type) else " or ".join(
                    k.__name__ for k in kind)
                raise TaskFileError(f"{where}: field {name!r} must be a {want}, got "
                                    f"{type(value).__name__} {value!r:.60}")
            return value
    shown = " or ".join(repr(n) for n in names)
    raise TaskFileError(f"{where}: missing field {shown}; each example needs it (present: "
                        f"{sorted(record)})")


def choices_and_gold(record: dict, where: str, choices_field: Sequence[str],
                     gold_field: Sequence[str]) -> tuple[list[str], int]:
    choices = field(record, choices_field, where, list)
    if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise TaskFileError(f"{where}: {choices_field[0]!r} must be a list of at least two "
                            f"strings, got {choices!r:.80}")
    gold = field(record, gold_field, where, (int, str))
    if isinstance(gold, str):  # a label: the choice's text
        if gold not in choices:
            raise TaskFileError(f"{where}: gold {gold!r:.60} is not one of the choices; give "
                                f"the index (0 to {len(choices) - 1}) or a choice's exact text")
        gold = choices.index(gold)
    if not 0 <= gold < len(choices):
        raise TaskFileError(f"{where}: gold index {gold} is out of range for "
                            f"{len(choices)} choices; it must be 0 to {len(choices) - 1} "
                            "(0-based, as in lm-evaluation-harness)")
    return choices, gold


def check_options(spec: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(spec) - known)
    if unknown:
        raise EvalConfigError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
