"""Online Data Mixing (Albalak et al. 2023, "Efficient Online Data Mixing for Language Model
Pre-Training"): the domains are the arms of an EXP3 bandit whose reward is the training loss, so
the mixture drifts towards the domains the model currently finds hardest at no extra cost.

    python -m loam.train --config loam/configs/default.py --config.mixing.method=odm \
        [--config.mixing.odm.alpha=0.8] --workdir ...

What this module computes, with K domains and t = step + 1 (the round of the step's weights):

    ε_t   = min(1/K, sqrt(ln K / (K t)))            (ε_0 = 1/K: the min of an infinite sqrt)
    π_t   = (1 - K ε_t) softmax(ε_{t-1} R) + ε_t     (the weights of step t - 1)
    R_d  <- α R_d + (1 - α) r_d / π_d                after each observed step, for every domain d
                                                     in its batch; r_d = loss_sums_d / tokens_d,
                                                     the domain's per-token training loss, and
                                                     π_d the weight the step was drawn with

R starts at 0, so π is uniform until ε_t drops below 1/K (t >= K ln K: 9 steps for the five
bundled domains). A domain absent from a batch keeps its R (no reward was observed for it).
``config.data.weights`` is not read: the formula fixes the start. Float64 numpy throughout, and
the state (R and the weights of the steps proposed but not yet observed, whose π the update
needs) is saved as Python floats, so a resumed run is bit-exact; t is the step itself and needs
no state.

Where the paper and its released code differ, and which variant this is:

- Reward estimate. The paper's Algorithm 1 importance-weights the observed loss, r / π (the
  EXP3 estimator, unbiased when one arm is drawn per round); the released code's mixed-minibatch
  path (``SmoothedMeanWeightUpdater.group_update`` in megatron/data/data_sampling_utils.py of
  alon-albalak/online-data-mixing) uses no importance weight and smooths exp(loss) instead of
  the loss. Here: r / π, as in the paper.
- Smoothing. That path keeps R as an exponential moving average with smoothing factor α (0.9 by
  default, 0.5 in its 1B "ema_0.5smoothing" scripts); its plain ``Exp3WeightUpdater`` instead
  sums r / (10 π) over all steps. Here: the moving average, α = 0.9 by default, of the paper's
  estimate.
- Policy. The paper's π is the softmax above; the code's ``group_update`` sets π linear in R,
  (1 - K ε_t) R / ΣR + ε_t (its single-domain ``update`` keeps the softmax). Here: the softmax.
- Schedule. The code's t is the global step, and its 1B scripts update only after 2000 warm-up
  steps on the initial weights; here updates start with the first observed step.
- Batches. The paper draws one domain per minibatch; the code's mixed minibatches draw each
  row from π and this stream fills each batch in the proportions π, so several domains are
  rewarded per step, each with its own per-domain loss.

Hyperparameters: ``config.mixing.odm = dict(alpha=0.9)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from loam.data.weights import WeightSource
from loam.mixing import online

DEFAULTS = {"alpha": 0.9}


def epsilon(t: int, k: int) -> float:
    """The exploration rate of round t (t = 0 gives 1/K, the cap)."""
    if t <= 0:
        return 1.0 / k
    return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))


class OnlineDataMixing(WeightSource):
    adaptive = True

    def __init__(self, domains: Sequence[str], alpha: float = 0.9):
        super().__init__(domains)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (
                0.0 <= float(alpha) < 1.0):
            raise ValueError(f"config.mixing.odm.alpha={alpha!r} must be a number in [0, 1) (the "
                             "weight of the past in the smoothed reward); use e.g. "
                             "--config.mixing.odm.alpha=0.9, the paper's code's default")
        self.alpha = float(alpha)
        self.rewards = np.zeros(len(self.domains), np.float64)
        self._proposed: dict[int, np.ndarray] = {}  # step -> π, until the step is observed

    def policy(self, step: int) -> np.ndarray:
        """π of ``step`` from the current smoothed rewards."""
        k, t = len(self.domains), int(step) + 1
        eps, eps_prev = epsilon(t, k), epsilon(t - 1, k)
        z = eps_prev * self.rewards
        p = np.exp(z - z.max())
        p /= p.sum()
        return (1.0 - k * eps) * p + eps

    def propose(self, step, history):
        pi = self.policy(step)
        self._proposed[int(step)] = pi
        return pi

    def observe(self, step, loss_sums, tokens):
        pi = self._proposed.pop(int(step), None)
        if pi is None:
            raise RuntimeError(f"odm observed step {step}, whose weights it never proposed; the "
                               "weights log and the source's state are out of step")
        seen = tokens > 0
        r = loss_sums[seen] / tokens[seen]
        self.rewards[seen] = self.alpha * self.rewards[seen] + (1.0 - self.alpha) * r / pi[seen]

    def state_dict(self):
        return {"rewards": [float(x) for x in self.rewards],
                "proposed": [[s, [float(x) for x in p]] for s, p in sorted(self._proposed.items())]}

    def load_state_dict(self, state: Mapping):
        k = len(self.domains)
        rewards = [float(x) for x in state["rewards"]]
        proposed = {int(s): np.array([float(x) for x in p], np.float64)
                    for s, p in state["proposed"]}
        if len(rewards) != k or any(len(p) != k for p in proposed.values()):
            raise ValueError(f"odm state has {len(rewards)} domains, the config {k}; the domains "
                             "changed since it was saved")
        self.rewards = np.array(rewards, np.float64)
        self._proposed = proposed


def hyperparameters(config) -> dict:
    """``config.mixing.odm`` over the defaults; unknown keys refused."""
    return online.settings(config, "odm", DEFAULTS,
                           hint=" (e.g. --config.mixing.odm.alpha=0.9)")


def make_source(config, domains: Sequence[str]) -> OnlineDataMixing:
    if config.data.get("stages"):
        raise ValueError("config.mixing.method='odm' chooses every step's weights itself and "
                         "cannot follow config.data.stages; clear the stages "
                         "(--config.data.stages='[]') or use --config.mixing.method=static")
    return OnlineDataMixing(domains, **hyperparameters(config))
