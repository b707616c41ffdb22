"""Cloze tasks from JSONL files: a passage with a blank and the candidates that fill it.

    {"kind": "cloze", "tasks": "cloze/*.jsonl", "blank": "_"}

Each line: ``text`` (or ``sentence``) containing the blank once, ``choices`` and ``gold`` (index
or text; ``label`` also names it), as in lm-evaluation-harness's Winogrande. The model scores,
for every candidate, the candidate and the rest of the passage given the text before the blank,
so the choice is judged by how well it fits both sides. Metrics as for multiple choice: ``acc``,
``acc_norm`` (per byte of what is scored), ``chance``, per task and their mean.
"""

from __future__ import annotations

from loam.evals import choices as choices_lib
from loam.evals.multiple_choice import ChoiceTasks, load_tasks

OPTIONS = {"name", "tasks", "blank", "limit"}


def make(spec: dict, config, where: str) -> ChoiceTasks:
    del config
    choices_lib.check_options(spec, OPTIONS, where)
    blank = str(spec.get("blank", "_"))

    def parse(record: dict, at: str) -> choices_lib.Item:
        text = choices_lib.field(record, ("text", "sentence"), at)
        if text.count(blank) != 1:
            raise choices_lib.TaskFileError(
                f"{at}: the text must contain the blank {blank!r} exactly once (found "
                f"{text.count(blank)}); mark the gap with it, or set the entry's 'blank'")
        options, gold = choices_lib.choices_and_gold(record, at, ("choices",), ("gold", "label"))
        before, after = text.split(blank)
        return choices_lib.Item(tuple((before, c + after) for c in options), gold)

    return ChoiceTasks(spec["name"], load_tasks(spec, where, parse))
