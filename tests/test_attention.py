"""The attention core with its own VJP (loam.model.attention) computes the plain path's numbers,
and so does a layer that keeps only its matmuls' outputs for the backward pass (residuals="dots").

Checked against the einsum/softmax path under autodiff: outputs and the gradients of queries,
keys and values on random inputs with packed segments, padding, bidirectional prefixes and
grouped-query heads; then whole models on bundled-corpus batches (causal and prefix-LM): the loss,
every parameter's gradient, four train steps, the vmapped update a swarm runs, and decoding with a
cache. The splash kernel (TPU's fused causal attention, run here by Pallas's interpreter) the same
way, on causal batches, and on an 8-device mesh where it runs per device under shard_map.
"""


import re

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
from loam.model import attention as attn
from loam.model import sharding as shd
from loam.model.transformer import Transformer, attention_mask, init_cache


def _inputs(b, length, h, g, k, prefix, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q, kk, v = (jnp.asarray(rng.normal(size=s), dtype) for s in
                [(b, length, h, k), (b, length, g, k), (b, length, g, k)])
    # Packed rows: segments of random lengths, then padding (segment 0) at the end.
    seg = np.zeros((b, length), np.int32)
    for row in range(b):
        cuts = np.sort(rng.choice(np.arange(1, length - 2), 2, replace=False))
        seg[row, :cuts[0]], seg[row, cuts[0]:cuts[1]] = 1, 2
        seg[row, cuts[1]:length - 3] = 3
    pre = np.zeros((b, length), np.int32)
    if prefix:
        pre[:, :5] = 1  # a bidirectional prefix at the start of the first segment
    mask = attention_mask(jnp.asarray(seg), jnp.asarray(pre))
    real = jnp.asarray(seg != 0)[:, :, None, None]
    # The loss gives padding rows no cotangent (weight 0, and nothing attends to them).
    do = jnp.where(real, jnp.asarray(rng.normal(size=(b, length, h, k)), dtype), 0)
    return q, kk, v, mask, do, real, jnp.asarray(seg)


@pytest.mark.parametrize("h,g,prefix", [(4, 4, False), (4, 2, True), (6, 1, False),
                                        (8, 2, False)])
def test_attend_matches_the_autodiff_path(h, g, prefix):
    q, k, v, mask, do, real, _ = _inputs(3, 24, h, g, 8, prefix)
    out_ref, vjp_ref = jax.vjp(lambda *a: attn.attend_reference(*a, mask, jnp.float32), q, k, v)
    out, vjp = jax.vjp(lambda *a: attn.attend(*a, mask, jnp.float32), q, k, v)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, out_ref, 0), rtol=1e-5,
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.where(real, 0, out)))) == 0.0  # padding rows: zeros
    for got, want in zip(vjp(do), vjp_ref(do), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # and the gradients are not trivially zero
    assert all(float(jnp.max(jnp.abs(x))) > 0.1 for x in vjp(do))
    # a padding row passes no gradient back through its query
    dq = vjp(do)[0]
    assert float(jnp.max(jnp.abs(jnp.where(real, 0, dq)))) == 0.0


def _bfloat16_errors(fn, q, k, v, mask, do, real):
    """``fn`` (an attention core) run in bfloat16: its output and dq/dk/dv, and their errors
    relative to the float32 plain path's (the output over the real rows only)."""
    exact = jax.vjp(lambda *a: attn.attend_reference(*a, mask, jnp.float32), q, k, v)
    out, vjp = jax.vjp(lambda *a: fn(*a, mask, jnp.bfloat16),
                       *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    grads = vjp(do.astype(jnp.bfloat16))
    errors = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - r)) / jnp.max(jnp.abs(r)))
              for x, r in zip((jnp.where(real, out, 0), *grads),
                              (jnp.where(real, exact[0], 0), *exact[1](do)))]
    return out, grads, errors


def test_attend_in_bfloat16_is_as_close_to_float32_as_the_autodiff_path():
    """bfloat16 rounds the operands; the manual VJP must not add error beyond the plain path's."""
    q, k, v, mask, do, real, _ = _inputs(2, 32, 4, 2, 16, True)
    errors = {}
    for name, fn in (("reference", attn.attend_reference), ("manual", attn.attend)):
        out, grads, errors[name] = _bfloat16_errors(fn, q, k, v, mask, do, real)
        assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for got, ref in zip(errors["manual"], errors["reference"]):
        assert got <= 1.5 * ref + 2e-3, errors
        assert got < 3e-2, errors


