"""What the experiments share: a run trained once, its final evaluation read back."""

from __future__ import annotations

import math
from pathlib import Path

from loam import cli
from loam import train as train_lib
from loam.workdir import read_json


def final_eval(run: Path, steps: int) -> dict | None:
    """The run's evaluation at ``steps`` (its last), or None if it has not got there."""
    path = run / "eval" / f"step_{steps}.json"
    return read_json(path) if path.is_file() else None


def train_once(config, run: Path, verbose: bool) -> dict:
    """Trains ``run`` unless it already finished (then nothing is trained); its final
    evaluation."""
    done = final_eval(run, int(config.steps))
    if done is not None:
        return done
    if verbose:
        print(f"== {run.parent.name}/{run.name}", flush=True)
    train_lib.train(config, run)
    out = final_eval(run, int(config.steps))
    if out is None:
        raise cli.UserError(f"{run} finished without its final evaluation; rerun the command")
    return out


def fmt_paired(p: dict) -> str:
    """A paired difference as "+d ± se" ("–" without seeds; no "± se" when it is undefined)."""
    if not p["seeds"] or math.isnan(p["diff"]):
        return "–"
    se = "" if math.isnan(p["se"]) else f" ± {p['se']:.4f}"
    return f"{p['diff']:+.4f}{se}"
