"""The one update: loss sums, optimizer, schedules, sharded state initialisation.

`update` is a pure function (grads of the summed loss / tokens -> optax update -> metrics with
per-domain sums). The trainer jits it with the state donated and sharded by the logical rules;
the proxy swarm vmaps the very same function over its members (with a freeze mask), so a swarm
member equals a single run by construction. Per-domain loss sums and token counts come back
with every step so the loop can log loss per domain and mixing controllers can read them.
A batch may carry per-token loss weights, and a fixed reference model may run in the same step
(DoReMi's excess loss); neither changes what the per-domain sums report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, cast

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from loam.model import loss as loss_lib
from loam.model import sharding as shd
from loam.model.transformer import CAUSAL_ONLY, output_matrix

Batch = Mapping[str, jax.Array]
MODEL_FEATURES = ("inputs", "segment_ids", "positions", "prefix")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any


# --------------------------------------------------------------------------- schedules, optimizer

SCHEDULE_KINDS = ("cosine", "wsd", "constant", "infinite")


def lr_schedule(kind: str, peak: float, steps: int, warmup: int, final_fraction: float = 0.0,
                decay_fraction: float = 0.2, *, cooldown_steps: int = 0,
                constant_fraction: float = 1.0, anneal_start: int = 0) -> optax.Schedule:
    """Learning rate at update t (0-based): linear warmup to ``peak`` over ``warmup`` updates, then

    - "cosine": cosine from peak to final_fraction*peak at ``steps``;
    - "wsd": constant peak, then linear to final_fraction*peak over the last decay_fraction of
      ``steps`` (warmup-stable-decay);
    - "constant": peak;
    - "infinite" (Ibrahim et al. 2024): cosine cooldown from peak to constant_fraction*peak over
      ``cooldown_steps``, then constant; from update ``anneal_start`` (0: never) linear to
      final_fraction*peak at ``steps``. Before the annealing no value depends on ``steps``, so
      the constant phase can be extended (more steps, a later anneal) without changing the past.
    Warmup reaches peak at update warmup-1, so no update runs at learning rate 0. A continual run
    re-warms and re-decays with its own peak and warmup: any of these, from its own step 0.
    """
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}")
    if steps <= 0 or not 0 <= warmup <= steps:
        raise ValueError(f"schedule needs steps > 0 and 0 <= warmup <= steps, got steps={steps}, "
                         f"warmup={warmup}")
    if not 0.0 <= decay_fraction <= 1.0 or not 0.0 <= final_fraction <= 1.0:
        raise ValueError("decay_fraction and final_fraction must lie in [0, 1]")
    final = final_fraction * peak
    if kind == "infinite":
        return _infinite_schedule(peak, steps, warmup, final_fraction, cooldown_steps,
                                  constant_fraction, anneal_start)
    decay_steps = max(1, int(round(decay_fraction * steps)))
    decay_start = max(warmup, steps - decay_steps)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (t + 1.0) / max(warmup, 1))
        if kind == "constant":
            after = jnp.full_like(t, peak)
        elif kind == "cosine":
            frac = jnp.clip((t - warmup) / max(steps - warmup, 1), 0.0, 1.0)
            after = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:
            frac = jnp.clip((t - decay_start) / max(steps - decay_start, 1), 0.0, 1.0)
            after = peak + (final - peak) * frac
        return jnp.where(t < warmup, warm, after)

    return schedule


def _infinite_schedule(peak, steps: int, warmup: int, final_fraction: float,
                       cooldown_steps: int, constant_fraction: float,
                       anneal_start: int) -> optax.Schedule:
    """Warmup, cosine cooldown, constant, optional linear anneal; overlapping phases refused."""
    if int(cooldown_steps) < 0:
        raise ValueError(f"infinite schedule: cooldown_steps={cooldown_steps} must be >= 0")
    if not 0.0 < constant_fraction <= 1.0:
        raise ValueError(f"infinite schedule: constant_lr_fraction={constant_fraction} must lie "
                         "in (0, 1] (the constant phase's learning rate, a fraction of the peak)")
    constant_ends_cooldown = warmup + int(cooldown_steps)
    if anneal_start:
        if not constant_ends_cooldown <= anneal_start < steps:
            where = ("before warmup + cooldown end" if anneal_start < constant_ends_cooldown
                     else "at or after the last step")
            raise ValueError(
                f"infinite schedule: the annealing phase starts at step anneal_start="
                f"{anneal_start}, {where} (warmup_steps={warmup} + cooldown_steps="
                f"{cooldown_steps} end at step {constant_ends_cooldown}; the run has steps="
                f"{steps}): the phases overlap. Set anneal_start in [{constant_ends_cooldown}, "
                f"{steps}), shorten the warmup or cooldown, or set anneal_start=0 for no annealing")
        if final_fraction > constant_fraction:
            raise ValueError(
                f"infinite schedule: final_lr_fraction={final_fraction} is above "
                f"constant_lr_fraction={constant_fraction}, so the annealing phase would raise "
                "the learning rate; set final_lr_fraction <= constant_lr_fraction")
    elif constant_ends_cooldown > steps:
        raise ValueError(
            f"infinite schedule: warmup_steps={warmup} + cooldown_steps={cooldown_steps} = "
            f"{constant_ends_cooldown} exceed steps={steps}, so the run never reaches its constant "
            "phase; shorten the cooldown or train longer")
    level = constant_fraction * peak
    final = final_fraction * peak

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * jnp.minimum(1.0, (t + 1.0) / max(warmup, 1))
        if cooldown_steps:
            frac = jnp.clip((t - warmup) / int(cooldown_steps), 0.0, 1.0)
            after = level + (peak - level) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:
            after = jnp.full_like(t, level)
        if anneal_start:
            frac = jnp.clip((t - anneal_start) / (steps - anneal_start), 0.0, 1.0)
            after = jnp.where(t < anneal_start, after, level + (final - level) * frac)
        return jnp.where(t < warmup, warm, after)

    return schedule


def _decays(path, _) -> bool:
    """Weight decay applies to matrices, not to norm scales (matched by name: scanned norm
    scales are 2-D, so ndim alone cannot tell)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    return "scale" not in names and not any(str(n).endswith("norm") for n in names)


