"""Proxy swarms: K models of one architecture trained together in one compiled step.

Parameters and optimiser states are stacked along a leading member axis and the trainer's own
update (`loam.step.update`) is vmapped over it, so each member sees exactly what a single run
with its own config would: its own mixture stream and weight source (static, staged or online:
an online member gets its own losses every step, a DoReMi member the shared reference model's
excess loss, an Aioli or Skill-it member its own rounds of probes and held-out evaluations), its
own initialisation (seed) and its own peak learning rate. The member axis is sharded over
the mesh's "data" axis when there is more than one device. A member whose loss, gradient or
update goes non-finite is frozen (its update masked out) and reported; the others continue
unaffected.

A member is described by a full loam training config (`member_config`), so any member can be
re-run alone with `python -m loam.train`, and a swarm checkpoint holds everything the swarm needs to
continue exactly: stacked state, per-member alive flags and every member's data position.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from loam import checkpoint as ckpt_lib
from loam import hooks as hooks_lib
from loam import metrics as metrics_lib
from loam import run as run_lib
from loam import step as step_lib
from loam.data import catalog as catalog_lib
from loam.data import heldout
from loam.model import sharding
from loam.workdir import read_json, write_json

MEMBER_AXIS = "data"  # mesh axis the member dimension is sharded over
_COMPILED: dict = {}  # compiled steps shared by swarms of equal signature


@dataclasses.dataclass(frozen=True)
class Member:
    """One proxy: its mixture weights (dict domain -> weight, or a recipe string), init/data seed,
    peak learning rate (None: the config's) and weight source (None: the config's `mixing`;
    else a dict of `mixing` fields, e.g. {"method": "greedy_loss"})."""
    weights: Any
    seed: int = 0
    lr: float | None = None
    name: str = ""
    mixing: Mapping | None = None

    def to_json(self) -> dict:
        w = self.weights
        if isinstance(w, Mapping):
            w = {k: float(v) for k, v in w.items()}
        out = {"weights": w, "seed": int(self.seed), "lr": self.lr, "name": self.name}
        if self.mixing is not None:
            out["mixing"] = json.loads(json.dumps(dict(self.mixing)))
        return out


@flax.struct.dataclass
class SwarmState:
    step: jax.Array         # int32 scalar: swarm steps taken
    params: Any             # leaves [K, ...]
    opt_state: Any          # leaves [K, ...]
    alive: jax.Array        # bool [K]: False once a member diverged (its updates are masked)
    diverged_at: jax.Array  # int32 [K]: step whose update was refused, -1 while alive


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
    """The single-run config equivalent to one member of a swarm."""
    c = (run_lib.copy_config(config) if hasattr(config, "to_json_best_effort")
         else ml_collections.ConfigDict(copy.deepcopy(dict(config))))
    c.seed = int(member.seed)
    w = member.weights
    del c.data["weights"]  # the field may change type (recipe string <-> dict)
    c.data.weights = {k: float(v) for k, v in w.items()} if isinstance(w, Mapping) else w
    if member.lr is not None:
        c.optim.lr = float(member.lr)
    if member.mixing is not None:
        mixing = c.get("mixing") or ml_collections.ConfigDict()
        mixing = ml_collections.ConfigDict(dict(mixing.to_dict(), **dict(member.mixing)))
        del c["mixing"]
        c.mixing = mixing
    return c


MEMBER_LOOPS = ("vmap", "map")


def default_member_loop() -> str:
    """How a device runs its members, chosen per backend from measurements (loam.bench.swarm).
    "vmap" batches them into one set of kernels, what fills an accelerator. On CPU, XLA's batched
    kernels run no faster than the unbatched ones, and vmap's batched embedding scatter is slow:
    measured on a 2-core machine (16 "tiny" members, each side in fresh processes taking turns),
    vmap ran at 0.78-0.97x of training the members one after another, while "map" (the forward
    and backward passes of the members in turn inside one compiled step, the optimizer step
    vmapped) ran at 0.98-1.11x. So: map on CPU, vmap elsewhere."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def use_host_cores() -> int:
    """Lets JAX's CPU backend expose one device per core of this process, so that a swarm
    splits its members over the cores (`swarm_mesh`) and each device runs its own members, the
    devices at once. Call it first thing in a command whose work is swarms (the mixture search,
    `loam.bench.swarm`): it only acts before JAX's backends start, and not when the device count
    is already chosen (``--xla_force_host_platform_device_count`` in XLA_FLAGS, or
    ``jax_num_cpu_devices``); on an accelerator host it changes only the CPU backend, which the
    swarm does not use. Single runs keep one CPU device: the batch split over two devices ran
    slower there than one device using both cores. Measured on a 2-core machine (16 "tiny"
    members, the map loop, huge pages): a swarm step took 0.63-0.64 s on two devices against
    0.75-0.87 s on one, in alternating fresh processes. Returns the device count asked for (0:
    unchanged)."""
    if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
            or getattr(jax.config, "jax_num_cpu_devices", -1) != -1):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    if cores < 2:
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except RuntimeError:  # the backends have started: too late to change them
        return 0
    return cores


