"""Weight sources: what gives the mixture weights of each training step.

A ``WeightSource`` proposes the weights of step t given the weights log of the steps before it,
and may observe the per-domain training losses of past steps (an online controller). The stream
owns the log and calls the source in step order (``loam.data.weights.WeightsLog``), so a source
never has to know when the loop happened to fetch metrics.

A ``Schedule`` is a source whose weights are a function of the step alone (it ignores feedback):
constant weights, any ``step -> weights`` function, or a staged curriculum
(``loam.data.curriculum``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from loam.data.recipes import validate_weights
from loam.data.views import View


class WeightSource:
    """Gives the mixture weights of each step, in the order of ``domains``.

    Adaptive sources (``adaptive = True``) read feedback: the stream hands them, through
    ``observe``, the losses of every step s <= t - 1 - FEEDBACK_DELAY (see loam.data.weights)
    before asking for step t, and their state and the weights log are saved with the data
    position so that a resumed run is bit-exact.
    """

    adaptive: bool = False
    # The stream asks for step 0's weights when it is built, to report bad weights early; a
    # source whose step-0 weights are decided later (a round before step 0) says False.
    validate_at_start: bool = True

    def __init__(self, domains: Sequence[str]):
        self.domains = list(domains)

    def propose(self, step: int, history: np.ndarray) -> np.ndarray | Mapping:
        """Weights of ``step`` (one per domain, or a dict); ``history`` is the log's rows for
        the steps before it, shape [step, len(domains)], read-only."""
        raise NotImplementedError

    def observe(self, step: int, loss_sums: np.ndarray, tokens: np.ndarray) -> None:
        """Per-domain training loss sums and token counts of ``step`` (float64, in the order of
        ``domains``); called in step order."""

    def state_dict(self) -> dict:
        """JSON-able state: whatever ``observe`` changed."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint gives "
                             f"it {sorted(state)}; the weight source changed since it was saved")

    def describe(self) -> dict | None:
        """JSON form of the weights over training (today: the stage form of
        ``loam.data.curriculum``), saved with checkpoints to refuse edits of the past on
        resume; None when it cannot be described."""
        return None

    def view_at(self, step: int, k: int) -> View | None:
        """How domain k's documents are drawn at ``step``; None: shuffled."""
        return None

    def view_intervals(self, k: int) -> list[tuple[int, int | None, View]] | None:
        """[(first step, end step or None, view)] of domain k over training; None: one
        shuffled view throughout."""
        return None


class Schedule(WeightSource):
    """A source whose weights are a function of the step alone."""

    def weights_at(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def propose(self, step, history=None):
        return self.weights_at(step)


class ConstantWeights(Schedule):
    """The same weights at every step (a dict or one number per domain; recipes are resolved
    before, see ``loam.data.recipes``)."""

    def __init__(self, weights, domains: Sequence[str]):
        super().__init__(domains)
        self.weights = validate_weights(weights, domains)

    def weights_at(self, step):
        return self.weights

    def describe(self):
        return {"interpolate": False, "stages": [{
            "name": "constant", "start": 0, "views": {},
            "weights": {d: round(float(w), 12) for d, w in zip(self.domains, self.weights)}}]}

    def __repr__(self):
        return f"constant({dict(zip(self.domains, np.round(self.weights, 4).tolist()))})"


class CallableWeights(Schedule):
    """Any ``step -> weights`` function; each answer is validated."""

    def __init__(self, fn: Callable[[int], object], domains: Sequence[str]):
        super().__init__(domains)
        self.fn = fn

    def weights_at(self, step):
        return validate_weights(self.fn(step), self.domains)


def constant(weights, domains: Sequence[str] | None = None) -> ConstantWeights:
    """Constant weights; without ``domains``, the keys of the ``weights`` dict."""
    if domains is None:
        if not isinstance(weights, Mapping):
            raise ValueError("constant(weights) needs the domain names: pass a dict or domains=")
        domains = list(weights)
    return ConstantWeights(weights, domains)
