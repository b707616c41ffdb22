"""Curricula: a run's mixture as stages over training, written in the config.

    c.data.stages = [
        dict(name="main", start=0, weights="uniform"),
        dict(name="anneal", start="lr:decay", weights={"code": 3, "docs": 3, "literature": 1,
             "dialogue": 1, "reference": 1}, order={"literature": "quality:asc"},
             keep={"code": "quality:0.5:1.0"}),
    ]
    c.data.interpolate = False   # True: weights move linearly from one stage's start to the next

A stage starts at a step (int), a fraction of training (0.8 or "80%"), or a phase of the
learning-rate schedule ("lr:warmup_end", "lr:decay" for WSD and cosine, "lr:anneal" for an
infinite schedule's annealing phase), so changing `steps` moves data and learning
rate together. `weights` is a dict, a list or a recipe (see loam.data.recipes). `order` makes a
domain's documents arrive sorted by a score column ("column:asc" / "column:desc") instead of
shuffled; `keep` restricts a domain to a quantile range of a column ("column:lo:hi") (see
loam.data.views). Every stage is validated when the run starts; `weights.source_from_config`
builds the run's source, this module's `StagedWeights` when stages are given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from loam.data import catalog as catalog_lib
from loam.data import recipes
from loam.data.schedules import Schedule
from loam.data.views import DEFAULT_VIEW, View


class CurriculumError(ValueError):
    """A stage list that cannot run; the message names the stage and the fix."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    start: int
    weights: np.ndarray
    views: tuple[View, ...]  # one per domain

    def to_json(self, domains) -> dict:
        return {"name": self.name, "start": self.start,
                "weights": {d: round(float(w), 12) for d, w in zip(domains, self.weights)},
                "views": {d: v.describe() for d, v in zip(domains, self.views) if not v.is_default}}


def lr_phases(config) -> dict[str, int]:
    """Step boundaries of the learning-rate schedule's phases, by name."""
    o, steps = config.optim, int(config.steps)
    phases = {"warmup_end": int(o.warmup_steps)}
    if o.schedule == "wsd":  # as loam.step.lr_schedule places it
        phases["decay"] = max(int(o.warmup_steps),
                              steps - max(1, int(round(o.decay_fraction * steps))))
    elif o.schedule == "cosine":
        phases["decay"] = int(o.warmup_steps)
    elif o.schedule == "infinite" and int(o.get("anneal_start", 0) or 0) > 0:
        phases["anneal"] = int(o.anneal_start)
    return phases


def resolve_start(start, config, stage_name: str) -> int:
    steps = int(config.steps)
    if isinstance(start, bool):
        raise CurriculumError(f"stage {stage_name!r}: start={start!r} is not a step")
    if isinstance(start, str) and start.startswith("lr:"):
        phases = lr_phases(config)
        phase = start[3:]
        if phase == "anneal" and phase not in phases:
            raise CurriculumError(
                f"stage {stage_name!r}: start='lr:anneal' names the start of an infinite "
                "schedule's annealing phase, but this run's "
                + (f"{config.optim.schedule!r} schedule has none"
                   if config.optim.schedule != "infinite" else
                   "infinite schedule never anneals (optim.anneal_start=0)")
                + "; set --config.optim.schedule=infinite --config.optim.anneal_start=STEP, or "
                "start the stage at a step")
        if phase not in phases:
            raise CurriculumError(
                f"stage {stage_name!r}: start={start!r} names no phase of the "
                f"{config.optim.schedule!r} learning-rate schedule; known: "
                f"{', '.join('lr:' + p for p in phases)}")
        return phases[phase]
    if isinstance(start, str) and start.endswith("%"):
        start = float(start[:-1]) / 100
    if isinstance(start, float):
        if not 0.0 <= start <= 1.0:
            raise CurriculumError(f"stage {stage_name!r}: fractional start {start} must be in "
                                  "[0, 1] (a fraction of config.steps)")
        return int(round(start * steps))
    if isinstance(start, int) and start >= 0:
        return start
    raise CurriculumError(f"stage {stage_name!r}: start={start!r} is not a step (int), a "
                          "fraction (0.8 or '80%') or a learning-rate phase ('lr:decay')")


def _parse_view(domain: str, order: str | None, keep: str | None, stage: str) -> View:
    view: dict = {}
    if order:
        column, _, direction = order.partition(":")
        if direction not in ("asc", "desc") or not column:
            raise CurriculumError(f"stage {stage!r}: order {order!r} for {domain!r} must be "
                                  "'column:asc' or 'column:desc'")
        view.update(order_column=column, ascending=direction == "asc")
    if keep:
        parts = keep.split(":")
        try:
            column, lo, hi = parts[0], float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise CurriculumError(f"stage {stage!r}: keep {keep!r} for {domain!r} must be "
                                  "'column:lo:hi' with quantiles 0 <= lo < hi <= 1") from None
        if not (column and 0.0 <= lo < hi <= 1.0):
            raise CurriculumError(f"stage {stage!r}: keep {keep!r} for {domain!r} needs "
                                  "0 <= lo < hi <= 1")
        view.update(keep_column=column, keep_range=(lo, hi))
    return View(**view)


