"""Builders: one place that turns a config into a model, optimizer, schedule, stream and mesh,
and opens a run directory. train, eval, the swarm, sweeps, averaging, selection and the
benchmarks all build through here, so a config means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh

from loam import checkpoint as ckpt_lib
from loam import paths
from loam import step as step_lib
from loam.data import catalog as catalog_lib
from loam.data import objectives, views
from loam.data import replay as replay_lib
from loam.data import sources as sources_lib
from loam.data import stream as stream_lib
from loam.data import vocab as vocab_lib
from loam.data import weights as weights_lib
from loam.data.sources import seqio as seqio_source
from loam.model import sharding, sizes
from loam.model.transformer import CAUSAL_ONLY, ModelConfig, Transformer

SHAPE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_dim")


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


# --------------------------------------------------------------------------- config

def resolve_config(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list]:
    """The config a run will use, validated before anything is written, and notes to print.

    A warmup longer than the run is clamped (to a tenth of the steps) rather than refused: a
    shorter run is the first thing a user tries.
    """
    c = copy_config(config)
    notes = []
    steps = int(c.steps)
    if steps < 1:
        raise ConfigError(f"steps={steps}; a run needs steps >= 1")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "eval_tokens", "eval_batch_size"):
        if key in c and int(c[key]) < 1:
            raise ConfigError(f"{key}={c[key]} must be >= 1 (use a value larger than steps, "
                              f"e.g. {key}={steps}, to do it only at the end)")
    o = c.optim
    for key in ("lr", "weight_decay", "b1", "b2", "z_loss"):
        if not math.isfinite(float(o[key])) or float(o[key]) < 0:
            raise ConfigError(f"optim.{key}={o[key]} must be a finite, non-negative number")
    if float(o.lr) <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be positive")
    if o.clip_norm is not None and not (math.isfinite(float(o.clip_norm))
                                        and float(o.clip_norm) >= 0):
        raise ConfigError(f"optim.clip_norm={o.clip_norm} must be finite and >= 0 (0: no clipping)")
    if int(o.warmup_steps) < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if int(o.warmup_steps) > steps:
        clamped = steps // 10
        notes.append(f"optim.warmup_steps={o.warmup_steps} exceeds steps={steps}; warming up "
                     f"over {clamped} steps (a tenth of the run) instead. Set "
                     "--config.optim.warmup_steps to choose.")
        o.warmup_steps = clamped
    if int(o.accum_steps) < 1 or int(c.data.batch_size) % int(o.accum_steps):
        raise ConfigError(f"optim.accum_steps={o.accum_steps} must be >= 1 and divide "
                          f"data.batch_size={c.data.batch_size}")
    _resolve_data(c)
    impl = c.model.get("attention_impl")
    if impl in CAUSAL_ONLY and c.data.objective != "causal":
        raise ConfigError(f"model.attention_impl={impl!r} is causal attention only, but "
                          f"data.objective={c.data.objective!r} trains with a bidirectional "
                          "prefix: use --config.model.attention_impl=manual for it")
    if c.model.get("attention_impl") == "splash" and int(c.data.seq_len) % 128:
        raise ConfigError(f"model.attention_impl='splash' tiles the sequence in blocks of 128, "
                          f"but data.seq_len={c.data.seq_len}: use a multiple of 128, or "
                          "--config.model.attention_impl=manual")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError("model.attention_impl='cudnn' is cuDNN's fused attention, which runs "
                          f"on an NVIDIA GPU, but JAX's backend here is "
                          f"{jax.default_backend()!r}: use --config.model.attention_impl=manual")
    dense = c.get("eval_dense")
    if dense is not None and (int(dense.get("every", 1)) < 1 or int(dense.get("until", 0)) < 0):
        raise ConfigError(f"eval_dense={dense.to_dict()}: every must be >= 1 and until >= 0 "
                          "(0: no dense evaluation)")
    if c.data.get("replay"):
        replay_lib.check(c.data.replay, c.data.domains)
    if c.get("init") is not None and c.init.get("carry", "params") not in INIT_CARRY:
        raise ConfigError(f"init.carry={c.init.carry!r}; choose one of {', '.join(INIT_CARRY)}")
    return c, notes


def _resolve_data(c: ml_collections.ConfigDict) -> None:
    """Sources parsed and checked (not read), and ``data.domains`` (the domains the mixture
    trains on, in order) defaulting to every source. ``data.sources`` becomes a list of
    [domain, spec] pairs: its order is the order of the domain ids, and a list keeps it through
    every copy and JSON file (mappings get their keys sorted)."""
    raw = c.data.get("sources") or catalog_lib.default_specs()
    if isinstance(raw, list | tuple):
        items = [(p[0], p[1]) for p in raw]
    else:
        items = [(k, v.to_dict() if hasattr(v, "to_dict") else v)
                 for k, v in sources_lib.ordered_items(raw)]
    with c.unlocked():
        if "sources" in c.data:
            del c.data["sources"]
        c.data.sources = [[k, v] for k, v in items]
        if not c.data.get("tokenizer"):
            c.data.tokenizer = "bundled"
    try:
        catalog = catalog_lib.for_config(c)
    except ValueError as e:
        raise ConfigError(f"config.data.sources: {e}") from None
    domains = list(c.data.get("domains") or catalog.names)
    for d in domains:
        try:
            catalog.check(d)
        except ValueError as e:
            raise ConfigError(f"config.data.domains: {e}") from None
    c.data.domains = domains
    for name in domains:
        source = catalog.source(name)
        if source.kind == "seqio":
            wanted = seqio_source.required_objective(source)
            if wanted and wanted != c.data.objective:
                raise ConfigError(
                    f"domain {name!r} is the seqio task {source.target!r}, whose objective is "
                    f"{wanted!r}, but config.data.objective is {c.data.objective!r}: set "
                    f"--config.data.objective={wanted}, or name the task's causal variant")


def copy_config(config) -> ml_collections.ConfigDict:
    """A deep copy that keeps the order in which mappings were written (``to_dict`` sorts keys;
    the order of ``data.sources`` is the order of the domain ids)."""
    return ml_collections.ConfigDict(json.loads(config.to_json_best_effort()))


def read_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run directory was trained with."""
    path = paths.Path(workdir) / "config.json"
    if not paths.exists(path):
        raise FileNotFoundError(f"{path} not found: the directory must be a loam run directory "
                                "(created by python -m loam.train)")
    try:
        return ml_collections.ConfigDict(json.loads(paths.read_text(path)))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the timestamped "
                          "copy next to it (config.*.json) or retrain") from None


