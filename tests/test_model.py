"""Transformer, sizes, counts and the train step on one device."""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loam import step as st
from loam.data import corpora, vocab
from loam.model import sharding as shd
from loam.model import sizes
from loam.model.transformer import ModelConfig, Transformer

SMALL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, mlp_dim=64, max_len=64)


def _init(cfg, length=16, seed=0):
    model = Transformer(cfg)
    init = jax.jit(lambda r: st._unbox(model.init(r, jnp.zeros((1, length), jnp.int32))["params"]))
    return model, init(jax.random.key(seed))


@functools.cache
def _jitted_apply(model):
    return jax.jit(lambda p, x, s, q, f: model.apply({"params": p}, x, segment_ids=s,
                                                      positions=q, prefix=f))


def _logits(model, params, inputs, segment_ids=None, positions=None, prefix=None):
    n = len(inputs)

    def row(x, default):
        return jnp.asarray(np.asarray(default if x is None else x, np.int32)[None])

    out = _jitted_apply(model)(params, row(inputs, None), row(segment_ids, np.ones(n)),
                               row(positions, np.arange(n)), row(prefix, np.zeros(n)))
    return np.asarray(out)[0]


def pack(docs, length, rows, domain_of=None):
    """Hand-pack token lists into [rows, length] batch features (next-token prediction)."""
    feats = {k: np.zeros((rows, length), np.int32) for k in
             ("inputs", "targets", "segment_ids", "positions", "prefix", "domain_ids")}
    feats["loss_weights"] = np.zeros((rows, length), np.float32)
    feats["doc_ids"] = -np.ones((rows, length), np.int32)
    row, col, seg = 0, 0, 0
    for i, toks in enumerate(docs):
        toks = list(toks)[: length]
        if col + len(toks) > length:
            row, col, seg = row + 1, 0, 0
        if row == rows:
            break
        seg += 1
        n = len(toks)
        sl = slice(col, col + n)
        feats["targets"][row, sl] = toks
        feats["inputs"][row, sl] = [0] + toks[:-1]
        feats["segment_ids"][row, sl] = seg
        feats["positions"][row, sl] = np.arange(n)
        feats["loss_weights"][row, sl] = 1.0
        feats["domain_ids"][row, sl] = 0 if domain_of is None else domain_of[i]
        feats["doc_ids"][row, sl] = i
        col += n
    return feats


def _real_docs(n_per_domain, max_tokens):
    voc = vocab.default_vocabulary()
    docs, domains = [], []
    for d, name in enumerate(corpora.DOMAIN_NAMES[:2]):
        texts = [t for _, t in itertools.islice(corpora.read_documents(corpora.corpus_path(name)),
                                                n_per_domain)]
        for toks in voc.encode(texts):
            docs.append((toks + [vocab.EOS_ID])[:max_tokens])
            domains.append(d)
    return docs, domains


# ----------------------------------------------------------------------------- counts

COUNT_CASES = [
    sizes.get_size("nano", 512),
    sizes.get_size("nano", 512, tied_embeddings=False),
    dataclasses.replace(SMALL, n_kv_heads=2),
    dataclasses.replace(SMALL, n_kv_heads=1, tied_embeddings=False, head_dim=12),
    sizes.get_size("peer-a", 16384),
    sizes.get_size("1b", 32000, tied_embeddings=False),
]


def _count_case_id(c):
    return f"d{c.d_model}_kv{c.n_kv_heads}_t{int(c.tied_embeddings)}"


@pytest.mark.parametrize("cfg", COUNT_CASES, ids=_count_case_id)
def test_param_count_matches_initialised_tree(cfg):
    tree = jax.eval_shape(lambda r: st._unbox(Transformer(cfg).init(
        r, jnp.zeros((1, 8), jnp.int32))["params"]), jax.random.key(0))
    counted = sizes.count_params(cfg)
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    total = sum(math.prod(x.shape) for _, x in leaves)
    embedding = sum(math.prod(x.shape) for p, x in leaves
                    if p[0].key in ("embedding", "unembed"))
    assert counted["total"] == total
    assert counted["embedding"] == embedding
    assert counted["non_embedding"] == total - embedding


