"""Builders: one place that turns a config into a model, optimizer, schedule, stream and mesh,
and opens a run directory. train, eval, the swarm, sweeps, averaging, selection and the
benchmarks all build through here, so a config means the same thing everywhere.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import ml_collections
import optax
from jax.sharding import Mesh

from loam import checkpoint as ckpt_lib
from loam import paths
from loam import step as step_lib
from loam.data import catalog as catalog_lib
from loam.data import objectives
from loam.data import sources as sources_lib
from loam.data import stream as stream_lib
from loam.data import vocab as vocab_lib
from loam.data import weights as weights_lib
from loam.data.sources import seqio as seqio_source
from loam.model import sharding, sizes
from loam.model.transformer import ModelConfig, Transformer

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
               "data.sources": [[k, v] for k, v in catalog_lib.default_specs().items()],
               "data.tokenizer": "bundled",
               "evals": []}


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
        dtype=config.model.dtype, max_len=config.data.seq_len)


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
        catalog=build_catalog(config))


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
