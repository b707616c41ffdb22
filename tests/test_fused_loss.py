"""The fused output projection + cross-entropy (loam.model.loss) computes today's loss and gradient.

Checked against the full-logits path on bundled-corpus batches: the per-token losses, the
objective with z-loss and per-token weights, the gradients of every parameter, tied and untied,
float32 and bfloat16, in chunks and whole; and the train step itself over several updates, alone,
with gradient accumulation, and vmapped as a swarm runs it.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numerics
import numpy as np
import pytest
from numerics import small_config

from loam import run as run_lib
from loam import step as st
from loam.configs import default
from loam.model import loss as loss_lib
from loam.model.transformer import Transformer


@pytest.fixture(scope="module")
def batches():
    """Four real batches (8 x 64 tokens, five domains) from the bundled corpus."""
    config = default.get_config("size=nano,steps=10,seq_len=64,batch_size=8")
    stream = run_lib.build_stream(config)
    out = [{k: jnp.asarray(v) for k, v in stream.batch(s).items()} for s in range(4)]
    vocab = run_lib.model_config(config).vocab_size
    return out, vocab


def _reference(x, w, targets, a, b, tied):
    """The unfused definition: full float32 logits, then the loss."""
    logits = x @ (w.T if tied else w)
    lse = jax.nn.logsumexp(logits, axis=-1)
    nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(a * nll) + jnp.sum(b * lse ** 2), nll, lse


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 16, 64])
def test_projected_nll_matches_full_logits_values_and_gradients(tied, chunk):
    rng = np.random.default_rng(0)
    rows, length, d, vocab = 3, 64, 32, 97
    x = jnp.asarray(rng.normal(size=(rows, length, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(vocab, d) if tied else (d, vocab)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (rows, length)), jnp.int32)
    a = jnp.asarray(rng.uniform(0, 2, (rows, length)), jnp.float32).at[0, :7].set(0.0)
    b = jnp.asarray(rng.uniform(0, 1e-2, (rows, length)), jnp.float32)

    got = loss_lib.projected_nll(x, w, targets, a, b, tied=tied, chunk=chunk)
    want = _reference(x, w, targets, a, b, tied)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=2e-6, atol=2e-5)

    def fused(x, w):
        return loss_lib.projected_nll(x, w, targets, a, b, tied=tied, chunk=chunk)[0]

    gx, gw = jax.grad(fused, argnums=(0, 1))(x, w)
    ex, ew = jax.grad(lambda x, w: _reference(x, w, targets, a, b, tied)[0], argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, ex, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, ew, rtol=1e-5, atol=1e-5)
    # A cotangent other than 1 scales the gradient (the step divides by the token count).
    gx2 = jax.grad(lambda x: 0.25 * fused(x, w))(x)
    np.testing.assert_allclose(gx2, 0.25 * ex, rtol=1e-5, atol=1e-5)


def test_projected_nll_refuses_a_chunk_that_does_not_divide_the_length():
    x = jnp.zeros((2, 10, 4))
    with pytest.raises(ValueError, match="must divide the sequence length 10"):
        loss_lib.projected_nll(x, jnp.zeros((4, 7)), jnp.zeros((2, 10), jnp.int32),
                               jnp.ones((2, 10)), jnp.zeros((2, 10)), tied=False, chunk=3)


def test_chunk_length_is_the_largest_divisor_within_the_budget():
    assert loss_lib.chunk_length(16, 256, 16384, budget=16 * 2**20) == 16
    assert loss_lib.chunk_length(1, 256, 8192, budget=2**40) == 256
    assert loss_lib.chunk_length(4, 96, 1000, budget=4 * 1000 * 4 * 7) == 6  # 7 does not divide
    assert loss_lib.chunk_length(64, 5, 10**6, budget=1) == 1


@pytest.mark.parametrize("tied,dtype", [(True, "float32"), (False, "float32"),
                                        (True, "bfloat16")])
def test_loss_sums_and_gradients_equal_the_full_logits_path(batches, tied, dtype):
    data, vocab = batches
    batch = dict(data[0])
    batch["token_weights"] = jnp.asarray(
        np.random.default_rng(1).uniform(0.5, 1.5, batch["targets"].shape), jnp.float32)
    logits_model, fused_model = (
        Transformer(small_config(vocab, tied_embeddings=tied, dtype=dtype, loss_impl=impl))
        for impl in ("logits", "fused"))
    params = nn.meta.unbox(logits_model.init(jax.random.key(0), batch["inputs"])["params"])

    def grads(model):
        return jax.jit(jax.grad(lambda p: st.loss_sums(p, model, batch, 5, 1e-3),
                                has_aux=True))(params)

    (g_ref, aux_ref), (g_fused, aux_fused) = grads(logits_model), grads(fused_model)
    tol = 1e-5 if dtype == "float32" else 2e-2  # bfloat16: the matmul operands are rounded
    for k in aux_ref:
        np.testing.assert_allclose(aux_fused[k], aux_ref[k], rtol=1e-5 if dtype == "float32"
                                   else 1e-3)
    for (path, r), f in zip(jax.tree_util.tree_leaves_with_path(g_ref),
                            jax.tree_util.tree_leaves(g_fused), strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert float(jnp.max(jnp.abs(f - r))) <= tol * scale, jax.tree_util.keystr(path)
    assert "unembed" in params or tied


def test_train_steps_equal_the_full_logits_step_alone_and_accumulated(batches):
    data, vocab = batches
    ref, ref_state = numerics.train(Transformer(small_config(vocab, loss_impl="logits")), data)
    for accum in (1, 2):
        got, state = numerics.train(Transformer(small_config(vocab, loss_impl="fused")), data,
                                    accum)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)
        # Adam divides by the gradient's own scale, so where a gradient is near zero (an
        # embedding row barely used) rounding-level differences move the weight by a few percent
        # of one update: compare the weights at 5% of the largest possible movement (4 x 3e-3),
        # and nearly all of them far tighter.
        for g, r in zip(jax.tree_util.tree_leaves(state.params),
                        jax.tree_util.tree_leaves(ref_state.params)):
            np.testing.assert_allclose(g, r, rtol=0, atol=6e-4)
            assert np.mean(np.abs(np.asarray(g) - np.asarray(r)) <= 1e-5) > 0.999
    assert ref[1] > ref[-1]  # it trained


def test_vmapped_update_equals_the_full_logits_update(batches):
    """A swarm vmaps the update over members: the custom VJP batches like the plain path."""
    data, vocab = batches
    out = {impl: numerics.vmapped_update(Transformer(small_config(vocab, loss_impl=impl)),
                                         data) for impl in ("logits", "fused")}
    (s_ref, m_ref), (s_fused, m_fused) = out["logits"], out["fused"]
    np.testing.assert_allclose(m_fused["loss"], m_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_fused["grad_norm"], m_ref["grad_norm"], rtol=1e-4)
    for g, r in zip(jax.tree_util.tree_leaves(s_fused.params),
                    jax.tree_util.tree_leaves(s_ref.params)):  # Adam's first step: see above
        np.testing.assert_allclose(g, r, rtol=0, atol=5e-4)
        assert np.mean(np.abs(np.asarray(g) - np.asarray(r)) <= 1e-5) > 0.999
