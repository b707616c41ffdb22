"""Replay: a fixed fraction of every batch drawn from earlier (old) domains while a run
continues on new data (``config.data.replay``).

    config.data.replay = {"fraction": 0.25, "domains": ["literature", "dialogue"],
                          "weights": "proportional"}

The replay domains are domains of the run's mixture. Each step, they get ``fraction`` of the
weight, shared among them by ``weights`` (a recipe such as "proportional" or "uniform", or a
dict); the other domains share the rest as the run's own weights or curriculum stages give
them (their weights for the replay domains are set aside). The result is an ordinary weight
source, so the stream allots rows to it as to any mixture: each domain's rows track the sum of
its weights times the batch size within one row.

``fraction`` may change over the run: a list of [step, fraction] pairs, the first at step 0,
is piecewise constant (``[[0, 0.25], [1000, 0.05]]``: a quarter of every batch until step 1000,
then 5%); set the whole block in a config file, e.g. ``c.data.replay = dict(fraction=[...],
domains=[...])``. With an online mixing method (``config.mixing.method``), the method is built
over the new domains and chooses their share; replay keeps its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loam.data.schedules import WeightSource


def fraction_schedule(fraction) -> list[tuple[int, float]]:
    """``replay.fraction`` as [(first step, fraction)]: a number is one piece from step 0; a
    list of [step, fraction] pairs (the first at step 0, steps increasing) is piecewise
    constant. One-line ValueError when it is bad."""
    if isinstance(fraction, str) or not isinstance(fraction, Sequence):
        pieces = [(0, fraction if fraction is not None else 0.0)]
    else:
        pieces = []
        for pair in fraction:
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"config.data.replay.fraction={_show(fraction)}: {pair!r} is "
                                 "not a [step, fraction] pair; give a number or a list such as "
                                 "[[0, 0.25], [1000, 0.05]]")
            pieces.append((pair[0], pair[1]))
        if not pieces:
            raise ValueError("config.data.replay.fraction=[] gives no fraction; give a number "
                             "(0: no replay) or [step, fraction] pairs from step 0")
    out = []
    for step, f in pieces:
        if isinstance(step, bool) or not isinstance(step, int | float) or step != int(step) \
                or step < 0:
            raise ValueError(f"config.data.replay.fraction={_show(fraction)}: step {step!r} is "
                             "not a step number (an integer >= 0)")
        if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= float(f) < 1.0:
            raise ValueError(f"config.data.replay.fraction={_show(f)} must lie in [0, 1): the "
                             "share of every batch drawn from the replay domains (0: no replay)")
        out.append((int(step), float(f)))
    if out[0][0] != 0:
        raise ValueError(f"config.data.replay.fraction={_show(fraction)} starts at step "
                         f"{out[0][0]}; the first [step, fraction] pair must be at step 0")
    for (a, _), (b, _) in zip(out, out[1:]):
        if b <= a:
            raise ValueError(f"config.data.replay.fraction={_show(fraction)}: step {b} comes "
                             f"after step {a}; list the [step, fraction] pairs by increasing "
                             "step")
    return out


def _show(x) -> str:
    return str(x.to_dict() if hasattr(x, "to_dict") else list(x) if isinstance(
        x, tuple) else x).replace("(", "[").replace(")", "]")


def check(replay, mixture: Sequence[str]) -> tuple[list[tuple[int, float]], list[str]]:
    """(fraction schedule, domains) of a ``data.replay`` block; one-line ValueError when it is
    bad."""
    schedule = fraction_schedule(replay.get("fraction", 0.0))
    domains = list(replay.get("domains") or [])
    replays = any(f > 0 for _, f in schedule)
    if replays and not domains:
        raise ValueError("config.data.replay.domains is empty: name the old domains to replay, "
                         f"among the mixture's {list(mixture)}")
    unknown = [d for d in domains if d not in mixture]
    if unknown:
        raise ValueError(f"config.data.replay.domains {unknown} are not domains of the "
                         f"mixture {list(mixture)}; replay domains must be sources of the run "
                         "(listed in data.domains when it is given)")
    if replays and len(domains) == len(mixture):
        raise ValueError("config.data.replay.domains names every domain of the mixture: leave "
                         "at least one new domain outside the replay")
    return schedule, domains


# What the trainer reads from a weight source beyond its weights; a source that needs any of
# them cannot sit inside replay, which would hide it.
_TRAINER_HOOKS = ("token_weights", "output_weights", "metrics_at", "plotted_weights")


class Replay(WeightSource):
    """``inner``'s weights on the new domains scaled to 1 - fraction, the replay domains'
    fixed weights scaled to fraction (``schedule``: [(first step, fraction)], piecewise
    constant).

    An online method (adaptive ``inner``) chooses the new domains' share alone: it is built over
    the new domains, observes their losses, and reads back its own weights (the log's rows
    divided by 1 - fraction), so it learns from the weights it set."""

    def __init__(self, inner: WeightSource, schedule, replay_weights: Mapping[str, float]):
        if isinstance(schedule, int | float):
            schedule = [(0, float(schedule))]
        if inner.adaptive:
            name = type(inner).__name__
            clash = sorted(set(inner.domains) & set(replay_weights))
            if clash:
                raise ValueError(f"config.data.replay with the online method {name}: it weights "
                                 f"the replay domains {clash} itself; build it over the new "
                                 "domains only")
            needs = [h for h in _TRAINER_HOOKS if hasattr(inner, h)]
            if needs or getattr(inner, "feedback_metric", "domain_loss_sum") != \
                    "domain_loss_sum" or hasattr(inner, "run_round"):
                raise ValueError(f"config.data.replay with the online method {name}: it needs "
                                 "more from the trainer than the training losses (a reference "
                                 "model or probe rounds), which replay would hide; use replay "
                                 "with odm or greedy_loss, static weights or curriculum stages")
        super().__init__(inner.domains + [d for d in replay_weights if d not in inner.domains])
        self.inner = inner
        self.adaptive = bool(inner.adaptive)
        self.starts = np.array([s for s, _ in schedule], np.int64)
        self.fractions = np.array([f for _, f in schedule], np.float64)
        total = float(sum(replay_weights.values()))
        self._replay = np.zeros(len(self.domains))
        for d, w in replay_weights.items():
            self._replay[self.domains.index(d)] = float(w) / total
        self._is_new = np.ones(len(self.domains), bool)
        self._is_new[[self.domains.index(d) for d in replay_weights]] = False
        self.validate_at_start = inner.validate_at_start

    @property
    def fraction(self) -> float:
        """The fraction of step 0 (the only one when it is a number)."""
        return float(self.fractions[0])

    def fractions_at(self, steps: np.ndarray) -> np.ndarray:
        return self.fractions[np.searchsorted(self.starts, steps, side="right") - 1]

    def fraction_at(self, step: int) -> float:
        return float(self.fractions_at(np.array([step]))[0])

    def propose(self, step: int, history: np.ndarray) -> np.ndarray:
        n = len(self.inner.domains)
        if self.adaptive:  # the method's own weights of the earlier steps
            mine = history[:, :n] / (1.0 - self.fractions_at(np.arange(history.shape[0])))[:, None]
            mine.flags.writeable = False
            raw = self.inner.propose(step, mine)
        else:
            raw = self.inner.propose(step, history[:, :n])
        w = np.zeros(len(self.domains))
        if isinstance(raw, Mapping):
            for d, x in raw.items():
                w[self.domains.index(d)] = float(x)
        else:
            w[:n] = np.asarray(raw, np.float64)
        w = np.where(self._is_new, w, 0.0)
        if w.sum() <= 0:
            raise ValueError(f"step {step}: the run's weights give nothing to the domains "
                             "outside data.replay.domains; weight at least one new domain")
        f = self.fraction_at(step)
        return (1.0 - f) * w / w.sum() + f * self._replay

    def observe(self, step, loss_sums, tokens):
        n = len(self.inner.domains)
        self.inner.observe(step, loss_sums[:n], tokens[:n])

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def view_at(self, step, k):
        return self.inner.view_at(step, k) if k < len(self.inner.domains) else None

    def view_intervals(self, k):
        return self.inner.view_intervals(k) if k < len(self.inner.domains) else None

    def __repr__(self):
        pieces = ", ".join(f"{f}@{s}" for s, f in zip(self.starts, self.fractions))
        return f"replay({pieces}, {self.inner!r})"