def test_named_sizes_land_where_named():
    def n(name):
        return sizes.count_params(sizes.get_size(name))["non_embedding"]

    assert 0.08e6 < n("nano") < 0.15e6
    assert 0.8e6 < n("tiny") < 1.3e6
    assert 3e6 <= n("mini") <= 5e6
    assert 9.5 < n("midi") / n("tiny") < 11
    assert 17e6 < n("small") < 23e6
    assert 0.9e9 < n("1b") < 1.1e9
    peer = sizes.get_size("peer-a", 16384)
    assert (peer.d_model, peer.n_layers, peer.n_heads, peer.max_len) == (384, 6, 6, 256)
    # SwiGLU matched to a GPT MLP of width 4d: 3 * d * mlp_dim == 2 * d * 4d.
    assert 3 * peer.mlp_dim == 2 * 4 * peer.d_model
    # = a bias-free GPT-2-style model of that shape, position table excluded (nanoGPT's count).
    gpt = 6 * (12 * 384 ** 2 + 2 * 384) + 384 + 16384 * 384
    assert sizes.count_params(peer)["total"] == gpt == 16_913_280
    with pytest.raises(ValueError, match="unknown model size"):
        sizes.get_size("huge")


@pytest.mark.parametrize("target", [1e5, 3e5, 1e6, 5e6, 2e7, 1e8, 1e9])
def test_pick_size_hits_target(target):
    cfg = sizes.pick_size(target, 8192)
    n = sizes.count_params(cfg)["non_embedding"]
    assert abs(n / target - 1) < 0.03, (cfg, n)
    assert cfg.d_model % cfg.head_dim == 0 and cfg.head_dim <= 64 and cfg.mlp_dim % 8 == 0
    assert 32 <= cfg.d_model / cfg.n_layers <= 256
    if cfg.d_model >= 256:
        assert cfg.d_model % 64 == 0


# One scanned layer: XLA's cost analysis counts a while-loop body once, whatever its trip count.
FLOP_CASES = [
    (sizes.get_size("nano", 512, n_layers=1), 64),
    (sizes.get_size("mini", 8192, n_layers=1), 256),
    (sizes.get_size("tiny", 1024, n_layers=1, n_kv_heads=2, tied_embeddings=False), 128),
]


@pytest.mark.parametrize("cfg,seq_len", FLOP_CASES, ids=["nano", "mini", "tiny-gqa-untied"])
def test_flops_per_token_matches_xla_cost_analysis(cfg, seq_len):
    """Model FLOPs vs XLA's count of the compiled step: XLA adds elementwise work (norms,
    softmax, optimizer), so the train step may exceed the matmul count by a few %, never
    fall short of it."""
    model, batch_size = Transformer(cfg), 2
    mesh = shd.make_mesh(1, 1, 1)
    opt = st.make_optimizer(st.lr_schedule("constant", 1e-3, 10, 0))
    shapes, shardings = st.abstract_state(model, opt, mesh, seq_len)
    z = np.zeros((batch_size, seq_len), np.int32)
    batch = dict(inputs=z, targets=z, loss_weights=z.astype(np.float32), segment_ids=z + 1,
                 positions=z, prefix=z, domain_ids=z)
    train_step = st.make_train_step(model, opt, mesh, shardings, num_domains=5)
    with shd.activate(mesh):
        xla_train = train_step.jitted.lower(shapes, batch).compile().cost_analysis()["flops"]
    xla_fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(
        shapes.params, z).compile().cost_analysis()["flops"]
    tokens = batch_size * seq_len
    train_ratio = xla_train / (sizes.flops_per_token(cfg, seq_len) * tokens)
    fwd_ratio = xla_fwd / (sizes.flops_per_token(cfg, seq_len, forward_only=True) * tokens)
    assert 1.0 <= train_ratio < 1.08, train_ratio
    assert 0.99 <= fwd_ratio < 1.04, fwd_ratio


# ----------------------------------------------------------------------------- attention

def test_layers_are_scanned_with_leading_axis():
    _, params = _init(SMALL)
    for leaf in jax.tree_util.tree_leaves(params["layers"]):
        assert leaf.shape[0] == SMALL.n_layers
    assert params["layers"]["attn"]["query"].shape == (2, 32, 4, 8)


