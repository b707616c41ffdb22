"""Anneal on demand: the annealing phase of a run, branched from one of its checkpoints in the
constant phase of an infinite, WSD or constant schedule, into a new run directory.

    python -m loam.train --config loam/configs/anneal.py:from=runs/a:2000,steps=200 \
        --workdir runs/a-anneal2000 [--config.optim.final_lr_fraction=0.0 ...]

The config is the source run's own (its config.json) with ``init.checkpoint`` set to the named
checkpoint (``from=DIR`` alone: its newest), ``init.carry = "all"`` (parameters, optimizer state
and step counter continue from step S) and ``steps = S + steps``; the learning rate follows the
source's constant phase up to S and then falls linearly to ``final_lr_fraction`` times the peak
over the new steps (an ``infinite`` schedule with ``anneal_start = S``; a WSD or constant source
becomes the infinite schedule equal to its own before S). The batches are the ones the source
run would have trained on at steps S.. (the same data config), so the branch is the source run
with its anneal started at S. The checkpoint is read from the source run, never copied or
changed; the new run directory holds the anneal's own checkpoints and records where it started
(``init`` in its config.json and checkpoint metadata).
"""

import json
import math

import ml_collections

from loam import paths
from loam.configs import default


def _source_step(where: str) -> tuple[paths.epath.Path, int]:
    head, sep, tail = where.rpartition(":")
    run, step = (head, int(tail)) if sep and head and tail.isdigit() else (where, None)
    run_dir = paths.absolute(run)
    if not paths.exists(run_dir / "config.json"):
        raise ValueError(f"from={where}: {run_dir} is not a loam run directory (no config.json)")
    steps = sorted(int(p.name) for p in paths.iterdir(run_dir / "checkpoints")
                   if p.name.isdigit())
    if not steps:
        raise ValueError(f"from={where}: {run_dir} holds no checkpoints to anneal from")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"from={where}: {run_dir} has no checkpoint at step {step}; its "
                         f"checkpoints are at steps {steps}")
    return run_dir, step


def _constant_phase(o, steps: int) -> tuple[int, float]:
    """(first, last) step of the source schedule's constant phase; raises if it has none."""
    warmup = int(o.warmup_steps)
    if o.schedule == "infinite":
        end = int(o.get("anneal_start", 0)) or math.inf
        return warmup + int(o.get("cooldown_steps", 0)), end
    if o.schedule == "wsd":
        decay_steps = max(1, int(round(float(o.decay_fraction) * steps)))
        return warmup, max(warmup, steps - decay_steps)
    if o.schedule == "constant":
        return warmup, math.inf
    raise ValueError(f"the source run's schedule is {o.schedule!r}, which has no constant phase "
                     "to branch an anneal from; anneal runs trained with optim.schedule="
                     "infinite, wsd or constant")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    defaults: dict = {"from": "", "steps": 0}
    a = default.parse_arg(arg, None, **defaults)
    if not a["from"] or a.steps < 1:
        raise ValueError("name the checkpoint and the annealing steps: "
                         "loam/configs/anneal.py:from=DIR[:STEP],steps=N")
    run_dir, step = _source_step(a["from"])
    c = ml_collections.ConfigDict(json.loads(paths.read_text(run_dir / "config.json")))
    o = c.optim
    first, last = _constant_phase(o, int(c.steps))
    if not first <= step <= last:
        raise ValueError(
            f"step {step} of {run_dir} is outside the constant phase of its {o.schedule} "
            f"schedule (steps {first} to {last if last != math.inf else 'the end'}); branch "
            "the anneal from a checkpoint in that phase")
    with c.unlocked():
        if o.schedule != "infinite":  # WSD's stable phase, or constant: the peak itself
            o.schedule, o.cooldown_steps, o.constant_lr_fraction = "infinite", 0, 1.0
        o.anneal_start = step
        c.steps = step + a.steps
        c.init = ml_collections.ConfigDict(
            {"checkpoint": f"{run_dir}:{step}", "carry": "all"})
    return c
