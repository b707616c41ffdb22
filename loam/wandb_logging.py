"""Weights & Biases: the metrics a run writes, logged to a W&B run as well (``config.wandb``).

    python -m loam.train --config loam/configs/default.py --workdir runs/a \
        --config.wandb.project=my-project [--config.wandb.mode=offline]

Off unless ``config.wandb.project`` is set; needs the ``[wandb]`` extra. Every record the run
writes to metrics.jsonl (loss, per-domain losses, learning rate, throughput, the mixture weights
and token accounting) is logged under ``train/``, and every evaluation (per-domain held-out loss
and bits per byte, downstream metrics, the realised weights) under ``eval/``, at the run's step.
The W&B run's id is saved with each checkpoint, so a resumed run continues the same W&B run.
``mode`` is W&B's (``online``, ``offline``: files under ``dir`` to ``wandb sync`` later,
``disabled``); empty: W&B's default or $WANDB_MODE. ``dir`` defaults to $WANDB_DIR or the run
directory (W&B writes DIR/wandb/), ``name`` to the run directory's name. Only process 0 logs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from loam import metrics as metrics_lib
from loam import paths
from loam.cli import UserError
from loam.hooks import Hook

EXTRA = "pip install -e '.[wandb]'"
FIELDS = ("project", "entity", "name", "group", "mode", "dir")
MODES = ("", "online", "offline", "disabled")


def enabled(config) -> bool:
    settings = config.get("wandb")
    return bool(settings is not None and settings.get("project"))


def check(config) -> None:
    """Before anything is written: config.wandb's fields, and wandb installed when it is on."""
    settings = config.get("wandb")
    if settings is None:
        return
    unknown = sorted(set(settings.keys()) - set(FIELDS))
    if unknown:
        raise UserError(f"config.wandb has unknown field(s) {unknown}; known: {list(FIELDS)}")
    if not enabled(config):
        return
    if settings.get("mode", "") not in MODES:
        raise UserError(f"config.wandb.mode={settings.mode!r}; choose one of "
                        f"{', '.join(repr(m) for m in MODES)} (empty: W&B's default)")
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise UserError(f"config.wandb.project={settings.project!r} logs to Weights & Biases, "
                        f"but wandb is not installed: install the extra ({EXTRA}), or leave "
                        "config.wandb.project empty") from None


class WandbLogger(Hook):
    """Logs the train writer's records and the evaluations to one W&B run, started at the
    first record (with the id a resumed run saved in its checkpoint)."""

    name = "wandb"

    def __init__(self, config, workdir: paths.PathLike, writer: metrics_lib.MetricWriter):
        self.settings = config.wandb.to_dict()
        self.config = json.loads(config.to_json_best_effort())
        self.workdir = paths.Path(workdir)
        self.run: Any = None
        self.run_id: str | None = None
        writer.listeners.append(self._train_record)

    def _start(self):
        import wandb

        s = self.settings
        directory = paths.mkdir(s.get("dir") or os.environ.get("WANDB_DIR") or self.workdir)
        self.run = wandb.init(
            project=s["project"], entity=s.get("entity") or None,
            name=s.get("name") or self.workdir.name, group=s.get("group") or None,
            mode=s.get("mode") or None, dir=str(directory), config=self.config,
            id=self.run_id, resume="allow" if self.run_id else None)
        self.run_id = self.run.id

    def _log(self, step: int, prefix: str, record: dict):
        values = {prefix + k: v for k, v in metrics_lib.flatten(record).items()}
        if not values:
            return
        if self.run is None:
            self._start()
        self.run.log(values, step=int(step))

    def _train_record(self, step: int, record: dict):
        self._log(step, "train/", record)

    def on_eval(self, step, record):
        self._log(step, "eval/", {k: v for k, v in record.items() if k != "eval_step"})

    def on_save(self, step):
        return {"id": self.run_id} if self.run_id else None

    def on_restore(self, step, state):
        if state and state.get("id"):
            self.run_id = str(state["id"])

    def on_end(self, step):
        if self.run is not None:
            self.run.finish()
            self.run = None
