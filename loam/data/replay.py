"""Replay: a fixed fraction of every batch drawn from earlier (old) domains while a run
continues on new data (``config.data.replay``).

    config.data.replay = {"fraction": 0.25, "domains": ["literature", "dialogue"],
                          "weights": "proportional"}

The replay domains are domains of the run's mixture. Each step, they get ``fraction`` of the
weight, shared among them by ``weights`` (a recipe such as "proportional" or "uniform", or a
dict); the other domains share the rest as the run's own weights or curriculum stages give
them (their weights for the replay domains are set aside). The result is an ordinary weight
source, so the stream allots rows to it as to any mixture: the replay rows track
``fraction * batch_size * steps`` within one row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loam.data.schedules import WeightSource


def check(replay, mixture: Sequence[str]) -> tuple[float, list[str]]:
    """(fraction, domains) of a ``data.replay`` block; one-line ValueError when it is bad."""
    fraction = float(replay.get("fraction", 0.0) or 0.0)
    domains = list(replay.get("domains") or [])
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.data.replay.fraction={fraction} must lie in [0, 1): the "
                         "share of every batch drawn from the replay domains (0: no replay)")
    if fraction > 0 and not domains:
        raise ValueError("config.data.replay.domains is empty: name the old domains to replay, "
                         f"among the mixture's {list(mixture)}")
    unknown = [d for d in domains if d not in mixture]
    if unknown:
        raise ValueError(f"config.data.replay.domains {unknown} are not domains of the "
                         f"mixture {list(mixture)}; replay domains must be sources of the run "
                         "(listed in data.domains when it is given)")
    if fraction > 0 and len(domains) == len(mixture):
        raise ValueError("config.data.replay.domains names every domain of the mixture: leave "
                         "at least one new domain outside the replay")
    return fraction, domains


class Replay(WeightSource):
    """``inner``'s weights on the new domains scaled to 1 - fraction, the replay domains'
    fixed weights scaled to fraction."""

    def __init__(self, inner: WeightSource, fraction: float, replay_weights: Mapping[str, float]):
        if inner.adaptive:
            raise ValueError("config.data.replay with an online mixing method: the method "
                             "would learn from weights it does not set; use static weights or "
                             "curriculum stages with replay")
        super().__init__(inner.domains + [d for d in replay_weights if d not in inner.domains])
        self.inner, self.fraction = inner, float(fraction)
        total = float(sum(replay_weights.values()))
        self._replay = np.zeros(len(self.domains))
        for d, w in replay_weights.items():
            self._replay[self.domains.index(d)] = float(w) / total
        self._is_new = np.ones(len(self.domains), bool)
        self._is_new[[self.domains.index(d) for d in replay_weights]] = False
        self.validate_at_start = inner.validate_at_start

    def propose(self, step: int, history: np.ndarray) -> np.ndarray:
        raw = self.inner.propose(step, history)
        w = np.zeros(len(self.domains))
        if isinstance(raw, Mapping):
            for d, x in raw.items():
                w[self.domains.index(d)] = float(x)
        else:
            w[:len(self.inner.domains)] = np.asarray(raw, np.float64)
        w = np.where(self._is_new, w, 0.0)
        if w.sum() <= 0:
            raise ValueError(f"step {step}: the run's weights give nothing to the domains "
                             "outside data.replay.domains; weight at least one new domain")
        return (1.0 - self.fraction) * w / w.sum() + self.fraction * self._replay

    def view_at(self, step, k):
        return self.inner.view_at(step, k) if k < len(self.inner.domains) else None

    def view_intervals(self, k):
        return self.inner.view_intervals(k) if k < len(self.inner.domains) else None

    def __repr__(self):
        return f"replay({self.fraction}, {self.inner!r})"