def _member_shards(k: int, devices: int) -> int:
    """Largest divisor of k that fits the devices: how many ways the member axis is split."""
    return max(d for d in range(1, min(k, devices) + 1) if k % d == 0)


def swarm_mesh(k: int, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = _member_shards(k, len(devices))
    return sharding.make_mesh(data=n, fsdp=1, tensor=1, devices=devices[:n])


class Swarm:
    """K members sharing the architecture, optimiser kind, schedule shape and batch shape of
    ``config``; each with its own weights, seed and peak learning rate."""

    def __init__(self, config, members: Sequence[Member], mesh: Mesh | None = None,
                 build_streams: bool = True, member_loop: str | None = None):
        members = list(members)
        if not members:
            raise ValueError("a swarm needs at least one member")
        if config.data.get("stages"):
            raise ValueError("swarm members set their own weights (Member.weights) and would "
                             "ignore config.data.stages; clear the stages, or give members an "
                             "online source with Member(mixing=...)")
        if config.optim.accum_steps != 1:
            raise ValueError("swarms do not accumulate gradients; set optim.accum_steps=1 and "
                             "lower data.batch_size instead")
        self.config, self.members, self.k = config, members, len(members)
        self.member_loop = member_loop or default_member_loop()
        if self.member_loop not in MEMBER_LOOPS:
            raise ValueError(f"member_loop={self.member_loop!r}; choose one of "
                             f"{', '.join(MEMBER_LOOPS)}")
        self.configs = [member_config(config, m) for m in members]
        self.mesh = mesh if mesh is not None else swarm_mesh(self.k)
        self.shards = self.mesh.shape[MEMBER_AXIS]
        if self.k % self.shards:
            raise ValueError(f"{self.k} members cannot be split over {self.shards} devices of "
                             f"the mesh axis {MEMBER_AXIS!r}; use a multiple of it")
        self.model = run_lib.build_model(config)
        self.model_cfg = self.model.cfg
        self.num_domains = run_lib.num_domains(config)
        self.seq_len, self.batch_size = config.data.seq_len, config.data.batch_size
        o = config.optim
        self.lrs = np.array([float(m.lr if m.lr is not None else o.lr) for m in members],
                            np.float32)
        self.seeds = np.array([int(m.seed) for m in members], np.uint32)
        self.streams = ([run_lib.build_stream(c) for c in self.configs] if build_streams
                        else None)
        self._stacked = NamedSharding(self.mesh, P(MEMBER_AXIS))
        self._replicated = NamedSharding(self.mesh, P())
        self.reference: Any = None  # DoReMi's reference model (loaded at the first step)
        self._train_step: Callable | None = None
        self._eval_step: Callable | None = None
        self._eval_sets: list[tuple[str, list, float]] | None = None

    # -- optimiser of one member, built inside the vmapped function from its (traced) peak lr

    def optimizer(self, lr) -> optax.GradientTransformation:
        return run_lib.build_optimizer(self.config, peak=lr)

    def _init_one(self, rng, lr):
        params = self.model.init(rng, jnp.zeros((1, self.seq_len), jnp.int32))["params"]
        params = nn.meta.unbox(params)
        return params, self.optimizer(lr).init(params)

    def shardings(self, state: SwarmState) -> Any:
        """A SwarmState-shaped tree of NamedShardings."""
        return state.replace(step=self._replicated,  # type: ignore[attr-defined]  # flax adds it
                             params=jax.tree.map(lambda _: self._stacked, state.params),
                             opt_state=jax.tree.map(lambda _: self._stacked, state.opt_state),
                             alive=self._stacked, diverged_at=self._stacked)

    def init(self) -> SwarmState:
        """Member i's parameters equal those of a single run with seed i (PRNGKey(seed))."""
        def init(seeds, lrs):
            rngs = jax.vmap(jax.random.PRNGKey)(seeds)
            params, opt = jax.vmap(self._init_one)(rngs, lrs)
            return SwarmState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt,
                              alive=jnp.ones((self.k,), bool),
                              diverged_at=jnp.full((self.k,), -1, jnp.int32))
        shapes = jax.eval_shape(init, self.seeds, self.lrs)
        out = jax.jit(init, out_shardings=self.shardings(shapes))
        return out(self.seeds, self.lrs)

    def abstract_state(self) -> SwarmState:
        shapes = jax.eval_shape(lambda: self.init())
        shard = self.shardings(shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shard)

    # -- the compiled step

    def _member_step(self, params, opt_state, alive, lr, step, batch, reference_params=None):
        """One member's update: the trainer's own `step.update`, with the freeze mask on (and
        the DoReMi reference model run beside it when the swarm has one)."""
        grads, aux = self._member_gradients(params, batch, reference_params)
        return self._member_apply(params, opt_state, alive, lr, step, grads, aux)

    def _member_gradients(self, params, batch, reference_params=None):
        ref_model = None if self.reference is None else self.reference.model
        return step_lib.gradients(params, batch, model=self.model, num_domains=self.num_domains,
                                  z_loss=self.config.optim.z_loss,
                                  reference_params=reference_params, reference_model=ref_model)

    def _member_apply(self, params, opt_state, alive, lr, step, grads, aux):
        state = step_lib.TrainState(step=step, params=params, opt_state=opt_state)
        new, metrics = step_lib.apply_gradients(state, grads, aux, optimizer=self.optimizer(lr),
                                                z_loss=self.config.optim.z_loss, alive=alive)
        return new.params, new.opt_state, metrics

    def _signature(self) -> str:
        """What the compiled step depends on besides its arguments: swarms with equal
        signatures share one compilation (a mixture search trains many such swarms)."""
        c = self.config
        reference = (None if self.reference is None
                     else [dataclasses.asdict(self.reference.model.cfg), self.reference.key])
        return json.dumps({"model": dataclasses.asdict(self.model_cfg), "k": self.k,
                           "member_loop": self.member_loop, "reference": reference,
                           "optim": c.optim.to_dict(), "steps": int(c.steps),
                           "mesh": [str(self.mesh.devices.tolist()), dict(self.mesh.shape)]},
                          sort_keys=True, default=str)

    def _over_members(self, fn, shared: int = 0):
        """fn of one member -> fn of the stacked members: vmapped or mapped on each device, and
        split over the mesh's member axis with shard_map (members never talk to each other).
        The last ``shared`` arguments are the same for every member (not stacked)."""
        def local(*args):
            split = len(args) - shared
            stacked, common = args[:split], args[split:]
            if self.member_loop == "vmap":
                return jax.vmap(lambda *a: fn(*a, *common))(*stacked)
            return jax.lax.map(lambda a: fn(*a, *common), stacked)
        return self._per_device(local, shared)

    def _per_device(self, local, shared: int = 0):
        """``local`` (of each device's block of members) split over the mesh's member axis
        with shard_map; the last ``shared`` arguments are replicated."""
        if self.shards == 1:
            return local

        def sharded(*args):
            specs = (P(MEMBER_AXIS),) * (len(args) - shared) + (P(),) * shared
            return jax.shard_map(local, mesh=self.mesh, in_specs=specs,
                                 out_specs=P(MEMBER_AXIS), check_vma=False)(*args)
        return sharded

    def _members_step(self, with_reference: bool):
        """The member update over the stacked members. vmap: the whole update vmapped. map:
        the gradients mapped (members one at a time: the forward and backward passes run as
        unbatched kernels, which XLA's CPU backend runs fastest) and the optimizer step vmapped
        (elementwise, so batching it costs nothing, while mapping it would slice every
        member's parameters and optimizer state out of the stack and write them back: measured
        at 16 members of "tiny", 604 MB of state, a mapped identity update took 0.25 s against
        0.02 s vmapped)."""
        if self.member_loop == "vmap":
            return self._over_members(self._member_step, shared=int(with_reference))

        def local(params, opt_state, alive, lrs, steps, batch, *reference_params):
            grads, aux = jax.lax.map(
                lambda a: self._member_gradients(*a, *reference_params), (params, batch))
            return jax.vmap(self._member_apply)(params, opt_state, alive, lrs, steps, grads,
                                                aux)
        return self._per_device(local, shared=int(with_reference))

    def make_train_step(self, state_shardings: SwarmState):
        with_reference = self.reference is not None
        members_step = self._members_step(with_reference)

        def train_step(state: SwarmState, batch, lrs, *reference_params):
            steps = jnp.broadcast_to(state.step, (self.k,))
            params, opt, metrics = members_step(
                state.params, state.opt_state, state.alive, lrs, steps, batch, *reference_params)
            ok = metrics["alive"]
            newly_dead = state.alive & ~ok
            diverged_at = jnp.where(newly_dead, state.step, state.diverged_at)
            return SwarmState(step=state.step + 1, params=params, opt_state=opt, alive=ok,
                              diverged_at=diverged_at), metrics

        in_shardings: tuple = (state_shardings, self._stacked, self._stacked)
        if with_reference:
            in_shardings += (jax.tree.map(lambda _: self._replicated, self.reference.params),)
        return jax.jit(train_step, in_shardings=in_shardings,
                       out_shardings=(state_shardings, self._replicated), donate_argnums=0)

    def train_step(self, state: SwarmState, batch):
        """(state, batch [K, B, L] features) -> (state, metrics [K, ...]); state is donated."""
        if self._train_step is None:
            self._load_reference()
            key = ("train", self._signature())
            if key not in _COMPILED:
                _COMPILED[key] = self.make_train_step(self.shardings(state))
            self._train_step = _COMPILED[key]
            self._lrs = jax.device_put(self.lrs, self._stacked)
        step_fn = self._train_step
        if self.reference is None:
            return step_fn(state, batch, self._lrs)
        return step_fn(state, batch, self._lrs, self.reference.params)

    # -- DoReMi members: one reference model, run beside every member in the compiled step

    def _reference_sources(self) -> list:
        """Weight sources that learn from the reference's excess loss (DoReMi)."""
        return [s.source for s in (self.streams or ())
                if getattr(s.source, "feedback_metric", "") == "domain_excess_sum"]

    def _load_reference(self) -> None:
        """Loads the reference the members' sources name (once their state is restored: a
        resumed swarm keeps the reference step it started with)."""
        sources = self._reference_sources()
        if not sources or self.reference is not None:
            return
        keys = {(s.reference, s.reference_step) for s in sources}
        if len(keys) > 1:
            raise ValueError(f"the swarm's DoReMi members name different references {sorted(keys)}"
                             "; a swarm runs one reference model: give every DoReMi member the "
                             "same mixing.doremi.reference, or train them in separate swarms")
        self.reference = sources[0].load_reference(self.mesh, self.seq_len)
        self.reference.key = list(next(iter(keys)))
        self.reference.params = jax.device_put(
            self.reference.params, jax.tree.map(lambda _: self._replicated,
                                                self.reference.params))

    def feedback_metric(self, member: int) -> str:
        """The per-domain sum member ``member``'s weight source reads from the step metrics."""
        source = self.member_streams[member].source
        wanted = getattr(source, "feedback_metric", "domain_loss_sum")
        return wanted if self._reference_sources() else "domain_loss_sum"

    # -- data

    @property
    def member_streams(self) -> list:
        if self.streams is None:
            raise ValueError("this swarm was built without streams (build_streams=False)")
        return self.streams

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """Every member's batch at ``step`` stacked: [K, B, L] per feature; with per-token loss
        weights (``token_weights``, 1 for members whose source reweights nothing) when some
        member's source reweights its loss (DoReMi)."""
        parts = [s.batch(step) for s in self.member_streams]
        weighted = [getattr(s.source, "token_weights", None) for s in self.member_streams]
        if any(w is not None for w in weighted):
            for stream, part, weights_of in zip(self.member_streams, parts, weighted):
                table = np.ones(self.num_domains, np.float32)
                if weights_of is not None:
                    ids = dict(zip(stream.names, (int(i) for i in stream.domain_ids)))
                    table[[ids[d] for d in stream.source.domains]] = weights_of(step)
                part["token_weights"] = table[part["domain_ids"]]
        return {k: np.stack([p[k] for p in parts]) for k in parts[0]}

    def device_batch(self, batch: Mapping[str, np.ndarray]):
        return {k: jax.device_put(np.asarray(v), self._stacked) for k, v in batch.items()}

    def batch(self, step: int):
        return self.device_batch(self.host_batch(step))

    # -- evaluation: per member, per domain, on the fixed validation batches

    def eval_sets(self, domains: Sequence[str] | None = None) -> list[tuple[str, list, float]]:
        if self._eval_sets is None:
            c = self.config
            objective = run_lib.build_objective(c)
            catalog = run_lib.build_catalog(c)
            names = list(domains or catalog.names)
            sets = []
            for d in names:
                batches, _ = heldout.eval_batches(d, objective, self.seq_len,
                                                  c.eval_batch_size, c.eval_tokens,
                                                  catalog=catalog)
                tokens = float(sum(b["loss_weights"].sum() for b in batches))
                sets.append((d, batches, tokens))
            self._eval_sets = sets
        return self._eval_sets

    def evaluate(self, params, domains: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Validation loss of every member on every domain: {domain: [K] losses}."""
        if self._eval_step is None:
            def eval_step(params, batch):
                def one(p, b):
                    _, aux = step_lib.loss_sums(p, self.model, b, self.num_domains, 0.0)
                    return aux["loss_sum"]
                tiled = jax.tree.map(lambda x: jnp.broadcast_to(x, (self.k,) + x.shape), batch)
                return self._over_members(one)(params, tiled)
            key = ("eval", self._signature())
            if key not in _COMPILED:
                _COMPILED[key] = jax.jit(eval_step, out_shardings=self._replicated)
            self._eval_step = _COMPILED[key]
        eval_step = self._eval_step
        out = {}
        for d, batches, tokens in self.eval_sets(domains):
            total = np.zeros(self.k)
            for b in batches:
                dev = {k: jax.device_put(np.asarray(v), self._replicated) for k, v in b.items()}
                total += np.asarray(jax.device_get(eval_step(params, dev)), np.float64)
            out[d] = total / max(tokens, 1.0)
        return out


# --------------------------------------------------------------------------- the loop


def _member_losses(m: dict, domain_ids: Sequence[int], domains: Sequence[str]) -> list[dict]:
    out = []
    for i in range(m["loss"].shape[0]):
        out.append({d: float(m["domain_loss_sum"][i, j] / m["domain_tokens"][i, j])
                    for d, j in zip(domains, domain_ids) if m["domain_tokens"][i, j] > 0})
    return out


def _source_metrics(streams, step: int) -> dict:
    """What the members' weight sources report of ``step`` (e.g. DoReMi's domain weights), as
    one list per key with a null for members whose source does not report it."""
    reports: list[dict] = [getattr(s.source, "metrics_at", lambda _: {})(step) for s in streams]
    keys = sorted({k for r in reports for k in r})
    return {k: [r.get(k) for r in reports] for k in keys}


def train_swarm(config, members: Sequence[Member], workdir: str | Path,
                eval_domains: Sequence[str] | None = None, mesh: Mesh | None = None,
                verbose: bool = True, member_loop: str | None = None) -> dict:
    """Trains (or resumes) a swarm in ``workdir``; returns and writes ``results.json``:
    per member its config, final train loss, per-domain eval losses, and divergence.

    Like a single run, resuming from a checkpoint reproduces the uninterrupted swarm exactly.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    members = list(members)
    spec = {"members": [m.to_json() for m in members],
            "config": json.loads(config.to_json_best_effort())}
    spec_path = workdir / "swarm.json"
    saved = read_json(spec_path) if spec_path.exists() else None
    # The member loop is part of what a swarm computed (map and vmap differ in the last float
    # bits), so a resume keeps the loop the swarm started with, on any backend.
    saved_loop = None
    if saved is not None:  # swarms made before some fields existed: compared as they meant then
        saved_loop = saved.pop("member_loop", "vmap")
        saved["config"] = run_lib.comparable(saved.get("config", {}))
    if saved is not None and saved != {**json.loads(json.dumps(spec)),
                                       "config": run_lib.comparable(spec["config"])}:
        raise ValueError(f"{workdir} holds a different swarm (swarm.json differs: other members "
                         "or config); use a new workdir or restore the original settings")
    if member_loop and saved_loop and member_loop != saved_loop:
        raise ValueError(f"{workdir} was trained with member_loop={saved_loop!r}; resuming it "
                         f"with {member_loop!r} would not reproduce it exactly. Pass "
                         f"member_loop={saved_loop!r} or use a new workdir")
    member_loop = member_loop or saved_loop or default_member_loop()
    write_json(spec_path, dict(spec, member_loop=member_loop), indent=1)
    done = workdir / "results.json"
    if done.exists():  # finished earlier with this very spec: nothing left to do
        if verbose:
            print(f"swarm in {workdir} already finished; results read from {done.name}",
                  flush=True)
        return read_json(done)

    swarm = Swarm(config, members, mesh=mesh, member_loop=member_loop)
    state = swarm.init()
    shardings = swarm.shardings(state)
    checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    start = 0
    restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state, shardings))
    if restored is not None:
        state, meta = restored
        start = int(meta["step"])
        for stream, data in zip(swarm.member_streams, meta["data"]):
            stream.load_state(data)  # checks the position; restores an online log
        if verbose:
            print(f"swarm resumed from checkpoint at step {start}", flush=True)
    domains = catalog_lib.mixture_domains(config)
    domain_ids = [run_lib.build_catalog(config).domain_id(d) for d in domains]
    # Online weight sources read each member's own per-domain losses, every step.
    feedback = [(i, hooks_lib.MixtureFeedback(s, swarm.feedback_metric(i)))
                for i, s in enumerate(swarm.member_streams) if s.source.adaptive]
    writer = metrics_lib.MetricWriter(workdir, "train")
    reported: set[int] = set(int(i) for i in np.flatnonzero(~np.asarray(state.alive)))
    last_loss = np.full(swarm.k, np.nan)
    t0, tokens_done = time.time(), 0

    def save(step_no: int):
        data = [s.state_dict(step_no) for s in swarm.member_streams]
        checkpointer.save(step_no, state, {"step": step_no, "data": data,
                                           "seeds": swarm.seeds.tolist()})

    def finish(step_no: int, m):
        nonlocal t0, tokens_done
        m = jax.device_get(m)
        for member, hook in feedback:
            hook.after_step(step_no - 1, {k: v[member] for k, v in m.items()})
        last_loss[:] = m["loss"]
        for i in np.flatnonzero(~m["alive"]):
            if int(i) not in reported:
                reported.add(int(i))
                print(f"swarm member {i} ({members[i].name or 'unnamed'}) diverged at step "
                      f"{step_no - 1} (loss {float(m['loss'][i])}); frozen, the others continue",
                      flush=True)
        if step_no % config.log_every and step_no != config.steps:
            return
        tok_s = tokens_done / max(time.time() - t0, 1e-9)
        t0, tokens_done = time.time(), 0
        writer.write(step_no, {"loss": [float(x) for x in m["loss"]],
                               "loss_mean_alive": float(np.mean(m["loss"][m["alive"]]))
                               if m["alive"].any() else float("nan"),
                               "alive": int(m["alive"].sum()), "tokens_per_s": tok_s,
                               "mixture_weights": [
                                   dict(zip(domains, map(float, s.weights_at(step_no - 1))))
                                   for s in swarm.member_streams],
                               "loss_per_domain": _member_losses(m, domain_ids, domains),
                               **_source_metrics(swarm.member_streams, step_no - 1)})
        if verbose:
            print(f"swarm step {step_no}/{config.steps}: mean loss "
                  f"{np.nanmean(np.where(m['alive'], m['loss'], np.nan)):.3f}, "
                  f"{int(m['alive'].sum())}/{swarm.k} alive, {tok_s:,.0f} tok/s", flush=True)

    # Members whose weight source decides in rounds (Aioli, Skill-it): before a round's step,
    # the member's own parameters and optimiser state go to its source's lab, as in a run.
    rounds_members = [(i, s.source) for i, s in enumerate(swarm.member_streams)
                      if hasattr(s.source, "run_round")]  # loam.mixing.online.rounds
    labs: dict[int, Any] = {}

    def run_rounds(step: int) -> None:
        due = [(i, source) for i, source in rounds_members if source.due(step)]
        if not due:
            return
        params, opt_state = jax.device_get((state.params, state.opt_state))
        for i, source in due:
            if i not in labs:
                c = swarm.configs[i]
                labs[i] = source.make_lab(c, swarm.model, run_lib.build_mesh(c))
            member = step_lib.TrainState(step=jnp.asarray(step, jnp.int32),
                                         params=jax.tree.map(lambda x, i=i: x[i], params),
                                         opt_state=jax.tree.map(lambda x, i=i: x[i], opt_state))
            source.run_round(step, labs[i].at(step, member))
            labs[i].state = None

    pending = None
    try:
        for step in range(start, config.steps):
            run_rounds(step)
            state, metrics = swarm.train_step(state, swarm.batch(step))
            tokens_done += swarm.k * swarm.batch_size * swarm.seq_len
            if pending is not None:
                finish(*pending)
            pending = (step + 1, metrics)
            step_no = step + 1
            if step_no % config.checkpoint_every == 0 or step_no == config.steps:
                finish(*pending)
                pending = None
                save(step_no)
        if pending is not None:
            finish(*pending)
        losses = swarm.evaluate(state.params, eval_domains)
    finally:
        checkpointer.wait()
        checkpointer.close()
        writer.close()
    alive = np.asarray(jax.device_get(state.alive))
    diverged_at = np.asarray(jax.device_get(state.diverged_at))
    results = {"steps": int(config.steps),
               "tokens_per_member": int(config.steps) * swarm.batch_size * swarm.seq_len,
               "members": []}
    for i, m in enumerate(members):
        eval_i = {d: float(v[i]) for d, v in losses.items()}
        finite = bool(alive[i]) and all(math.isfinite(v) for v in eval_i.values())
        results["members"].append({**m.to_json(), "alive": bool(alive[i]),
                                   "diverged_at": int(diverged_at[i]),
                                   "train_loss": float(last_loss[i]),
                                   "eval_loss": eval_i, "finite": finite})
    write_json(workdir / "results.json", results, indent=1)  # never left half-written
    return results
