"""Online mixing in rounds: methods that look at the model itself every ``update_steps`` steps
(Aioli's probes, Skill-it's held-out losses) instead of at the training losses of each step.

A ``RoundsSource`` is an adaptive weight source with a round every ``round_steps`` steps from
``first_round``. Before the batch of a round's step T is built, the training loop's ``Rounds``
hook hands the source a ``Lab`` holding the training state after T updates; the source measures
what it needs and fixes the weights it will propose from step T on. Everything a round measures
is a function of the parameters at T, the config and T (probe batches are the mixture stream's
own batches of steps T, T+1, ... under the probe's mixture), so the weights of step t still
depend only on the seed, the config and t, and a run resumed from a checkpoint at T (saved before
T's round) repeats that round bit for bit.

What a round can ask of the lab:

- ``heldout(params)``: the per-domain held-out loss of the parameters (the validation batches
  of ``loam.data.heldout``, ``eval_tokens`` per domain);
- ``probes(mixtures, steps)``: branch M copies of the current parameters and optimiser state,
  train copy m for ``steps`` steps on mixture m (the run's own optimiser and learning-rate
  schedule, continuing from T), return their held-out losses [M, D] and discard them. With
  ``mode="swarm"`` the copies train together in one compiled step (``loam.mixing.swarm``, vmapped
  or mapped per backend); ``mode="sequential"`` trains them one after another, the way a
  PyTorch implementation must (``loam.bench.mixing`` times both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loam import hooks as hooks_lib
from loam import run as run_lib
from loam import step as step_lib
from loam.data import heldout
from loam.data.schedules import WeightSource
from loam.mixing import swarm as swarm_lib
from loam.model import sharding
from loam.workdir import write_json

PROBE_MODES = ("swarm", "sequential")


class RoundsSource(WeightSource):
    """A weight source that decides in rounds (see the module docstring). Subclasses set
    ``round_steps`` and ``first_round`` and define ``run_round``; ``last_round`` (the step of
    the newest round run, -1 before any) belongs in their ``state_dict``."""

    adaptive = True
    validate_at_start = False  # a round may run before step 0 (its weights are checked there)
    round_steps: int = 1
    first_round: int = 0
    last_round: int = -1
    eval_tokens: int = 8192  # per domain, for the held-out losses of its rounds
    probe_mode: str = "swarm"

    def due(self, step: int) -> bool:
        """Whether a round runs before ``step``'s batch (once: not again after a resume)."""
        return (step >= self.first_round and (step - self.first_round) % self.round_steps == 0
                and step > self.last_round)

    def run_round(self, step: int, lab: Lab) -> None:
        raise NotImplementedError

    def make_lab(self, config, model, mesh) -> Lab:
        """The lab of this source's rounds for a run (or a swarm member) of ``config``."""
        return Lab(config, model, mesh, self.domains, self.eval_tokens, self.probe_mode)

    def round_log(self) -> list[dict]:
        """What the rounds measured and decided, JSON-able (written to ``rounds.json``)."""
        return []


def check_positive_int(method: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value \
            or int(value) < minimum:
        raise ValueError(f"config.mixing.{method}.{key}={value!r} must be an integer >= "
                         f"{minimum}; e.g. --config.mixing.{method}.{key}={max(minimum, 10)}")
    return int(value)


def check_number(method: str, key: str, value, low: float, high: float, *,
                 low_open: bool = False, high_open: bool = True, hint: str = "") -> float:
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and np.isfinite(float(value)))
    if ok:
        v = float(value)
        ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"config.mixing.{method}.{key}={value!r} must be a number in "
                         f"{lo}{low:g}, {high:g}{hi}{hint}")
    return float(value)


def check_run(config, method: str) -> None:
    """What a rounds method cannot follow, refused before training."""
    if config.data.get("stages"):
        raise ValueError(f"config.mixing.method={method!r} chooses the weights itself every round "
                         "and cannot follow config.data.stages; clear the stages "
                         "(--config.data.stages='[]') or use --config.mixing.method=static")


@dataclasses.dataclass
class _Probes:
    swarms: list  # one swarm (mode swarm) or one per mixture (sequential)
    mixtures: np.ndarray