# Fields a resumed run must share with the run it continues; anything else (steps, future
# curriculum stages, eval cadence, the mesh) may change.
RESUME_FIELDS = ("seed", "model.size", *(f"model.{k}" for k in SHAPE_FIELDS),
                 "model.tied_embeddings", "data.sources", "data.tokenizer", "data.domains",
                 "data.objective", "data.seq_len", "data.batch_size", "data.dir", "mixing")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "get") or part not in node:
            return None
        node = node[part]
    return node.to_dict() if hasattr(node, "to_dict") else node


# Fields added to the config after runs were made with it: a saved config without one meant this.
ADDED_LATER = {"mixing": {"method": "static"},
               "model.loss_impl": "fused",
               "model.attention_impl": "manual",
               "model.attention_block": 128,
               "model.residuals": "dots",
               "init": {"checkpoint": "", "carry": "params"},
               "data.replay": {"fraction": 0.0, "domains": [], "weights": "proportional"},
               "eval_dense": {"every": 1, "until": 0},
               "data.sources": [[k, v] for k, v in catalog_lib.default_specs().items()],
               "data.tokenizer": "bundled",
               "evals": [],
               "profile_steps": [],
               "data.selection": {},
               "wandb": {"project": "", "entity": "", "name": "", "group": "", "mode": "",
                         "dir": ""}}


def with_added_later(config: dict) -> dict:
    """A config (as a JSON dict) saved before some fields existed, with those fields set to what
    the run meant then (``ADDED_LATER``; dotted names are nested fields)."""
    out = json.loads(json.dumps(config))
    for field, value in ADDED_LATER.items():
        node = out
        *parents, leaf = field.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node.setdefault(leaf, json.loads(json.dumps(value)))
    return out


