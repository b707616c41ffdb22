"""Invariants of the pretraining objectives (pure numpy)."""

import numpy as np
import pytest

from loam.data import objectives as obj
from loam.data.vocab import EOS_ID, NUM_SENTINELS, VOCAB_SIZE, sentinel_id

SENTINEL_MIN = sentinel_id(NUM_SENTINELS - 1)


def _chunk(n, seed=0):
    # Ordinary ids only (no sentinels, no mode tokens), EOS at the end like a document's last chunk.
    rng = np.random.default_rng(seed)
    t = rng.integers(6, 8000, size=n).astype(np.int32)
    t[-1] = EOS_ID
    return t


def _reconstruct(example, lead=0):
    """Undo span corruption: replace each sentinel in the inputs by its span from the targets."""
    toks, p = example["tokens"], example["prefix_len"]
    inputs, targets = toks[lead:p], toks[p:]
    assert targets[-1] == EOS_ID
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= SENTINEL_MIN:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in inputs:
        out.extend(spans.pop(int(t)) if t >= SENTINEL_MIN else [int(t)])
    assert not spans
    return np.array(out, np.int32)


def _spans(example, lead=0):
    """Lengths of the noise spans recorded in the targets."""
    targets = example["tokens"][example["prefix_len"]:-1]
    starts = np.flatnonzero(targets >= SENTINEL_MIN)
    return np.diff(np.append(starts, targets.shape[0])) - 1


@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 300, 465])
def test_span_corruption_reconstructs_and_masks(n):
    sc = obj.get_objective("span_corruption")
    t = _chunk(n, n)
    for seed in range(20):
        ex = sc.apply(t, seed)
        np.testing.assert_array_equal(_reconstruct(ex), t)
        assert ex["tokens"].dtype == np.int32 and ex["tokens"].shape[0] == sc.output_len(n)
        p = ex["prefix_len"]
        np.testing.assert_array_equal(ex["loss_mask"], np.arange(ex["tokens"].shape[0]) >= p)
        # Sentinels count down from <extra_id_0> in order, in inputs and targets alike.
        sent_in = ex["tokens"][:p][ex["tokens"][:p] >= SENTINEL_MIN]
        sent_out = ex["tokens"][p:][ex["tokens"][p:] >= SENTINEL_MIN]
        np.testing.assert_array_equal(sent_in, sentinel_id(0) - np.arange(sent_in.shape[0]))
        np.testing.assert_array_equal(sent_in, sent_out)


@pytest.mark.parametrize("density,mean_span", [(0.15, 3), (0.5, 8), (0.15, 64)])
def test_span_corruption_noise_density_and_span_length(density, mean_span):
    sc = obj.SpanCorruption(density, mean_span)
    n = 400
    noise, spans = 0, []
    for seed in range(200):
        ex = sc.apply(_chunk(n, seed), seed)
        s = _spans(ex)
        noise += s.sum()
        spans.extend(s.tolist())
        assert s.min() >= 1
    assert abs(noise / (200 * n) - density) < 0.01
    assert abs(np.mean(spans) - mean_span) / mean_span < 0.1
    # The noise count and span count are exactly T5's rounding rule.
    assert obj.span_counts(n, density, mean_span) == (round(n * density),
                                                      round(round(n * density) / mean_span))


def test_span_positions_vary_with_seed_and_are_deterministic():
    sc = obj.get_objective("span_corruption")
    t = _chunk(200)
    a, b, c = sc.apply(t, 1), sc.apply(t, 1), sc.apply(t, 2)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_prefix_lm_split_random_but_deterministic():
    plm = obj.get_objective("prefix_lm")
    t = _chunk(100)
    splits = [plm.apply(t, s)["prefix_len"] for s in range(300)]
    assert splits == [plm.apply(t, s)["prefix_len"] for s in range(300)]
    assert min(splits) >= 1 and max(splits) <= 99 and len(set(splits)) > 50
    ex = plm.apply(t, 5)
    np.testing.assert_array_equal(ex["tokens"], t)
    np.testing.assert_array_equal(ex["loss_mask"], np.arange(100) >= ex["prefix_len"])


