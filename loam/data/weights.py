"""The weights log: each step's mixture weights, appended in step order by a weight source.

The stream owns a ``WeightsLog``; the log asks its source (``loam.data.schedules.WeightSource``)
for the weights of step t only once every earlier row exists, and hands an adaptive source the
losses it may see (``FEEDBACK_DELAY``) just before. So the weights of a step are a pure function
of the config and of the losses of earlier steps, whatever the loop's timing, and saving the log
with the source's state makes a resumed run bit-exact. For a static source the log is a pure
function of the config and is not saved.

``source_from_config`` is the one place a run's weight source is chosen.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence

import numpy as np

from loam.data import catalog as catalog_lib
from loam.data import curriculum, recipes
from loam.data import replay as replay_lib
from loam.data.schedules import CallableWeights, ConstantWeights, Schedule, WeightSource, constant

FEEDBACK_DELAY = 1
# The loop dispatches step t+1 before it fetches step t's metrics, so the weights of step t may
# depend only on the losses of steps <= t - 1 - FEEDBACK_DELAY. The log enforces this: it buffers
# observations and hands the source exactly those of steps <= t - 1 - FEEDBACK_DELAY (in step
# order) just before asking it for step t, so the source's state when it proposes step t does not
# depend on when the loop happened to fetch metrics (e.g. at checkpoint boundaries).


def as_source(x, domains: Sequence[str]) -> WeightSource:
    """A WeightSource as is; a callable ``step -> weights``; else constant weights (a dict or
    one number per domain)."""
    if isinstance(x, WeightSource):
        return x
    if callable(x):
        return CallableWeights(x, domains)
    return ConstantWeights(x, domains)


def source_from_config(config) -> WeightSource:
    """The run's weight source. ``config.mixing.method`` "static" (the default):
    ``config.data.stages`` if given (``loam.data.curriculum``), else constant
    ``config.data.weights`` (a dict, a list or a recipe: "uniform", "proportional",
    "temperature:T", "unimax:MAX_EPOCHS"). Any other method names an online controller,
    ``loam.mixing.online.<method>`` (a dotted name is imported as is), whose
    ``make_source(config, domains)`` builds it."""
    mixing = config.get("mixing") or {}
    method = str(mixing.get("method", "static") or "static")
    domains = catalog_lib.mixture_domains(config)
    if method != "static":
        name = method if "." in method else f"loam.mixing.online.{method}"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise  # the controller's own imports failed: show them
            raise ValueError(f"config.mixing.method={method!r}: no module {name}; use 'static' "
                             "or the name of a module in loam/mixing/online/") from None
        # With replay, the method chooses the new domains' share alone (loam.data.replay).
        source = module.make_source(config, _outside_replay(config, domains))
        if not isinstance(source, WeightSource):
            raise TypeError(f"{name}.make_source returned {type(source).__name__}, not a "
                            "loam.data.schedules.WeightSource")
        return _with_replay(config, source, domains)
    if config.data.get("stages"):
        return _with_replay(config, curriculum.stages_from_config(config), domains)
    try:
        source = ConstantWeights(recipes.config_weights(config), domains)
    except ValueError as e:
        raise ValueError(f"config.data.weights={config.data.weights!r}: {e}") from None
    return _with_replay(config, source, domains)


def _outside_replay(config, domains: Sequence[str]) -> list[str]:
    """The mixture's domains without the replay domains (all of them without replay)."""
    replay = config.data.get("replay")
    if not replay:
        return list(domains)
    schedule, names = replay_lib.check(replay, domains)
    if all(f == 0 for _, f in schedule):
        return list(domains)
    return [d for d in domains if d not in names]


def _with_replay(config, source: WeightSource, domains: Sequence[str]) -> WeightSource:
    """``source`` with ``config.data.replay`` (a fraction of every batch from old domains)."""
    replay = config.data.get("replay")
    if not replay:
        return source
    schedule, names = replay_lib.check(replay, domains)
    if all(f == 0 for _, f in schedule):
        return source
    spec = replay.get("weights") or "proportional"
    spec = spec.to_dict() if hasattr(spec, "to_dict") else spec
    try:
        w = recipes.config_weights(config, weights=spec, domains=names)
    except ValueError as e:
        raise ValueError(f"config.data.replay.weights={spec!r}: {e}") from None
    return replay_lib.Replay(source, schedule, dict(zip(names, w.tolist())))


def _rows(n: int, d: int) -> np.ndarray:
    return np.zeros((max(1024, n), d), np.float64)