def test_segments_do_not_see_each_other():
    model, params = _init(SMALL)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 64, 16)
    seg = [1] * 8 + [2] * 8
    pos = list(range(8)) * 2
    base = _logits(model, params, tokens, seg, pos)
    changed = tokens.copy()
    changed[8:] = rng.integers(3, 64, 8)
    other = _logits(model, params, changed, seg, pos)
    np.testing.assert_allclose(base[:8], other[:8], atol=1e-6)
    assert np.abs(base[8:] - other[8:]).max() > 1e-3


def test_causal_future_does_not_change_past():
    model, params = _init(SMALL)
    tokens = np.random.default_rng(1).integers(3, 64, 16)
    base = _logits(model, params, tokens)
    changed = tokens.copy()
    changed[10] = (tokens[10] + 7) % 64
    other = _logits(model, params, changed)
    np.testing.assert_allclose(base[:10], other[:10], atol=1e-6)
    assert np.abs(base[10] - other[10]).max() > 1e-3


def test_prefix_is_bidirectional():
    model, params = _init(SMALL)
    tokens = np.random.default_rng(2).integers(3, 64, 16)
    changed = tokens.copy()
    changed[2] = (tokens[2] + 5) % 64
    prefix = [1] * 4 + [0] * 12
    with_prefix = [_logits(model, params, t, prefix=prefix) for t in (tokens, changed)]
    without = [_logits(model, params, t) for t in (tokens, changed)]
    assert np.abs(with_prefix[0][0] - with_prefix[1][0]).max() > 1e-3
    np.testing.assert_allclose(without[0][0], without[1][0], atol=1e-6)
    # Beyond the prefix the model stays causal: changing a later non-prefix token is invisible.
    late = tokens.copy()
    late[12] = (tokens[12] + 3) % 64
    np.testing.assert_allclose(with_prefix[0][:12],
                               _logits(model, params, late, prefix=prefix)[:12], atol=1e-6)


def test_packed_segment_equals_alone():
    model, params = _init(SMALL)
    rng = np.random.default_rng(3)
    a, b = rng.integers(3, 64, 6), rng.integers(3, 64, 5)
    alone = _logits(model, params, np.r_[a, np.zeros(10, int)], [1] * 6 + [0] * 10,
                    list(range(6)) + [0] * 10)
    packed = _logits(model, params, np.r_[b, a, np.zeros(5, int)], [1] * 5 + [2] * 6 + [0] * 5,
                     list(range(5)) + list(range(6)) + [0] * 5)
    np.testing.assert_allclose(alone[:6], packed[5:11], atol=1e-5)


def test_gqa_runs_and_max_len_is_checked():
    cfg = dataclasses.replace(SMALL, n_kv_heads=2)
    model, params = _init(cfg)
    assert params["layers"]["attn"]["key"].shape == (2, 32, 2, 8)
    assert _logits(model, params, np.arange(16) % 64).shape == (16, 64)
    with pytest.raises(ValueError, match="max_len"):
        _logits(model, params, np.zeros(65, int))
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(SMALL, n_kv_heads=3)


# ----------------------------------------------------------------------------- loss and step

def _batch(docs, domains, length=64, rows=4):
    return pack(docs, length, rows, domains)


def test_loss_fn_domain_sums_add_up_and_weights_mask():
    docs = [list(np.random.default_rng(i).integers(3, 64, 20)) for i in range(8)]
    batch = _batch(docs, [i % 3 for i in range(8)])
    model, params = _init(SMALL)
    loss_fn = jax.jit(lambda p, b: st.loss_fn(p, model, b, 5))
    loss, aux = loss_fn(params, batch)
    assert float(aux["tokens"]) == batch["loss_weights"].sum()
    np.testing.assert_allclose(float(aux["domain_loss_sum"].sum()), float(aux["loss_sum"]),
                               rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(aux["loss_sum"] / aux["tokens"]), rtol=1e-6)
    assert aux["domain_tokens"].tolist()[3:] == [0.0, 0.0]
    # Changing a target where the weight is 0 changes nothing.
    batch2 = dict(batch)
    batch2["targets"] = np.where(batch["loss_weights"] > 0, batch["targets"], 7)
    loss2, _ = loss_fn(params, batch2)
    assert float(loss2) == float(loss)
    # Uniform logits give log(V) per token.
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)
    loss0, _ = loss_fn(zero, batch)
    np.testing.assert_allclose(float(loss0), math.log(64), rtol=1e-5)