def test_causal_and_features():
    ex = obj.get_objective("causal").apply(_chunk(10), 0)
    assert ex["prefix_len"] == 0 and ex["loss_mask"].all()
    f = obj.example_features(ex)
    np.testing.assert_array_equal(f["inputs"], np.concatenate([[0], ex["tokens"][:-1]]))
    np.testing.assert_array_equal(f["targets"], ex["tokens"])
    assert not f["prefix"].any() and f["loss_weights"].dtype == np.float32
    np.testing.assert_array_equal(f["positions"], np.arange(10))
    pf = obj.example_features(obj.get_objective("prefix_lm").apply(_chunk(10), 3))
    p = obj.get_objective("prefix_lm").apply(_chunk(10), 3)["prefix_len"]
    # seqio's decoder_causal_attention: prefix covers positions 0..prefix_len inclusive.
    np.testing.assert_array_equal(pf["prefix"], (np.arange(10) <= p).astype(np.int32))
    np.testing.assert_array_equal(pf["loss_weights"], (np.arange(10) >= p).astype(np.float32))


@pytest.mark.parametrize("name", ["causal", "prefix_lm", "span_corruption", "ul2"])
@pytest.mark.parametrize("seq_len", [64, 512])
def test_max_input_len_fits_and_output_lens_match(name, seq_len):
    o = obj.get_objective(name)
    m = o.max_input_len(seq_len)
    seeds = np.arange(300, dtype=np.uint64)
    lens = np.full(300, m)
    assert o.output_lens(lens, seeds).max() <= seq_len
    if name in ("span_corruption", "ul2"):
        assert o.output_lens(lens + 1, seeds).max() > seq_len  # tight
    for n in (1, 5, m):
        for s in range(0, 300, 37):
            ex = o.apply(_chunk(n, s), s)
            assert ex["tokens"].shape[0] == o.output_lens(np.array([n]), np.array([s]))[0]
            assert ex["tokens"].max() < VOCAB_SIZE and ex["tokens"].min() >= 0


def test_ul2_mode_tokens_and_denoiser_frequencies():
    weights = {"R": 0.5, "X": 0.2, "S": 0.3}
    ul2 = obj.get_objective("ul2", weights=weights)
    n_ex, seen = 3000, {"R": 0, "X": 0, "S": 0}
    mode_of = {3: "R", 4: "X", 5: "S"}  # [NLU], [NLG], [S2S]
    t = _chunk(120)
    for s in range(n_ex):
        ex = ul2.apply(t, s)
        mode = mode_of[int(ex["tokens"][0])]
        seen[mode] += 1
        assert ex["prefix_len"] >= 1 and not ex["loss_mask"][0]  # mode token inside the prefix
        if mode == "S":
            np.testing.assert_array_equal(ex["tokens"][1:], t)
        else:
            np.testing.assert_array_equal(_reconstruct(ex, lead=1), t)
    for m, w in weights.items():
        assert abs(seen[m] / n_ex - w) < 4 * np.sqrt(w * (1 - w) / n_ex), (m, seen)


def test_ul2_denoiser_spans_follow_config():
    ul2 = obj.UL2(weights=[0, 0, 0, 0, 0, 1, 0])  # X, span 64, density 0.5
    ex = ul2.apply(_chunk(380), 7)
    assert ex["tokens"][0] == 4
    assert abs(_spans(ex).sum() / 380 - 0.5) < 0.01


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": [1, 2]}, "one weight per denoiser"),
    ({"weights": {"Q": 1}}, "unknown modes"),
    ({"weights": [0] * 7}, "not all zero"),
    ({"weights": [-1, 1, 1, 1, 1, 1, 1]}, "non-negative"),
])
def test_ul2_bad_weights(kwargs, match):
    with pytest.raises(ValueError, match=match):
        obj.UL2(**kwargs)


def test_unknown_objective_and_bad_params():
    with pytest.raises(ValueError, match="unknown objective"):
        obj.get_objective("bert")
    with pytest.raises(ValueError, match="noise_density"):
        obj.SpanCorruption(noise_density=1.5)
    with pytest.raises(ValueError, match="too short"):
        obj.get_objective("span_corruption").max_input_len(1)


def test_derive_seeds_distinct_and_stable():
    s = obj.derive_seeds(0, 1, 2, np.arange(1000))
    assert len(set(s.tolist())) == 1000
    np.testing.assert_array_equal(s, obj.derive_seeds(0, 1, 2, np.arange(1000)))
    assert obj.derive_seeds(0, 1, 3, 5) != obj.derive_seeds(0, 1, 2, 5)
