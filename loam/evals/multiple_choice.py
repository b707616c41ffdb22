"""Log-likelihood multiple choice from JSONL task files, in lm-evaluation-harness's conventions.

    {"kind": "multiple_choice", "tasks": "tasks/*.jsonl"}   # one task per file (its stem)

Each line is an example: ``context`` (or ``query``), ``choices`` (a list of strings) and
``gold`` (the 0-based index of the right choice, or its text; ``label`` also names it). A choice
continues the context after ``target_delimiter`` (default one space, as in the harness). Metrics
per task and their mean: ``acc``, ``acc_norm`` (log-likelihood per byte of the choice) and
``chance``.
"""

from __future__ import annotations

import numpy as np

from loam import paths
from loam.evals import choices as choices_lib
from loam.evals.scoring import Scorer

OPTIONS = {"name", "tasks", "target_delimiter", "limit"}


class ChoiceTasks:
    def __init__(self, name: str, tasks: dict[str, list[choices_lib.Item]]):
        self.name, self.tasks = name, tasks

    def run(self, scorer: Scorer) -> dict:
        per_task = {t: choices_lib.accuracy(scorer, items) for t, items in self.tasks.items()}
        out: dict = {k: float(np.mean([m[k] for m in per_task.values()]))
                     for k in ("acc", "acc_norm", "chance")}
        out["tasks"] = per_task
        return out


def load_tasks(spec: dict, where: str, parse) -> dict[str, list[choices_lib.Item]]:
    limit = int(spec.get("limit", 0) or 0)
    tasks = {}
    for path in choices_lib.task_files(spec.get("tasks", ""), where):
        name = paths.Path(path).name.split(".")[0]
        if name in tasks:
            raise choices_lib.EvalConfigError(
                f"{where}: two task files are named {name!r}; task names are file stems")
        items = choices_lib.read_task(path, parse)
        tasks[name] = items[:limit] if limit else items
    return tasks


def make(spec: dict, config, where: str) -> ChoiceTasks:
    del config
    choices_lib.check_options(spec, OPTIONS | {"name"}, where)
    delimiter = str(spec.get("target_delimiter", " "))

    def parse(record: dict, at: str) -> choices_lib.Item:
        context = choices_lib.field(record, ("context", "query"), at)
        options, gold = choices_lib.choices_and_gold(record, at, ("choices",), ("gold", "label"))
        return choices_lib.Item(tuple((context, delimiter + c) for c in options), gold)

    return ChoiceTasks(spec["name"], load_tasks(spec, where, parse))