def test_remat_gives_same_loss_and_grads():
    docs = [list(np.random.default_rng(i).integers(3, 64, 20)) for i in range(8)]
    batch = {k: jnp.asarray(v) for k, v in _batch(docs, [0] * 8).items()}
    model, params = _init(SMALL)
    remat_model = Transformer(dataclasses.replace(SMALL, remat=True))

    def grad(m):
        return jax.jit(jax.value_and_grad(lambda p: st.loss_fn(p, m, batch, 5)[0]))(params)

    (l1, g1), (l2, g2) = grad(model), grad(remat_model)
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_gradient_accumulation_equals_full_batch():
    rng = np.random.default_rng(5)
    docs = [list(rng.integers(3, 64, rng.integers(5, 30))) for _ in range(20)]
    batch = _batch(docs, [i % 5 for i in range(20)], length=32, rows=4)
    mesh = shd.make_mesh(1, 1, 1)
    model = Transformer(SMALL)
    opt = st.make_optimizer(st.lr_schedule("constant", 1e-2, 10, 0), clip_norm=None)
    results = []
    for accum in (1, 2):
        state, shardings = st.init_state(model, opt, jax.random.key(0), mesh, 32, 4)
        train_step = st.make_train_step(model, opt, mesh, shardings, 5, accum_steps=accum)
        state, metrics = train_step(state, batch)
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    for k in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5)
    np.testing.assert_allclose(m1["domain_loss_sum"], m2["domain_loss_sum"], rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_loss_decreases_on_real_tokens():
    docs, domains = _real_docs(12, 64)
    batch = pack(docs, 128, 8, domains)
    cfg = sizes.get_size("nano", vocab.VOCAB_SIZE, max_len=128)
    model = Transformer(cfg)
    mesh = shd.make_mesh(1, 1, 1)
    opt = st.make_optimizer(st.lr_schedule("cosine", 1e-2, 40, 5))
    state, shardings = st.init_state(model, opt, jax.random.key(0), mesh, 128, 8)
    train_step = st.make_train_step(model, opt, mesh, shardings, num_domains=5, z_loss=1e-4)
    losses = []
    for _ in range(40):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 40
    assert losses[0] > math.log(vocab.VOCAB_SIZE) - 1.0
    assert losses[-1] < losses[0] - 2.0, losses
    assert metrics["domain_tokens"][0] > 0 and metrics["domain_tokens"][1] > 0
    np.testing.assert_allclose(metrics["domain_loss_sum"].sum() / metrics["tokens"],
                               metrics["loss"], rtol=1e-5)


# ----------------------------------------------------------------------------- schedules, optimizer

def test_lr_schedules():
    cos = st.lr_schedule("cosine", 1.0, 100, 10, final_fraction=0.1)
    assert float(cos(0)) == pytest.approx(0.1)
    assert float(cos(9)) == pytest.approx(1.0)
    assert float(cos(10)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.55, abs=1e-6)
    assert float(cos(100)) == pytest.approx(0.1)
    wsd = st.lr_schedule("wsd", 1.0, 100, 10, final_fraction=0.0, decay_fraction=0.2)
    assert float(wsd(50)) == pytest.approx(1.0) and float(wsd(80)) == pytest.approx(1.0)
    assert float(wsd(90)) == pytest.approx(0.5) and float(wsd(100)) == pytest.approx(0.0)
    const = st.lr_schedule("constant", 2.0, 100, 0)
    assert float(const(0)) == float(const(99)) == 2.0
    with pytest.raises(ValueError, match="unknown schedule"):
        st.lr_schedule("linear", 1.0, 10, 0)


def test_weight_decay_skips_norm_scales():
    _, params = _init(SMALL)
    opt = st.make_optimizer(st.lr_schedule("constant", 1.0, 10, 0), weight_decay=0.5,
                            clip_norm=None)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = jax.jit(lambda g, p: opt.update(g, opt.init(p), p))(zero_grads, params)
    assert float(jnp.abs(updates["layers"]["attn_norm"]["scale"]).max()) == 0.0
    assert float(jnp.abs(updates["final_norm"]["scale"]).max()) == 0.0
    np.testing.assert_allclose(updates["layers"]["mlp"]["up"], -0.5 * params["layers"]["mlp"]["up"],
                               rtol=1e-6)
