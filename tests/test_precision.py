"""Mixed precision: bfloat16 compute on float32 weights, optimizer state, logits and loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loam import run as run_lib
from loam import step as st
from loam.configs import default
from loam.model.transformer import ModelConfig, Transformer

F32 = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                  max_len=32, tied_embeddings=False)
BF16 = dataclasses.replace(F32, dtype="bfloat16")


def _batch(rows=8, length=32, vocab=256, seed=0):
    rng = np.random.default_rng(seed)
    # A repeating pattern with noise: a learnable, non-uniform next-token distribution.
    base = np.arange(length + 1) * 7 % 61
    tokens = (base[None] + rng.integers(0, 3, (rows, length + 1))) % vocab
    return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
            "loss_weights": np.ones((rows, length), np.float32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
            "prefix": np.zeros((rows, length), np.int32),
            "domain_ids": rng.integers(0, 3, (rows, length)).astype(np.int32)}


def _float_dtypes(tree):
    return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_compute_keeps_float32_state_logits_and_loss_close_to_float32():
    m32, m16 = Transformer(F32), Transformer(BF16)
    optimizer = st.make_optimizer(st.lr_schedule("constant", 1e-2, 10, 0))
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}

    @jax.jit  # init and both updates (the function the trainer jits): one compile
    def both(rng, batch):
        # One float32 initial state serves both models: parameters are stored in param_dtype.
        params = nn.meta.unbox(m16.init(rng, batch["inputs"])["params"])
        state = st.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=optimizer.init(params))
        out = {"init": state}
        for name, model in (("f32", m32), ("bf16", m16)):
            out[name] = st.update(state, batch, model=model, optimizer=optimizer,
                                  num_domains=3, z_loss=1e-4)
        return out

    out = jax.device_get(both(jax.random.key(0), batch))
    state = out["init"]
    (state32, metrics32), (state16, metrics16) = out["f32"], out["bf16"]
    # Master weights and Adam's moments stay float32 after an update from bfloat16 compute.
    assert _float_dtypes(state16.params) == {"float32"}
    assert _float_dtypes(state16.opt_state) == {"float32"}
    for a, b in zip(jax.tree_util.tree_leaves(state16), jax.tree_util.tree_leaves(state32)):
        assert a.shape == b.shape and a.dtype == b.dtype
    # The matmuls do run in bfloat16 (the policy is not a no-op); the logits come out float32.
    def forward(model):
        return lambda p: model.apply({"params": p}, batch["inputs"])

    assert "bf16" in str(jax.make_jaxpr(forward(m16))(state.params))
    assert "bf16" not in str(jax.make_jaxpr(forward(m32))(state.params))
    assert jax.eval_shape(forward(m16), state.params).dtype == jnp.float32
    for key in ("loss", "domain_loss_sum", "z_loss", "grad_norm"):
        assert metrics16[key].dtype == np.float32, key
    # Same batch, same weights: the bfloat16 step's loss within bfloat16's ~3 significant
    # digits of the float32 one (and not identical to it), its gradient norm close too.
    assert metrics16["loss"] != metrics32["loss"]
    assert abs(metrics16["loss"] - metrics32["loss"]) < 1e-2 * metrics32["loss"]
    assert abs(metrics16["grad_norm"] - metrics32["grad_norm"]) < 5e-2 * metrics32["grad_norm"]
    # The updates agree to bfloat16 precision: the same step, not a different one.
    moved32 = state32.params["embedding"] - state.params["embedding"]
    moved16 = state16.params["embedding"] - state.params["embedding"]
    assert np.corrcoef(np.ravel(moved32), np.ravel(moved16))[0, 1] > 0.9


def test_config_chooses_the_compute_type_and_refuses_unknown_ones():
    config = default.get_config("runlocal")
    assert run_lib.model_config(config).dtype == "float32"  # the default stays float32
    config.model.dtype = "bfloat16"
    cfg = run_lib.model_config(config)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert cfg.compute_dtype == jnp.bfloat16 and cfg.weight_dtype == jnp.float32
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="dtype='float16'.*float32, bfloat16"):
        run_lib.model_config(config)