class WeightsLog:
    """Per-step weights in the order of ``names`` (the stream's domains; the source may name a
    subset in any order), extended step by step through the source."""

    def __init__(self, source: WeightSource, names: Sequence[str]):
        self.source, self.names = source, list(names)
        unknown = [d for d in source.domains if d not in self.names]
        if unknown or len(set(source.domains)) != len(source.domains):
            raise ValueError(f"the weight source's domains {source.domains} are not distinct "
                             f"domains of the mixture {self.names}; fix the names")
        self.adaptive = bool(source.adaptive)
        self._cols = np.array([self.names.index(d) for d in source.domains], np.int64)
        self._identity = self._cols.tolist() == list(range(len(self.names)))
        # Constant weights: no rows are stored, every step reads the one row.
        self.constant = (self._place(0, source.weights)
                         if isinstance(source, ConstantWeights) else None)
        if self.constant is not None:
            self.constant.flags.writeable = False
        self._reset(_rows(0, len(self.names)), 0)

    def _reset(self, rows: np.ndarray, length: int) -> None:
        self._log, self._len = rows, length
        self._hist = rows if self._identity else np.ascontiguousarray(rows[:, self._cols])
        self._pending: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # observed, not handed
        self._handed = 0  # the source has observed steps < _handed

    def _place(self, step: int, w) -> np.ndarray:
        try:
            v = recipes.validate_weights(w, self.source.domains)
        except ValueError as e:
            raise ValueError(f"mixture weights at step {step}: {e}") from None
        if self._identity:
            return v
        row = np.zeros(len(self.names))
        row[self._cols] = v
        return row

    @property
    def length(self) -> int:
        """Steps whose weights are known (all of them for constant weights)."""
        return self._len

    def at(self, step: int) -> np.ndarray:
        """The weights of ``step`` (read-only)."""
        if self.constant is not None:
            return self.constant
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        while self._len <= step:
            self._append()
        row = self._log[step]
        row.flags.writeable = False
        return row

    def rows(self, upto: int) -> np.ndarray:
        """The weights of steps [0, upto), shape [upto, D]."""
        upto = int(upto)
        if self.constant is not None:
            return np.tile(self.constant, (upto, 1))
        if upto > 0:
            self.at(upto - 1)
        return self._log[:upto].copy()

    def _append(self) -> None:
        t = self._len
        if self.adaptive:
            self._feed(t)
        if t == self._log.shape[0]:
            grown = _rows(2 * t, len(self.names))
            grown[:t] = self._log[:t]
            self._log = grown
            self._hist = grown if self._identity else np.concatenate(
                [self._hist[:t], np.zeros((t, len(self._cols)))])
        history = self._hist[:t]
        history.flags.writeable = False
        try:
            w = self.source.propose(t, history)
        except ValueError as e:
            raise ValueError(f"mixture weights at step {t}: {e}") from None
        row = self._place(t, w)
        self._log[t] = row
        if not self._identity:
            self._hist[t] = row[self._cols]
        self._len = t + 1

    def _feed(self, t: int) -> None:
        """Hands the source the observations of steps <= t - 1 - FEEDBACK_DELAY, in order."""
        while self._handed < t - FEEDBACK_DELAY:
            s = self._handed
            if s not in self._pending:
                raise RuntimeError(
                    f"the weights of step {t} depend on the training losses of steps <= "
                    f"{t - 1 - FEEDBACK_DELAY}, but step {s} has not been observed: call "
                    f"stream.observe({s}, loss_sums, tokens) before asking for step {t} "
                    f"(loam.data.weights.FEEDBACK_DELAY = {FEEDBACK_DELAY})")
            self.source.observe(s, *self._pending.pop(s))
            self._handed = s + 1

    def observe(self, step: int, loss_sums, tokens) -> None:
        """Per-domain loss sums and token counts of ``step`` (in the order of ``names``)."""
        step = int(step)
        loss_sums = np.asarray(loss_sums, np.float64).reshape(-1)
        tokens = np.asarray(tokens, np.float64).reshape(-1)
        if loss_sums.shape != (len(self.names),) or tokens.shape != loss_sums.shape:
            raise ValueError(f"observe({step}) needs one loss sum and one token count per "
                             f"domain {self.names}, got shapes {loss_sums.shape}, "
                             f"{tokens.shape}")
        if not self.adaptive:
            return
        if step < self._handed or step in self._pending:
            raise ValueError(f"the losses of step {step} were observed twice")
        self._pending[step] = (loss_sums[self._cols], tokens[self._cols])

    def state_dict(self, step: int) -> dict:
        """What a resumed run needs to continue at ``step`` (adaptive sources only): every row
        proposed so far, the source's state and the observations not yet handed to it."""
        if not self.adaptive:
            return {}
        step = int(step)
        missing = [s for s in range(self._handed, step) if s not in self._pending]
        if missing:
            raise RuntimeError(
                f"cannot save the data position at step {step}: the training losses of step(s) "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''} were not observed "
                "(stream.observe), so a resumed run could not reproduce the weights")
        if self._handed > step:
            raise RuntimeError(f"cannot save the data position at step {step}: the weight source "
                               f"has already seen the losses of step {self._handed - 1}")
        return {"weights_log": self._log[:self._len].tolist(),
                "source_state": self.source.state_dict(),
                "observations": [[s, *(a.tolist() for a in self._pending[s])]
                                 for s in sorted(self._pending) if s < step],
                "observed_steps": self._handed}

    def load_state_dict(self, state: Mapping) -> None:
        if not self.adaptive:
            return
        if "weights_log" not in state:
            raise ValueError("the checkpoint's data position holds no weights log (it was saved "
                             "with a static weight source), but the config now chooses an "
                             "adaptive one; restore config.mixing or train into a new workdir")
        log = np.asarray(state["weights_log"], np.float64).reshape(-1, len(self.names))
        rows = _rows(log.shape[0] + 1, len(self.names))
        rows[:log.shape[0]] = log
        self.source.load_state_dict(dict(state["source_state"]))
        self._reset(rows, log.shape[0])
        for s, loss_sums, tokens in state["observations"]:
            self._pending[int(s)] = (np.asarray(loss_sums, np.float64),
                                     np.asarray(tokens, np.float64))
        self._handed = int(state["observed_steps"])


__all__ = ["FEEDBACK_DELAY", "WeightSource", "Schedule", "ConstantWeights", "CallableWeights",
           "WeightsLog", "as_source", "constant", "source_from_config"]
