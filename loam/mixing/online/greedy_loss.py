"""Greedy loss, a toy online controller: raise the weight of the domain with the highest recent
training loss.

    weights(t) = (1 - boost) * base + boost * one_hot(argmax_d EMA_d)

EMA_d is an exponential moving average of domain d's per-token training loss over the steps the
stream has handed over (those <= t - 1 - FEEDBACK_DELAY); base is ``config.data.weights`` (a
recipe, dict or list). Until some domain has been seen the weights are the base. Float64 numpy,
so a run and its resumption agree bit for bit.

    python -m loam.train --config loam/configs/default.py --config.mixing.method=greedy_loss ...

Hyperparameters: ``config.mixing.greedy_loss = dict(ema=0.9, boost=0.5)`` (defaults as shown).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from loam.data import recipes
from loam.data.weights import WeightSource
from loam.mixing import online

DEFAULTS = {"ema": 0.9, "boost": 0.5}


class GreedyLoss(WeightSource):
    adaptive = True

    def __init__(self, domains: Sequence[str], base, ema: float = 0.9, boost: float = 0.5):
        super().__init__(domains)
        if not 0.0 <= ema < 1.0 or not 0.0 <= boost <= 1.0:
            raise ValueError(f"greedy_loss needs 0 <= ema < 1 and 0 <= boost <= 1, got "
                             f"ema={ema}, boost={boost}")
        self.base = recipes.validate_weights(base, self.domains)
        self.ema, self.boost = float(ema), float(boost)
        self.loss = np.full(len(self.domains), np.nan)  # NaN: not seen yet

    def observe(self, step, loss_sums, tokens):
        seen = tokens > 0
        per_token = np.divide(loss_sums, tokens, out=np.zeros_like(loss_sums), where=seen)
        first = seen & np.isnan(self.loss)
        later = seen & ~first
        self.loss[first] = per_token[first]
        self.loss[later] = self.ema * self.loss[later] + (1.0 - self.ema) * per_token[later]

    def propose(self, step, history):
        if np.all(np.isnan(self.loss)):
            return self.base
        return (1.0 - self.boost) * self.base + self.boost * np.eye(len(self.domains))[
            int(np.nanargmax(self.loss))]

    def state_dict(self):
        return {"loss": [None if np.isnan(x) else float(x) for x in self.loss]}

    def load_state_dict(self, state: Mapping):
        loss = [np.nan if x is None else float(x) for x in state["loss"]]
        if len(loss) != len(self.domains):
            raise ValueError(f"greedy_loss state has {len(loss)} domains, the config "
                             f"{len(self.domains)}; the domains changed since it was saved")
        self.loss = np.array(loss, np.float64)


def make_source(config, domains: Sequence[str]) -> GreedyLoss:
    given = online.settings(config, "greedy_loss", DEFAULTS)
    return GreedyLoss(domains, online.initial_weights(config, domains), **given)