def comparable(config: dict) -> dict:
    """A config (JSON dict) as a run would resolve it: two configs that train the same run
    compare equal, however each was written or whenever it was saved."""
    resolved, _ = resolve_config(ml_collections.ConfigDict(with_added_later(config)))
    return json.loads(resolved.to_json_best_effort())


def _mixing_in_use(mixing) -> dict:
    """The part of config.mixing a run depends on: its method and that method's block (the
    default config carries every method's block; a run reads only its own)."""
    mixing = dict(mixing) if mixing else {"method": "static"}
    method = mixing.get("method", "static")
    return {"method": method, **({method: mixing[method]} if method in mixing else {})}


def resume_mismatch(saved: ml_collections.ConfigDict, new: ml_collections.ConfigDict) -> str | None:
    """The first field that differs between a run's saved config and a resuming one, as a
    message, or None when the new config can continue the run."""
    for field in RESUME_FIELDS:
        a, b = _get(saved, field), _get(new, field)
        if a is None:
            a = ADDED_LATER.get(field)
        if field == "mixing":
            a, b = _mixing_in_use(a), _mixing_in_use(b)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            return (f"{field} was {a!r} in the run being resumed but this config gives {b!r}; "
                    "a run can only continue with the model, data and seed it started with. "
                    "Restore the original value, or train into a new workdir")
    return None


# --------------------------------------------------------------------------- builders

def model_config(config, vocab_size: int | None = None) -> ModelConfig:
    """The named size, with any nonzero explicit shape field replacing the size's; the
    vocabulary is the run's tokenizer's."""
    if vocab_size is None:
        vocab_size = vocab_lib.get_tokenizer(config.data.get("tokenizer") or "bundled").vocab_size
    cfg = sizes.get_size(config.model.size, vocab_size)
    shape: dict[str, Any] = {k: int(config.model.get(k, 0) or 0) for k in SHAPE_FIELDS}
    shape = {k: v for k, v in shape.items() if v > 0}
    if shape:  # head_dim and kv heads are re-derived from the new shape unless given
        if "n_heads" in shape and "n_kv_heads" not in shape:
            shape["n_kv_heads"] = shape["n_heads"]
        cfg = dataclasses.replace(cfg, head_dim=None, **shape)
    return dataclasses.replace(
        cfg, remat=config.model.remat, tied_embeddings=config.model.tied_embeddings,
        dtype=config.model.dtype, max_len=config.data.seq_len,
        loss_impl=config.model.get("loss_impl", "fused"),
        attention_impl=config.model.get("attention_impl", "manual"),
        attention_block=int(config.model.get("attention_block", 128)),
        residuals=config.model.get("residuals", "dots"))


def build_model(config) -> Transformer:
    return Transformer(model_config(config))


def lr_schedule(config, peak: Any = None) -> optax.Schedule:
    """The run's learning-rate schedule; ``peak`` overrides optim.lr (a swarm member's, traced).
    The infinite schedule's fields are read only by it (configs saved before they existed never
    name it)."""
    o = config.optim
    infinite: dict[str, Any] = {}
    if o.schedule == "infinite":
        infinite = dict(cooldown_steps=int(o.cooldown_steps),
                        constant_fraction=float(o.constant_lr_fraction),
                        anneal_start=int(o.anneal_start))
    try:
        return step_lib.lr_schedule(o.schedule, o.lr if peak is None else peak, config.steps,
                                    o.warmup_steps, final_fraction=o.final_lr_fraction,
                                    decay_fraction=o.decay_fraction, **infinite)
    except ValueError as e:
        raise ConfigError(f"config.optim: {e}") from None


def build_optimizer(config, peak: Any = None) -> optax.GradientTransformation:
    o = config.optim
    return step_lib.make_optimizer(lr_schedule(config, peak), weight_decay=o.weight_decay,
                                   b1=o.b1, b2=o.b2, clip_norm=o.clip_norm)


def build_mesh(config, devices=None) -> Mesh:
    return sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                              devices=devices)