def _stage_weights(weights, config, domains, stage: str) -> np.ndarray:
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(domains))
        if unknown:
            raise CurriculumError(f"stage {stage!r}: weights for unknown domain(s) {unknown}; "
                                  f"the mixture's domains are {domains}")
        weights = {d: float(weights.get(d, 0.0)) for d in domains}
        weights = [weights[d] for d in domains]
    try:
        return recipes.config_weights(config, weights, domains)
    except ValueError as e:
        raise CurriculumError(f"stage {stage!r}: {e}") from None


class StagedWeights(Schedule):
    """Piecewise-constant (or piecewise-linear) weights and per-domain views over stages."""

    def __init__(self, stages: Sequence[Stage], domains: Sequence[str], interpolate: bool = False):
        super().__init__(domains)
        self.stages = list(stages)
        self.interpolate = interpolate
        self.starts = np.array([s.start for s in self.stages], np.int64)

    def stage_index(self, step: int) -> int:
        return int(np.searchsorted(self.starts, step, side="right")) - 1

    def weights_at(self, step: int) -> np.ndarray:
        i = self.stage_index(step)
        w = self.stages[i].weights
        if self.interpolate and i + 1 < len(self.stages):
            a, b = self.stages[i].start, self.stages[i + 1].start
            f = (step - a) / (b - a)
            w = (1 - f) * w + f * self.stages[i + 1].weights
        return w

    def describe(self) -> dict:
        return {"interpolate": self.interpolate, "stages": self.to_json()}

    def view_at(self, step: int, k: int) -> View:
        return self.stages[self.stage_index(step)].views[k]

    def view_intervals(self, k: int) -> list[tuple[int, int | None, View]]:
        """[(first step, end step or None, view)] of domain k, merging equal neighbours."""
        out: list[tuple[int, int | None, View]] = []
        for i, s in enumerate(self.stages):
            end = self.stages[i + 1].start if i + 1 < len(self.stages) else None
            if out and out[-1][2] == s.views[k]:
                out[-1] = (out[-1][0], end, s.views[k])
            else:
                out.append((s.start, end, s.views[k]))
        return out

    def to_json(self) -> list[dict]:
        return [s.to_json(self.domains) for s in self.stages]

    def __repr__(self):
        return "stages(" + "; ".join(
            f"{s.name}@{s.start}" for s in self.stages) + (", interpolated)" if
                                                            self.interpolate else ")")


def stages_from_config(config) -> StagedWeights:
    """The stages of `config.data.stages` (at least one), validated."""
    data = config.data
    stages_cfg = data.get("stages") or []
    domains = catalog_lib.mixture_domains(config)
    if not stages_cfg:
        raise CurriculumError("config.data.stages is empty; give at least one stage")
    stages = []
    for i, raw in enumerate(stages_cfg):
        raw = dict(raw)
        name = str(raw.get("name", f"stage{i}"))
        unknown_keys = set(raw) - {"name", "start", "weights", "order", "keep"}
        if unknown_keys:
            raise CurriculumError(f"stage {name!r}: unknown key(s) {sorted(unknown_keys)}; a stage "
                                  "has name, start, weights, order, keep")
        if "weights" not in raw:
            raise CurriculumError(f"stage {name!r} has no weights; give a dict or a recipe")
        start = resolve_start(raw.get("start", 0), config, name)
        order, keep = dict(raw.get("order") or {}), dict(raw.get("keep") or {})
        for d in set(order) | set(keep):
            if d not in domains:
                raise CurriculumError(f"stage {name!r}: order/keep for unknown domain {d!r}; the "
                                      f"mixture's domains are {domains}")
        views = tuple(_parse_view(d, order.get(d), keep.get(d), name) for d in domains)
        stages.append(Stage(name, start, _stage_weights(raw["weights"], config, domains, name),
                            views))
    if stages[0].start != 0:
        raise CurriculumError(f"the first stage {stages[0].name!r} starts at step "
                              f"{stages[0].start}; the first stage must start at step 0")
    for a, b in zip(stages, stages[1:]):
        if b.start <= a.start:
            raise CurriculumError(
                f"stages out of order or overlapping: {b.name!r} starts at step {b.start}, not "
                f"after {a.name!r} (step {a.start}); list stages by increasing start")
    if stages[-1].start >= int(config.steps):
        raise CurriculumError(f"stage {stages[-1].name!r} starts at step {stages[-1].start}, "
                              f"at or after the end of training (steps={config.steps})")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise CurriculumError(f"stage names {names} repeat; give each stage its own name")
    return StagedWeights(stages, domains, bool(data.get("interpolate", False)))


def first_difference(old: dict, new: dict, upto: int, domains) -> int | None:
    """The first step before `upto` at which two described weight sources differ, or None
    (descriptions as ``WeightSource.describe`` gives them)."""
    def build(desc):
        stages = [Stage(s["name"], int(s["start"]),
                        np.array([s["weights"].get(d, 0.0) for d in domains], np.float64),
                        tuple(DEFAULT_VIEW for _ in domains)) for s in desc["stages"]]
        return StagedWeights(stages, domains, desc["interpolate"]), desc["stages"]

    (a, a_raw), (b, b_raw) = build(old), build(new)
    candidates: Iterable[int]
    if a.interpolate or b.interpolate:
        candidates = range(upto)
    else:
        candidates = sorted({0, *a.starts.tolist(), *b.starts.tolist()})
    for step in candidates:
        if step >= upto:
            break
        if not np.allclose(a.weights_at(step), b.weights_at(step), atol=1e-9):
            return step
        if a_raw[a.stage_index(step)]["views"] != b_raw[b.stage_index(step)]["views"]:
            return step
    return None