@pytest.fixture(scope="module")
def batches():
    """Bundled-corpus batches (8 x 64 tokens, five domains): causal, and prefix-LM."""
    out = {}
    for objective in ("causal", "prefix_lm"):
        config = default.get_config("size=nano,steps=10,seq_len=64,batch_size=8")
        config.data.objective = objective
        stream = run_lib.build_stream(config)
        out[objective] = [{k: jnp.asarray(v) for k, v in stream.batch(s).items()}
                          for s in range(4)]
    assert int(jnp.sum(out["prefix_lm"][0]["prefix"])) > 0
    return out, run_lib.model_config(config).vocab_size


@pytest.mark.parametrize("objective,ref,new", [
    ("causal", {"attention_impl": "xla"}, {"attention_impl": "manual"}),
    ("prefix_lm", {"attention_impl": "xla"}, {"attention_impl": "manual"}),
    ("causal", {"residuals": "all"}, {"residuals": "dots"}),
    ("prefix_lm", {"residuals": "all", "attention_impl": "xla"},
     {"residuals": "dots", "attention_impl": "xla"}),
    ("causal", {"residuals": "all"}, {"remat": True}),
])
def test_model_loss_and_gradients_equal_the_plain_path(batches, objective, ref, new):
    data, vocab = batches
    _assert_same_loss_and_gradients(Transformer(small_config(vocab, **ref)),
                                    Transformer(small_config(vocab, **new)), data[objective][0])


def _assert_same_loss_and_gradients(ref_model, new_model, batch):
    """loss_sums' aux sums and every parameter's gradient (within 1e-5 of its scale) of two
    models from the same parameters."""
    params = nn.meta.unbox(ref_model.init(jax.random.key(0), batch["inputs"])["params"])

    def grads(model):
        return jax.jit(jax.grad(lambda p: st.loss_sums(p, model, batch, 5, 1e-3),
                                has_aux=True))(params)

    (g_ref, aux_ref), (g_new, aux_new) = grads(ref_model), grads(new_model)
    for key in aux_ref:
        np.testing.assert_allclose(aux_new[key], aux_ref[key], rtol=1e-5, atol=1e-6)
    for (path, r), m in zip(jax.tree_util.tree_leaves_with_path(g_ref),
                            jax.tree_util.tree_leaves(g_new), strict=True):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0, jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(m - r))) <= 1e-5 * scale, jax.tree_util.keystr(path)


def test_train_steps_equal_the_plain_path_steps(batches):
    data, vocab = batches
    ref, _ = numerics.train(Transformer(small_config(vocab, attention_impl="xla",
                                                     residuals="all")), data["causal"])
    got, _ = numerics.train(Transformer(small_config(vocab)), data["causal"])  # manual, dots
    np.testing.assert_allclose(got[1::2], ref[1::2], rtol=2e-5)  # the step losses
    assert ref[1] > ref[-1]  # it trained


def test_vmapped_update_equals_the_autodiff_attention_update(batches):
    """A swarm vmaps the update over members: the custom VJP batches like the plain path."""
    data, vocab = batches
    out = {impl: numerics.vmapped_update(Transformer(small_config(
        vocab, attention_impl=impl, residuals=residuals)), data["causal"])
        for impl, residuals in (("xla", "all"), ("manual", "dots"))}
    (_, m_ref), (_, m_man) = out["xla"], out["manual"]
    np.testing.assert_allclose(m_man["loss"], m_ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(m_man["grad_norm"], m_ref["grad_norm"], rtol=1e-4)


def test_decoding_with_a_cache_is_unchanged(batches):
    """The cache path (queries over S cache slots) and the full forward pass, both impls."""
    data, vocab = batches
    prompt = data["causal"][0]["inputs"][:2, :12]
    logits = {}
    for impl in ("xla", "manual"):
        cfg = small_config(vocab, attention_impl=impl, residuals="all" if impl == "xla" else "dots")
        model = Transformer(cfg)
        params = nn.meta.unbox(model.init(jax.random.key(0), prompt)["params"])
        cache = init_cache(cfg, 2, 16)
        first, cache = model.apply({"params": params}, prompt[:, :8], cache=cache)
        second, _ = model.apply({"params": params}, prompt[:, 8:], cache=cache)
        whole = model.apply({"params": params}, prompt)
        np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-4)
        logits[impl] = whole
    np.testing.assert_allclose(logits["manual"], logits["xla"], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- causal blocks

@pytest.mark.parametrize("h,g,block", [(4, 4, 8), (4, 2, 10), (3, 1, 5)])
def test_causal_blocks_match_the_autodiff_path(h, g, block):
    """Query blocks over the keys up to their end (the last block shorter when the block does
    not divide the length), causal within packed segments: outputs and dq/dk/dv."""
    q, k, v, mask, do, real, _ = _inputs(2, 24, h, g, 8, prefix=False)
    ref_out, ref_vjp = jax.vjp(lambda *a: attn.attend_reference(*a, mask, jnp.float32), q, k, v)
    out, vjp = jax.vjp(lambda *a: attn.attend_causal_blocks(*a, mask, jnp.float32, block),
                       q, k, v)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, ref_out, 0), rtol=1e-5,
                               atol=1e-6)
    for got, want in zip(vjp(do), ref_vjp(do), strict=True):
        assert float(jnp.max(jnp.abs(want))) > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_causal_blocks_model_equals_the_manual_path_and_refuses_a_prefix(batches):
    data, vocab = batches
    batch = data["causal"][0]
    _assert_same_loss_and_gradients(
        Transformer(small_config(vocab)),
        Transformer(small_config(vocab, attention_impl="causal_blocks", attention_block=16)),
        batch)
    model = Transformer(small_config(vocab, attention_impl="causal_blocks"))
    with pytest.raises(ValueError, match="'causal_blocks' is causal attention only .* without "
                                         "prefix"):
        model.init(jax.random.key(0), batch["inputs"], prefix=batch["prefix"])
    config = default.get_config("size=nano,steps=10,seq_len=64,batch_size=8")
    config.model.attention_impl, config.data.objective = "causal_blocks", "prefix_lm"
    with pytest.raises(run_lib.ConfigError, match="'causal_blocks' is causal attention only"):
        run_lib.resolve_config(config)
    with pytest.raises(ValueError, match="attention_block=0 must be >= 1"):
        small_config(vocab, attention_impl="causal_blocks", attention_block=0)