def num_domains(config) -> int:
    """Length of the per-domain loss vectors of the compiled step: one per source (batches
    carry the source's position as their domain id)."""
    return len(build_catalog(config))


mixture_domains = catalog_lib.mixture_domains


def build_catalog(config) -> catalog_lib.Catalog:
    """The run's sources, tokenizer and prepared data."""
    return catalog_lib.for_config(config)


def build_objective(config):
    return objectives.get_objective(config.data.objective, build_catalog(config).tokenizer)


def build_stream(config, process_index: int = 0,
                 process_count: int = 1) -> stream_lib.MixtureStream:
    return stream_lib.MixtureStream(
        domains=catalog_lib.mixture_domains(config),
        objective=build_objective(config),
        weights=weights_lib.source_from_config(config), seq_len=config.data.seq_len,
        batch_size=config.data.batch_size, seed=config.seed,
        data_dir=config.data.dir or None, scores_dir=config.data.get("scores_dir") or None,
        process_index=process_index, process_count=process_count,
        catalog=build_catalog(config), selection=views.selections_from_config(config))


def build_train_step(config, model, optimizer, mesh, state_shardings):
    o = config.optim
    return step_lib.make_train_step(model, optimizer, mesh, state_shardings, num_domains(config),
                                    z_loss=o.z_loss, accum_steps=o.accum_steps)


# --------------------------------------------------------------------------- run directories

@dataclasses.dataclass
class Run:
    """A run directory opened for reading: its config, model, mesh and checkpoints."""
    workdir: paths.epath.Path
    config: ml_collections.ConfigDict
    model: Transformer
    mesh: Mesh
    checkpointer: ckpt_lib.Checkpointer
    abstract: Any  # ShapeDtypeStructs of the whole train state, sharded on `mesh`

    def steps(self) -> list[int]:
        return self.checkpointer.steps()

    def pick_step(self, step: int | None) -> int:
        available = self.steps()
        if not available:
            raise FileNotFoundError(f"no checkpoints in {self.workdir / 'checkpoints'}")
        if step is None:
            return available[-1]
        if step not in available:
            raise ValueError(f"no checkpoint for step {step} in {self.workdir}; available: "
                             f"{available}")
        return step

    def restore(self, step: int | None = None):
        """(state, meta) of a checkpoint, optimizer state included (resuming, averaging)."""
        return self.checkpointer.restore(self.pick_step(step), self.abstract)

    def close(self):
        self.checkpointer.close()


def open_run(workdir: paths.PathLike, devices=None) -> Run:
    """A run directory's config, model, mesh and checkpointer, ready to restore any step. The
    mesh is the run's own unless it does not fit these devices (then all devices, data-parallel)."""
    run_dir = paths.Path(workdir)
    config = read_config(run_dir)
    model = build_model(config)
    try:
        mesh = build_mesh(config, devices)
    except ValueError:
        mesh = sharding.make_mesh(-1, 1, 1, devices=devices)
    abstract, _ = step_lib.abstract_state(model, build_optimizer(config), mesh,
                                          config.data.seq_len)
    checkpointer = ckpt_lib.Checkpointer(run_dir / "checkpoints", async_save=False)
    return Run(run_dir, config, model, mesh, checkpointer, abstract)


def load_params(workdir: paths.PathLike, step: int | None = None, devices=None):
    """(params, run, step): the parameters of one checkpoint (default: the newest), without the
    optimizer state and on any number of devices. What a notebook or an evaluator calls."""
    run = open_run(workdir, devices)
    step = run.pick_step(step)
    params = run.checkpointer.restore_params(step, run.abstract.params)
    return params, run, step


# --------------------------------------------------------------------------- init from another run

# What a run started from another run's checkpoint (config.init.checkpoint) takes from it:
# - "params": the parameters; optimizer state, step and schedule start afresh.
# - "params+opt": the parameters and Adam's moments (with their own bias-correction count, which
#   belongs to them: restarting it would scale the carried moments by 1/(1-b1)); the step and the
#   learning-rate schedule start at 0.
# - "all": the whole training state (parameters, optimizer state, step): the new run counts on
#   from the source's step, so its schedule is the new config's read from that step on (an anneal
#   branched from a constant phase); its batches are the new config's at those steps, which for
#   unchanged data are the very batches the source run would have trained on next.
INIT_CARRY = ("params", "params+opt", "all")


