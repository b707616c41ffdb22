"""Downstream evaluators, chosen in the config as big_vision chooses them: each entry of
``config.evals`` is a dict whose ``kind`` names a module of this package, e.g.

    c.evals = [{"kind": "probes"},
               {"kind": "multiple_choice", "tasks": "tasks/*.jsonl"},
               {"kind": "cloze", "tasks": "cloze/*.jsonl", "name": "blanks"}]

A module has ``make(spec, config) -> evaluator``; an evaluator has a ``name`` and
``run(scorer) -> {metric: value}`` (metrics may nest by task). Every entry is checked, and its
task files read, when the evaluators are built, so a bad entry stops a run before it trains.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any, Protocol

from loam.evals.choices import EvalConfigError
from loam.evals.scoring import Scorer

_NOT_KINDS = {"choices", "scoring", "harness", "signal"}  # helpers and commands, not kinds


class Downstream(Protocol):
    name: str

    def run(self, scorer: Scorer) -> dict[str, Any]: ...


def kinds() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in _NOT_KINDS and not m.name.startswith("_"))


def _spec(entry: Any, index: int) -> dict:
    if hasattr(entry, "to_dict"):
        entry = entry.to_dict()
    if isinstance(entry, str):
        entry = {"kind": entry}
    if not isinstance(entry, Mapping) or "kind" not in entry:
        raise EvalConfigError(
            f"config.evals[{index}] = {entry!r:.80} must be a dict with a 'kind' (one of "
            f"{', '.join(kinds())}), e.g. {{'kind': 'multiple_choice', 'tasks': 'tasks/*.jsonl'}}")
    return dict(entry)


def build(entries, config) -> list[Downstream]:
    """The evaluators of ``config.evals`` (``entries``), checked; names must be distinct."""
    out: list[Downstream] = []
    for i, entry in enumerate(entries or []):
        spec = _spec(entry, i)
        kind = spec.pop("kind")
        if kind not in kinds():
            raise EvalConfigError(f"config.evals[{i}]: unknown evaluator kind {kind!r}; known: "
                                  f"{', '.join(kinds())} (modules of loam/evals/)")
        module = importlib.import_module(f"loam.evals.{kind}")
        spec.setdefault("name", kind)
        out.append(module.make(spec, config, where=f"config.evals[{i}] ({kind})"))
    names = [e.name for e in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvalConfigError(f"config.evals: the name(s) {repeated} repeat; give each entry of "
                              "the same kind its own 'name'")
    return out