class Lab:
    """The round's access to the model: held-out losses and probes (module docstring)."""

    def __init__(self, config, model, mesh, domains: Sequence[str], eval_tokens: int,
                 mode: str = "swarm"):
        if mode not in PROBE_MODES:
            raise ValueError(f"probe mode {mode!r}; choose one of {', '.join(PROBE_MODES)}")
        self.config, self.model, self.mesh = config, model, mesh
        self.domains, self.mode = list(domains), mode
        self.eval_tokens = int(eval_tokens)
        self.catalog = run_lib.build_catalog(config)
        self.num_domains = run_lib.num_domains(config)
        self._eval_step = step_lib.make_eval_step(model, mesh, self.num_domains)
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._sets: list | None = None
        self._probes: dict = {}
        self.state: Any = None  # the training state of the round (TrainState)
        self.step = 0

    def at(self, step: int, state) -> Lab:
        self.step, self.state = int(step), state
        return self

    # -- held-out losses

    def eval_sets(self) -> list[tuple[list, float]]:
        if self._sets is None:
            objective = run_lib.build_objective(self.config)
            sets = []
            for d in self.domains:
                batches, _ = heldout.eval_batches(d, objective, self.config.data.seq_len,
                                                  self.config.eval_batch_size, self.eval_tokens,
                                                  catalog=self.catalog)
                sets.append((batches, float(sum(b["loss_weights"].sum() for b in batches))))
            self._sets = sets
        return self._sets

    def heldout(self, params=None) -> np.ndarray:
        """Per-domain held-out loss (float64, in the order of the lab's domains) of ``params``
        (default: the round's)."""
        params = self.state.params if params is None else params
        out = []
        for batches, tokens in self.eval_sets():
            total = 0.0
            for b in batches:
                dev = {k: _same_on_every_process(np.asarray(v), self._batch_sharding)
                       for k, v in b.items()}
                total += float(jax.device_get(self._eval_step(params, dev))["loss_sum"])
            out.append(total / max(tokens, 1.0))
        return np.array(out, np.float64)

    # -- probes

    def _probe_config(self):
        c = run_lib.copy_config(self.config)
        with c.unlocked():
            c.eval_tokens = self.eval_tokens
            c.data.stages = []
            c.mixing = {"method": "static"}
        return c

    def _swarms(self, mixtures: np.ndarray) -> list:
        key = (self.mode, mixtures.tobytes(), mixtures.shape)
        if key not in self._probes:
            config = self._probe_config()
            members = [swarm_lib.Member(weights=dict(zip(self.domains, map(float, w))),
                                        seed=int(self.config.seed), name=f"probe{m}",
                                        mixing={"method": "static"})
                       for m, w in enumerate(mixtures)]
            groups = [members] if self.mode == "swarm" else [[m] for m in members]
            self._probes[key] = _Probes([swarm_lib.Swarm(config, g) for g in groups], mixtures)
        return self._probes[key].swarms

    def probes(self, mixtures, steps: int) -> np.ndarray:
        """Held-out losses [M, D] of M branches of the round's state, branch m trained
        ``steps`` steps on ``mixtures[m]`` (the stream's batches of steps T, T+1, ...)."""
        mixtures = np.asarray(mixtures, np.float64)
        params = jax.device_get(self.state.params)
        opt_state = jax.device_get(self.state.opt_state)
        out = []
        for swarm in self._swarms(mixtures):
            def stack(x, k=swarm.k):
                return np.broadcast_to(np.asarray(x), (k,) + np.shape(x))
            state = swarm_lib.SwarmState(
                step=jnp.asarray(self.step, jnp.int32),
                params=jax.tree.map(stack, params), opt_state=jax.tree.map(stack, opt_state),
                alive=jnp.ones((swarm.k,), bool), diverged_at=jnp.full((swarm.k,), -1, jnp.int32))
            expected = jax.tree.structure(jax.eval_shape(swarm.init).opt_state)
            if str(jax.tree.structure(state.opt_state)) != str(expected):
                raise RuntimeError("the run's optimiser state does not have the swarm's "
                                   "structure; probes need the swarm's optimiser")
            state = jax.device_put(state, swarm.shardings(state))
            for s in range(int(steps)):
                state, _ = swarm.train_step(state, swarm.batch(self.step + s))
            losses = swarm.evaluate(state.params, self.domains)
            out.append(np.stack([losses[d] for d in self.domains], axis=1))
        return np.concatenate(out, axis=0).astype(np.float64)


def _same_on_every_process(value: np.ndarray, batch_sharding) -> jax.Array:
    """A host array every process holds whole, placed by its shards."""
    def shard(index):
        return value[index]
    return jax.make_array_from_callback(value.shape, batch_sharding, shard)


class Rounds(hooks_lib.Hook):
    """Runs the weight source's rounds before the batch of each round's step is built, and
    writes the rounds' log (``rounds.json``) at every save and at the end."""

    def __init__(self, source: RoundsSource, lab: Lab, path=None, enabled: bool = True):
        self.source, self.lab, self.path, self.enabled = source, lab, path, enabled

    def before_step(self, step, state):
        if self.source.due(step):
            self.source.run_round(step, self.lab.at(step, state))
            self.lab.state = None  # the loop donates the state to the next step

    def _write(self):
        if self.enabled and self.path is not None:
            write_json(self.path, {"method": type(self.source).__name__,
                                   "rounds": self.source.round_log()}, indent=1)

    def on_save(self, step):
        self._write()
        return None

    def on_end(self, step):
        self._write()