def parse_init(spec: str, what: str = "init.checkpoint") -> tuple[str, int | None]:
    """"DIR[:STEP]" -> (DIR, STEP or None); a URL's own colon is part of DIR. ``what`` names
    the setting in the error."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail.isdigit():
        return head, int(tail)
    if sep and head and tail and "/" not in tail:
        raise ConfigError(f"{what}={spec!r}: the step after ':' must be a number "
                          "(DIR or DIR:STEP)")
    return spec, None


def checkpoint_steps(workdir) -> list[int]:
    """The steps saved in a run directory, read from the listing (opens nothing for writing);
    none when it has no checkpoints folder."""
    root = paths.Path(workdir) / "checkpoints"
    if not paths.exists(root):
        return []
    return sorted(int(p.name) for p in paths.iterdir(root) if p.name.isdigit())


def _tokenizer(config) -> vocab_lib.Tokenizer:
    return vocab_lib.get_tokenizer(config.data.get("tokenizer") or "bundled")


def _check_init_fits(config, source, where: str) -> None:
    """One line for the first of vocabulary, tokenizer or model shape that differs."""
    mine, theirs = _tokenizer(config), _tokenizer(source)
    if mine.vocab_size != theirs.vocab_size:
        raise ConfigError(
            f"init.checkpoint={where}: vocabulary mismatch: the source run's tokenizer "
            f"({source.data.get('tokenizer') or 'bundled'}) has {theirs.vocab_size} ids, this "
            f"config's ({config.data.tokenizer}) {mine.vocab_size}; continue with the source's "
            f"tokenizer (--config.data.tokenizer={source.data.get('tokenizer') or 'bundled'})")
    if mine.fingerprint != theirs.fingerprint:
        raise ConfigError(
            f"init.checkpoint={where}: tokenizer mismatch: the source run was trained with "
            f"{source.data.get('tokenizer') or 'bundled'} and this config uses "
            f"{config.data.tokenizer}, which has as many ids but other pieces (the embeddings "
            "would mean other text); continue with the source's tokenizer "
            f"(--config.data.tokenizer={source.data.get('tokenizer') or 'bundled'})")
    a, b = model_config(source, theirs.vocab_size), model_config(config, mine.vocab_size)
    for field in (*SHAPE_FIELDS, "head_dim", "tied_embeddings"):
        if getattr(a, field) != getattr(b, field):
            raise ConfigError(
                f"init.checkpoint={where}: model shape mismatch: {field} is {getattr(a, field)} "
                f"in the source run (model.size={source.model.size}) but {getattr(b, field)} in "
                f"this config (model.size={config.model.size}); start from a run of this shape, "
                f"or give this run the source's (--config.model.size={source.model.size} and "
                "its shape fields)")


def resolve_init(config: ml_collections.ConfigDict, workdir: paths.PathLike,
                 resuming: bool) -> ml_collections.ConfigDict:
    """The config with ``init`` resolved, checked before anything is written.

    A run that resumes its own checkpoints keeps the init block it started with (a different
    one given now is ignored, with a note). A new run gets, beside ``checkpoint`` and ``carry``,
    where it starts: ``source`` (the source run directory, absolute), ``step`` and
    ``source_config_sha256`` (of the source's config.json), and the source's own init block as
    ``source_init`` when the source was itself started from another run: the chain of runs.
    The source is only read.
    """
    init = config.get("init")
    if init is None:
        return config
    c = copy_config(config)
    if resuming:
        saved = _get(read_config(workdir), "init") if paths.exists(
            paths.Path(workdir) / "config.json") else None
        saved = saved or json.loads(json.dumps(ADDED_LATER["init"]))
        if init.get("checkpoint") and init.checkpoint != saved.get("checkpoint"):
            print(f"note: init.checkpoint={init.checkpoint} is ignored: {workdir} resumes its "
                  "own checkpoints", flush=True)
        with c.unlocked():
            c.init = ml_collections.ConfigDict(saved)
        return c
    spec = str(init.get("checkpoint") or "")
    carry = str(init.get("carry") or "params")
    if not spec:
        with c.unlocked():
            c.init = ml_collections.ConfigDict({"checkpoint": "", "carry": carry})
        return c
    where, step = parse_init(spec)
    src = paths.absolute(where)
    if not paths.exists(src / "config.json"):
        raise ConfigError(f"init.checkpoint={spec}: {src} is not a loam run directory (no "
                          "config.json); name the workdir of a run trained by python -m "
                          "loam.train")
    available = checkpoint_steps(src)
    if not available:
        raise ConfigError(f"init.checkpoint={spec}: {src} holds no checkpoints to start from; "
                          "train it until it saves one (checkpoint_every) or name another run")
    if step is None:
        step = available[-1]
    elif step not in available:
        raise ConfigError(f"init.checkpoint={spec}: {src} has no checkpoint at step {step}; "
                          f"its checkpoints are at steps {available}")
    if paths.absolute(workdir) == src:
        raise ConfigError(f"init.checkpoint={spec} names this run's own workdir; to continue a "
                          "run, rerun it without init.checkpoint")
    source = read_config(src)
    _check_init_fits(c, source, spec)
    if carry == "all" and int(c.steps) <= step:
        raise ConfigError(f"init.carry=all continues the source's step counter from {step}, so "
                          f"steps={c.steps} leaves nothing to train; set steps > {step}")
    record: dict[str, Any] = {
        "checkpoint": spec, "carry": carry, "source": str(src), "step": int(step),
        "source_config_sha256": hashlib.sha256(
            paths.read_bytes(src / "config.json")).hexdigest()}
    if source.get("init") is not None and source.init.get("checkpoint"):
        record["source_init"] = source.init.to_dict()
    with c.unlocked():
        c.init = ml_collections.ConfigDict(record)
    return c


def restore_init(config, state, state_shardings) -> tuple[Any, int, dict | None]:
    """(state, start step, the source checkpoint's metadata for carry=all else None): ``state``
    (a freshly initialised one, on this run's mesh) with what ``config.init`` carries over from
    the source checkpoint, read onto this run's shardings. The source is only read."""
    init = config.init
    abstract = ckpt_lib.abstract_like(state, state_shardings)
    checkpointer = ckpt_lib.Checkpointer(paths.Path(init.source) / "checkpoints",
                                         async_save=False)
    try:
        if init.carry == "params":
            return state.replace(params=checkpointer.restore_params(
                int(init.step), abstract.params)), 0, None
        try:
            restored, meta = checkpointer.restore(int(init.step), abstract)
        except ckpt_lib.CheckpointMismatch:
            raise ConfigError(
                f"init.carry={init.carry}: the optimizer state saved at step {init.step} of "
                f"{init.source} has another structure than this config's optimizer; carry the "
                "parameters alone (init.carry=params)") from None
        if init.carry == "all":
            return restored, int(meta["step"]), meta
        opt_state = tuple(theirs if isinstance(theirs, optax.ScaleByAdamState) else mine
                          for mine, theirs in zip(state.opt_state, restored.opt_state))
        return state.replace(params=restored.params, opt_state=opt_state), 0, None
    finally:
        checkpointer.close()


def first_step(config) -> int:
    """The step a run's training starts from: the source's step for init.carry=all, else 0."""
    init = config.get("init")
    if init is not None and init.get("carry") == "all" and init.get("step") is not None:
        return int(init.step)
    return 0


def eval_due(config, step_no: int, steps: int) -> bool:
    """Whether the loop evaluates after update ``step_no``: every eval_every, at the end, and
    every eval_dense.every updates over the first eval_dense.until updates of the run (0: the
    model the run starts with, before its first update)."""
    if step_no == steps or (step_no % int(config.eval_every) == 0 and step_no > 0):
        return True
    dense = config.get("eval_dense")
    until = int(dense.get("until", 0)) if dense is not None else 0
    k = step_no - first_step(config)
    return until > 0 and 0 <= k <= until and k % int(dense.get("every", 1)) == 0