# --------------------------------------------------------------------------- splash (interpreted)

@pytest.mark.parametrize("h,g", [(4, 4), (4, 2), (3, 1)])
def test_splash_kernel_matches_the_autodiff_path(h, g):
    """Causal attention within packed segments over three 128-blocks (so blocks above the
    diagonal are skipped): outputs of real rows and dq/dk/dv, against the plain path."""
    q, k, v, mask, do, real, seg = _inputs(2, 384, h, g, 32, prefix=False)
    ref_out, ref_vjp = jax.vjp(lambda *a: attn.attend_reference(*a, mask, jnp.float32), q, k, v)
    out, vjp = jax.vjp(lambda *a: attn.attend_splash(*a, seg, jnp.float32), q, k, v)
    np.testing.assert_allclose(jnp.where(real, out, 0), jnp.where(real, ref_out, 0), atol=2e-5)
    for got, want in zip(vjp(do), ref_vjp(do), strict=True):
        np.testing.assert_allclose(got, want, atol=2e-5 * float(jnp.max(jnp.abs(want))))


@pytest.fixture(scope="module")
def causal_128():
    """Bundled-corpus causal batches of 8 x 128 tokens (the splash kernel's block is 128)."""
    config = default.get_config("size=nano,steps=10,seq_len=128,batch_size=8")
    stream = run_lib.build_stream(config)
    return stream, run_lib.model_config(config).vocab_size


def test_splash_model_loss_and_gradients_equal_the_manual_path(causal_128):
    stream, vocab = causal_128
    batch = {k: jnp.asarray(v) for k, v in stream.batch(0).items()}
    _assert_same_loss_and_gradients(
        Transformer(small_config(vocab, max_len=128)),
        Transformer(small_config(vocab, max_len=128, attention_impl="splash")), batch)


def test_splash_train_steps_on_an_8_device_mesh_equal_the_manual_path(causal_128):
    """Rows over data x fsdp and heads over tensor (2 x 2 x 2): the kernel runs per device. The
    causal blocks on the same mesh too."""
    stream, vocab = causal_128
    mesh = shd.make_mesh(2, 2, 2)
    losses = {}
    for impl in ("manual", "splash", "causal_blocks"):
        blocks = {"attention_block": 32} if impl == "causal_blocks" else {}  # 4 blocks
        model = Transformer(small_config(vocab, max_len=128, attention_impl=impl, **blocks))
        optimizer = st.make_optimizer(st.lr_schedule("cosine", 3e-3, 10, 1))
        state, shardings = st.init_state(model, optimizer, jax.random.key(0), mesh, 128, 8)
        step = st.make_train_step(model, optimizer, mesh, shardings, num_domains=5, z_loss=1e-4)
        losses[impl] = []
        for s in range(3):
            state, metrics = step(state, shd.shard_batch(stream.batch(s), mesh))
            losses[impl].append(float(metrics["loss"]))
    np.testing.assert_allclose(losses["splash"], losses["manual"], rtol=2e-5)
    np.testing.assert_allclose(losses["causal_blocks"], losses["manual"], rtol=2e-5)
    assert losses["manual"][0] > losses["manual"][-1]  # it trained