def make_optimizer(lr_schedule: optax.Schedule, weight_decay: float = 0.1, b1: float = 0.9,
                   b2: float = 0.95, clip_norm: float | None = 1.0,
                   eps: float = 1e-8) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; the learning rate used is kept in the state for logging."""
    return optax.chain(
        optax.clip_by_global_norm(clip_norm) if clip_norm else optax.identity(),
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(
            weight_decay, mask=lambda p: jax.tree_util.tree_map_with_path(_decays, p)),
        optax.inject_hyperparams(optax.scale_by_learning_rate)(learning_rate=lr_schedule),
    )


def current_lr(opt_state) -> jax.Array:
    """Learning rate of the last update made with a make_optimizer() optimizer."""
    return opt_state[-1].hyperparams["learning_rate"]


# --------------------------------------------------------------------------- loss

def _features(batch: Batch, model: nn.Module) -> dict:
    """The batch's model inputs besides the tokens. A causal-only attention (splash,
    causal_blocks) gets no prefix: the run config allows it for causal objectives alone, whose
    prefix is all 0."""
    out = {"segment_ids": batch["segment_ids"], "positions": batch["positions"]}
    if getattr(getattr(model, "cfg", None), "attention_impl", "") not in CAUSAL_ONLY:
        out["prefix"] = batch["prefix"]
    return out


def _fused(model: nn.Module) -> bool:
    cfg = getattr(model, "cfg", None)
    return getattr(cfg, "loss_impl", "logits") == "fused"


def _projected(params, model: nn.Module, batch: Batch, a_BxL: jax.Array, b_BxL: jax.Array):
    """(objective, nll_BxL, lse_BxL) through the fused output projection and loss."""
    cfg = cast(Any, model).cfg
    hidden_BxLxD = cast(jax.Array, model.apply({"params": params}, batch["inputs"],
                                               hidden=True, **_features(batch, model)))
    return loss_lib.projected_nll(hidden_BxLxD, output_matrix(cfg, params), batch["targets"],
                                  a_BxL, b_BxL, tied=cfg.tied_embeddings,
                                  dtype=cfg.compute_dtype)


def token_nll(params, model: nn.Module, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(nll_BxL, logsumexp_BxL) of every position, in float32, differentiable: through the full
    logits whatever ``loss_impl`` says (the fused path's gradient exists only for the summed
    objective of `loss_sums`)."""
    logits_BxLxV = cast(jax.Array, model.apply(
        {"params": params}, batch["inputs"], **_features(batch, model))).astype(jnp.float32)
    lse_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_BxL = jnp.take_along_axis(logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    return lse_BxL - target_BxL, lse_BxL


def loss_sums(params, model: nn.Module, batch: Batch, num_domains: int, z_loss: float = 0.0,
              reference: tuple[nn.Module, Any] | None = None):
    """(objective, aux): weighted sums, not means, so microbatches add up to the full batch
    exactly; aux holds loss_sum, tokens, per-domain domain_loss_sum / domain_tokens
    ([num_domains]) and z_loss_sum.

    A batch may carry ``token_weights`` [B, L] (loss-reweighting methods such as DoReMi): the
    objective's loss term becomes Σ token_weights·loss_weights·nll while every aux sum stays
    unweighted, so logs and mixing controllers read the same losses with or without it.
    ``reference`` = (model, params) of a fixed model run without gradients in the same pass:
    aux["domain_excess_sum"] is then the per-domain Σ max(nll - reference nll, 0).
    """
    w_BxL = batch["loss_weights"].astype(jnp.float32)
    domains = batch["domain_ids"].reshape(-1)
    tw_BxL = (w_BxL * batch["token_weights"].astype(jnp.float32) if "token_weights" in batch
              else w_BxL)
    fused = _fused(model)
    if fused:  # the objective and its gradient come from the fused projection
        objective, nll_BxL, lse_BxL = _projected(params, model, batch, tw_BxL, z_loss * w_BxL)
    else:
        nll_BxL, lse_BxL = token_nll(params, model, batch)
    aux = {
        "loss_sum": jnp.sum(nll_BxL * w_BxL),
        "tokens": jnp.sum(w_BxL),
        "domain_loss_sum": jax.ops.segment_sum((nll_BxL * w_BxL).reshape(-1), domains,
                                               num_segments=num_domains),
        "domain_tokens": jax.ops.segment_sum(w_BxL.reshape(-1), domains,
                                             num_segments=num_domains),
        "z_loss_sum": jnp.sum(jnp.square(lse_BxL) * w_BxL),
    }
    if reference is not None:
        ref_model, ref_params = reference
        ref_nll_BxL, _ = token_nll(jax.lax.stop_gradient(ref_params), ref_model, batch)
        excess_BxL = jnp.maximum(jax.lax.stop_gradient(nll_BxL) - ref_nll_BxL, 0.0)
        aux["domain_excess_sum"] = jax.ops.segment_sum((excess_BxL * w_BxL).reshape(-1),
                                                       domains, num_segments=num_domains)
    if not fused:
        objective = jnp.sum(nll_BxL * tw_BxL) + z_loss * aux["z_loss_sum"]
    return objective, aux


def loss_fn(params, model: nn.Module, batch: Batch, num_domains: int, z_loss: float = 0.0):
    """(mean token cross-entropy over weighted tokens [+ z-loss], aux sums for per-domain logs)."""
    objective, aux = loss_sums(params, model, batch, num_domains, z_loss)
    return objective / jnp.maximum(aux["tokens"], 1.0), aux


# --------------------------------------------------------------------------- steps

def _split_microbatches(batch: Batch, accum_steps: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [accum, B/accum, ...], microbatch i = rows i, i+accum, ... so each one is
    spread over the same devices as the full batch."""
    def split(x):
        b = x.shape[0]
        if b % accum_steps:
            raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
        x = x.reshape((b // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
        spec = jax.sharding.PartitionSpec(None, shd.BATCH_AXES)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
    return jax.tree_util.tree_map(split, batch)


def _gradients(params, model, batch, num_domains, z_loss, accum_steps, mesh, reference=None):
    """Gradient of the summed objective and aux sums, accumulated over microbatches (which
    split every per-token feature, token_weights included, like the rest of the batch)."""
    grad_fn = jax.grad(lambda p, b: loss_sums(p, model, b, num_domains, z_loss, reference),
                       has_aux=True)
    if accum_steps == 1:
        return grad_fn(params, batch)
    micro = _split_microbatches(batch, accum_steps, mesh)

    def body(carry, mb):
        return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, mb)), None

    shapes = jax.eval_shape(grad_fn, params, jax.tree_util.tree_map(lambda x: x[0], micro))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, aux), _ = jax.lax.scan(body, zeros, micro)
    return grads, aux


class OnMesh:
    """Calls (and so traces) a jitted function with the mesh and logical rules active;
    ``jitted`` is the function itself, for ``.lower()`` in benchmarks and scale checks."""

    def __init__(self, jitted: Any, mesh: Mesh):  # a jax.jit-wrapped function (has .lower)
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with shd.activate(self.mesh):
            return self.jitted(*args)


def gradients(params, batch: Batch, *, model: nn.Module, num_domains: int, z_loss: float = 0.0,
              accum_steps: int = 1, mesh: Mesh | None = None, reference_params: Any = None,
              reference_model: nn.Module | None = None) -> tuple[Any, dict]:
    """The first half of `update`: the gradient of the summed objective and the aux sums
    (`loss_sums`), accumulated over ``accum_steps`` microbatches; `apply_gradients` is the
    second half. A swarm on CPU maps this half over its members one at a time and vmaps the
    other, elementwise one over all of them at once."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    if accum_steps > 1 and mesh is None:
        raise ValueError("gradient accumulation needs the mesh its microbatches are spread over")
    reference = (None if reference_params is None
                 else (model if reference_model is None else reference_model, reference_params))
    return _gradients(params, model, batch, num_domains, z_loss, accum_steps, mesh, reference)


def apply_gradients(state: TrainState, grads, aux: dict, *,
                    optimizer: optax.GradientTransformation, z_loss: float = 0.0,
                    alive: jax.Array | None = None) -> tuple[TrainState, dict]:
    """The second half of `update`: normalise the summed gradient by the token count, step
    the optimizer, and report the metrics (with the freeze mask when ``alive`` is given, and
    the z-loss when ``z_loss`` is on)."""
    denom = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = {
        "loss": aux["loss_sum"] / denom,
        "tokens": aux["tokens"],
        "domain_loss_sum": aux["domain_loss_sum"],
        "domain_tokens": aux["domain_tokens"],
        "grad_norm": optax.global_norm(grads),
        "lr": current_lr(opt_state),
    }
    if z_loss:
        metrics["z_loss"] = aux["z_loss_sum"] / denom
    if "domain_excess_sum" in aux:
        metrics["domain_excess_sum"] = aux["domain_excess_sum"]
    if alive is None:
        params = optax.apply_updates(state.params, updates)
    else:
        ok = (alive & jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
              & jnp.isfinite(optax.global_norm(updates)))
        params = jax.tree_util.tree_map(
            lambda p, u: (p + jnp.where(ok, u, 0)).astype(p.dtype), state.params, updates)
        metrics["alive"] = ok
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def update(state: TrainState, batch: Batch, *, model: nn.Module,
           optimizer: optax.GradientTransformation, num_domains: int, z_loss: float = 0.0,
           accum_steps: int = 1, mesh: Mesh | None = None, alive: jax.Array | None = None,
           reference_params: Any = None, reference_model: nn.Module | None = None
           ) -> tuple[TrainState, dict]:
    """One optimizer update; pure, so it can be jitted (a run) or vmapped (a swarm):
    `gradients`, then `apply_gradients`.

    metrics: loss (mean over weighted tokens, without z-loss), tokens, domain_loss_sum and
    domain_tokens ([num_domains]), grad_norm (before clipping), lr (of this update), z_loss.

    The gradient is that of Σ token_weights·nll / Σ loss_weights when the batch carries
    ``token_weights`` (see ``loss_sums``): the normaliser stays the token count, so weights of 1
    are today's update. ``reference_params`` (of ``reference_model``, default ``model``) adds
    metrics["domain_excess_sum"], the reference's loss computed in the same compiled step.

    ``alive`` (a swarm member's flag) turns on the freeze mask: the update is applied only if
    the member is alive and its loss, gradient and update are finite (an update whose squared
    norm overflows would make the next loss non-finite); metrics["alive"] says whether it was.
    The mask is one select fused into the parameter update; a frozen member's optimizer moments
    are left as the update made them (never read again: a frozen member never un-freezes).
    """
    grads, aux = gradients(state.params, batch, model=model, num_domains=num_domains,
                           z_loss=z_loss, accum_steps=accum_steps, mesh=mesh,
                           reference_params=reference_params, reference_model=reference_model)
    return apply_gradients(state, grads, aux, optimizer=optimizer, z_loss=z_loss, alive=alive)


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                    state_shardings: TrainState, num_domains: int, z_loss: float = 0.0,
                    accum_steps: int = 1, reference_model: nn.Module | None = None,
                    reference_shardings: Any = None) -> OnMesh:
    """`update` jitted: (state, batch) -> (state, metrics), state donated and sharded.

    With ``reference_shardings`` (the parameter shardings of ``reference_model``, default
    ``model``) the step takes a third argument, ``reference_params``, run forward without
    gradients in the same compiled step (metrics["domain_excess_sum"]).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    one = functools.partial(update, model=model, optimizer=optimizer, num_domains=num_domains,
                            z_loss=z_loss, accum_steps=accum_steps, mesh=mesh)
    out_shardings = (state_shardings, shd.replicated(mesh))
    if reference_shardings is None:
        def train_step(state: TrainState, batch: Batch):
            return one(state, batch)

        jitted = jax.jit(train_step, in_shardings=(state_shardings, shd.batch_sharding(mesh)),
                         out_shardings=out_shardings, donate_argnums=0)
        return OnMesh(jitted, mesh)

    def reference_step(state: TrainState, batch: Batch, reference_params):
        return one(state, batch, reference_params=reference_params,
                   reference_model=reference_model)

    jitted = jax.jit(reference_step, in_shardings=(state_shardings, shd.batch_sharding(mesh),
                                                   reference_shardings),
                     out_shardings=out_shardings, donate_argnums=0)
    return OnMesh(jitted, mesh)


def make_eval_step(model: nn.Module, mesh: Mesh, num_domains: int,
                   param_shardings: Any = None) -> OnMesh:
    """jit'ed (params, batch) -> {domain_loss_sum, domain_tokens, loss_sum, tokens}."""
    def eval_step(params, batch):
        _, aux = loss_sums(params, model, batch, num_domains, 0.0)
        return {k: aux[k] for k in ("domain_loss_sum", "domain_tokens", "loss_sum", "tokens")}

    jitted = jax.jit(eval_step, in_shardings=(param_shardings, shd.batch_sharding(mesh)),
                     out_shardings=shd.replicated(mesh))
    return OnMesh(jitted, mesh)


def _boxed_init_fn(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int):
    """rng -> TrainState whose params (and optimizer moments) keep their logical-axis boxes."""
    def boxed_init(rng):
        # Parameters do not depend on the batch size: a 1-row dummy keeps init small.
        params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params))
    return boxed_init


def _unbox(tree):
    return jax.tree_util.tree_map(lambda x: x.value if isinstance(x, nn.Partitioned) else x,
                                  tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                   seq_len: int) -> tuple[TrainState, TrainState]:
    """(ShapeDtypeStruct tree of the state with shardings, the shardings), allocating nothing:
    what a checkpoint restore into the sharded layout needs."""
    boxed = jax.eval_shape(_boxed_init_fn(model, optimizer, seq_len), jax.random.key(0))
    shardings = shd.logical_shardings(boxed, mesh)
    shapes = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), _unbox(boxed),
        shardings)
    return shapes, shardings


def init_state(model: nn.Module, optimizer: optax.GradientTransformation, rng: jax.Array,
               mesh: Mesh, seq_len: int, batch_size: int) -> tuple[TrainState, TrainState]:
    """(state, state_shardings), every array created directly in its sharded layout."""
    del batch_size  # kept in the signature for callers; parameters do not depend on it
    boxed_init = _boxed_init_fn(model, optimizer, seq_len)
    _, shardings = abstract_state(model, optimizer, mesh, seq_len)
    init = jax.jit(lambda r: _unbox(boxed_init(r)), out_shardings=shardings)
    return init(rng), shardings
