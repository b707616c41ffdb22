"""The sharded train step on a real 8-device CPU mesh gives the same numbers as on one device.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported).
"""

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from loam import step as st
from loam.model import sharding as shd
from loam.model.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                  max_len=32, tied_embeddings=False)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
STEPS = 4

needs_8 = pytest.mark.skipif(jax.device_count() < 8,
                             reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def _batches():
    rng = np.random.default_rng(0)
    b, length = 8, 32
    out = []
    for _ in range(2):
        seg = np.ones((b, length), np.int32)
        seg[:, 20:] = 2
        seg[::3, 28:] = 0  # some padding
        pos = np.where(seg == 2, np.arange(length) - 20, np.arange(length)).astype(np.int32)
        out.append(dict(
            inputs=rng.integers(0, 256, (b, length)).astype(np.int32),
            targets=rng.integers(0, 256, (b, length)).astype(np.int32),
            loss_weights=(seg > 0).astype(np.float32),
            segment_ids=seg, positions=pos * (seg > 0),
            prefix=np.zeros((b, length), np.int32),
            domain_ids=rng.integers(0, 5, (b, length)).astype(np.int32)))
    return out * (STEPS // 2)  # each batch seen twice, so the loss must go down


def _run(mesh):
    model = Transformer(CFG)
    opt = st.make_optimizer(st.lr_schedule("cosine", 3e-3, 10, 2))
    state, shardings = st.init_state(model, opt, jax.random.key(0), mesh, 32, 8)
    train_step = st.make_train_step(model, opt, mesh, shardings, num_domains=5)
    losses = []
    for batch in _batches():
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state, metrics


@pytest.fixture(scope="module")
def reference():
    return _run(shd.make_mesh(1, 1, 1, devices=jax.devices()[:1]))


@needs_8
@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_loss_is_mesh_independent(shape, reference):
    ref_losses, _, ref_metrics = reference
    losses, state, metrics = _run(shd.make_mesh(*shape))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(metrics["domain_loss_sum"], ref_metrics["domain_loss_sum"],
                               rtol=1e-5)
    assert losses[2] < losses[0] and losses[3] < losses[1]

    data, fsdp, tensor = shape
    query = state.params["layers"]["attn"]["query"]  # [layers, embed, heads, kv]
    assert query.sharding.spec == P(None, "fsdp", "tensor", None)
    assert query.addressable_shards[0].data.shape == (2, 64 // fsdp, 4 // tensor, 16)
    unembed = state.params["unembed"]  # [embed, vocab]
    assert unembed.sharding.spec == P("fsdp", "tensor")
    assert unembed.addressable_shards[0].data.shape == (64 // fsdp, 256 // tensor)
    # Adam moments follow their parameters.
    mu = state.opt_state[1].mu["layers"]["mlp"]["down"]
    assert mu.sharding.spec == P(None, "tensor", "fsdp")


@needs_8
def test_eval_step_matches_loss_fn_on_mesh():
    mesh = shd.make_mesh(2, 2, 2)
    model = Transformer(CFG)
    opt = st.make_optimizer(st.lr_schedule("constant", 1e-3, 10, 0))
    state, shardings = st.init_state(model, opt, jax.random.key(1), mesh, 32, 8)
    batch = _batches()[0]
    eval_step = st.make_eval_step(model, mesh, num_domains=5, param_shardings=shardings.params)
    out = jax.device_get(eval_step(state.params, shd.shard_batch(batch, mesh)))
    host_params = jax.device_get(state.params)
    loss, aux = jax.jit(lambda p, b: st.loss_fn(p, model, b, 5))(host_params, batch)
    np.testing.assert_allclose(out["domain_loss_sum"], aux["domain_loss_sum"], rtol=1e-5)
    np.testing.assert_allclose(out["domain_tokens"], aux["domain_tokens"])
    np.testing.assert_allclose(out["loss_sum"] / out["tokens"], loss, rtol=1e-5)


@needs_8
def test_make_mesh_sizes_and_errors():
    assert dict(shd.make_mesh(-1, 2, 1).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert dict(shd.make_mesh(1, -1, 2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert math.prod(shd.make_mesh().shape.values()) == 8
    with pytest.raises(ValueError, match="at most one -1"):
        shd.make_mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.make_mesh(4, 4, 1)
    with pytest.raises(ValueError, match="divide the device count"):
        shd.make_mesh(-1, 3, 1)


@needs_8
def test_undivisible_axes_stay_whole():
    """One kv head cannot be split over tensor=2: that dimension is replicated, not an error."""
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=1,
                      mlp_dim=128, max_len=32)
    mesh = shd.make_mesh(2, 2, 2)
    opt = st.make_optimizer(st.lr_schedule("constant", 1e-3, 10, 0))
    shapes, shardings = st.abstract_state(Transformer(cfg), opt, mesh, 32)
    assert shardings.params["layers"]["attn"]["key"].spec == P(None, "fsdp", None, None)
    assert shardings.params["layers"]["attn"]["query"].spec == P(None, "fsdp", "tensor", None)
    assert shapes.params["embedding"].shape == (256, 64)