def test_splash_refuses_what_it_cannot_compute(causal_128):
    stream, vocab = causal_128
    batch = stream.batch(0)
    model = Transformer(small_config(vocab, max_len=128, attention_impl="splash"))
    with pytest.raises(ValueError, match="causal attention only .* without prefix"):
        model.init(jax.random.key(0), batch["inputs"], prefix=batch["prefix"])
    with pytest.raises(ValueError, match="sequence is 64 long: use a multiple of 128"):
        model.init(jax.random.key(0), batch["inputs"][:, :64])
    # The run config says so before anything runs: a prefix objective, a length it cannot tile.
    for override, needle in (("objective", "data.objective='prefix_lm' trains with a "
                                           "bidirectional prefix"),
                             ("seq_len", "data.seq_len=192: use a multiple of 128")):
        config = default.get_config("size=nano,steps=10,seq_len=128,batch_size=8")
        config.model.attention_impl = "splash"
        if override == "objective":
            config.data.objective = "prefix_lm"
        else:
            config.data.seq_len = 192
        with pytest.raises(run_lib.ConfigError, match=needle):
            run_lib.resolve_config(config)


# --------------------------------------------------------------------------- cuDNN (GPU only)

@pytest.mark.parametrize("h,g,prefix", [(4, 2, True), (6, 1, False)])
def test_cudnn_call_is_as_close_to_float32_as_the_manual_path(h, g, prefix):
    """The cuDNN path's own call (mask with the padding rows seeing themselves, unit scale,
    grouped heads in [B, L, H, K]) computed by XLA, in bfloat16 (the kernel's compute type):
    the real rows and dq/dk/dv are as close to the float32 numbers as the manual path's, and
    the padding rows are finite. The kernel itself needs an NVIDIA GPU."""
    q, k, v, mask, do, real, _ = _inputs(2, 24, h, g, 16, prefix)
    errors = {}
    for name, fn in (("manual", attn.attend),
                     ("cudnn", lambda *a: attn.attend_cudnn(*a, implementation="xla"))):
        out, _, errors[name] = _bfloat16_errors(fn, q, k, v, mask, do, real)
        assert out.dtype == jnp.bfloat16
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    for got, ref in zip(errors["cudnn"], errors["manual"]):
        assert got <= 1.5 * ref + 2e-3, errors
        assert got < 3e-2, errors


def test_cudnn_refuses_float32_and_a_backend_without_cuda():
    with pytest.raises(ValueError, match="'cudnn' computes in bfloat16, but dtype='float32'"):
        small_config(64, attention_impl="cudnn")
    small_config(64, attention_impl="cudnn", dtype="bfloat16")  # accepted
    config = default.get_config("size=nano,steps=10,seq_len=32,batch_size=2")
    config.model.attention_impl, config.model.dtype = "cudnn", "bfloat16"
    with pytest.raises(run_lib.ConfigError, match="runs on an NVIDIA GPU, but JAX's backend "
                                                  "here is 'cpu'"):
        run_lib.resolve_config(config)


def test_cudnn_gradient_lowers_for_cuda_to_the_fused_kernels():
    """The training gradient of a model with attention_impl='cudnn', lowered for CUDA on this
    host (no GPU needed, but JAX's CUDA plugin and cuDNN: ``pip install 'jax[cuda12]'``):
    its attention is cuDNN's fused forward and backward kernels, with no [Q, S] softmax left
    to XLA."""
    pytest.importorskip("jax_cuda12_plugin", reason="lowering for CUDA needs JAX's CUDA plugin")
    model = Transformer(small_config(256, max_len=128, attention_impl="cudnn",
                                     dtype="bfloat16"))
    tokens = jax.ShapeDtypeStruct((2, 128), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)

    def loss(p, x):
        return jnp.mean(model.apply(p, x).astype(jnp.float32))
    text = jax.jit(jax.grad(loss)).trace(params, tokens).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = set(re.findall(r"__cudnn\$fmha\w+", text))
    assert {c for c in calls if c.endswith("Backward")} and {
        c for c in calls if not c.endswith("Backward")}, calls
    # The softmax over the [Q, S] = [128, 128] scores is inside the kernels, not in XLA.
    assert not re.search(r"exponential .*x128x128x", text)
