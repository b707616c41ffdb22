"""Helpers shared by the tests that compare two ways of computing the same step (the fused loss,
the attention core, the residual policy): a small model, a few real train steps, and the
vmapped update a swarm runs.

Imported as `import numerics` (pyproject.toml puts tests/ on pytest's `pythonpath`)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from loam import step as st
from loam.model.transformer import ModelConfig


def small_config(vocab: int, **overrides) -> ModelConfig:
    """2 layers of width 64, grouped-query heads (4 over 2), context 64, tied embeddings."""
    base = ModelConfig(vocab_size=vocab, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       mlp_dim=128, max_len=64, tied_embeddings=True)
    return dataclasses.replace(base, **overrides)


def train(model, data, accum_steps: int = 1):
    """One jitted train step per batch of ``data`` (8 x 64) on a 1-device mesh: the losses
    (per-domain sums, then the mean, for every step) and the final state."""
    optimizer = st.make_optimizer(st.lr_schedule("cosine", 3e-3, 10, 1))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1),
                             ("data", "fsdp", "tensor"))
    state, shardings = st.init_state(model, optimizer, jax.random.key(0), mesh, 64, 8)
    step = st.make_train_step(model, optimizer, mesh, shardings, num_domains=5, z_loss=1e-4,
                              accum_steps=accum_steps)
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(np.asarray(metrics["domain_loss_sum"]))
        losses.append(float(metrics["loss"]))
    return losses, state


def vmapped_update(model, batches):
    """The update vmapped over three members (one batch each), as a swarm runs it:
    (states, metrics) after one step."""
    optimizer = st.make_optimizer(st.lr_schedule("constant", 1e-2, 10, 0))

    def init(rng):
        params = nn.meta.unbox(model.init(rng, batches[0]["inputs"])["params"])
        return st.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                             opt_state=optimizer.init(params))

    states = jax.vmap(init)(jax.random.split(jax.random.key(0), 3))
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *batches[:3])
    update = jax.jit(jax.vmap(lambda s, b: st.update(
        s, b, model=model, optimizer=optimizer, num_domains=5, z_loss=1e-4)))
    return update(states, stacked)
