"""Prepared bundled domains and the deterministic mixture stream, on the real bundled corpora."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loam.data import corpora, heldout, objectives, recipes, tokenized, weights
from loam.data import stream as stream_lib
from loam.data import vocab as vocab_lib

DOMAINS = list(corpora.DOMAIN_NAMES)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    """One fresh tokenizer cache for the module (tokenizing the bundled corpora takes seconds)."""
    path = tmp_path_factory.mktemp("loam_cache")
    old = os.environ.get("LOAM_CACHE_DIR")
    os.environ["LOAM_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LOAM_CACHE_DIR")
    else:
        os.environ["LOAM_CACHE_DIR"] = old


def _stream(objective="causal", weights=None, seq_len=512, batch_size=16, seed=0, **kw):
    weights = recipes.uniform(len(DOMAINS)) if weights is None else weights
    return stream_lib.MixtureStream(kw.pop("domains", DOMAINS), objective, weights, seq_len,
                                    batch_size, seed, **kw)


def _write_corpus(directory: Path, domain: str, texts):
    corpora.write_documents(corpora.corpus_path(domain, directory),
                            [(f"{domain}-{i}", t) for i, t in enumerate(texts)])
    return directory


# ----------------------------------------------------------------------------- vocabulary, cache


def test_vocabulary_round_trips_every_domain():
    v = vocab_lib.default_vocabulary()
    for d in DOMAINS:
        docs = [t for _, t in corpora.read_documents(corpora.corpus_path(d))]
        sample = docs[:: max(1, len(docs) // 25)]
        for text, ids in zip(sample, v.encode(sample)):
            assert v.decode(ids) == text, d


def test_tokenized_domain_layout_and_cache(cache_dir):
    c = tokenized.load("literature")
    docs = list(corpora.read_documents(corpora.corpus_path("literature")))
    assert c.train.num_documents + c.validation.num_documents == len(docs)
    assert c.dropped_documents == 0
    for split, want in (("train", False), ("validation", True)):
        s = c.split(split)
        assert all(corpora.is_validation(docs[i][0]) == want for i in s.doc_index)
        assert np.all(s.tokens[s.offsets[1:] - 1] == vocab_lib.EOS_ID)  # EOS ends every doc
        assert s.tokens.dtype == np.uint16  # 8192 ids fit in two bytes
        i = s.num_documents // 2
        text = docs[s.doc_index[i]][1]
        assert s.doc_bytes[i] == len(text.encode())
        assert vocab_lib.default_vocabulary().decode(s.tokens[s.offsets[i]:s.offsets[i + 1]]) \
            == text
    # Prepared once, under the cache directory; a later load maps the same files.
    prepared = list((cache_dir / "prepared").glob("literature-*"))
    assert len(prepared) == 1 and (prepared[0] / "manifest.json").exists()
    again = tokenized.load("literature")
    assert again.prepared.path == c.prepared.path
    np.testing.assert_array_equal(again.train.tokens, c.train.tokens)


def test_preparation_follows_corpus_bytes_and_drops_are_counted(tmp_path):
    texts = [f"Document number {i} says something about item {i * 7}." for i in range(60)]
    d1 = _write_corpus(tmp_path / "a", "code", texts + ["   ", "\n"])
    d2 = _write_corpus(tmp_path / "b", "code", texts[:-1] + ["   ", "\n"])
    c1, c2 = tokenized.load("code", d1), tokenized.load("code", d2)
    assert c1.prepared.path != c2.prepared.path
    assert c1.dropped_documents == 2
    assert c1.train.num_documents + c1.validation.num_documents == 60


@pytest.mark.parametrize("case,match", [
    ("missing", "not found"),
    ("no_docs", "holds no documents"),
    ("all_empty", "holds 3 documents, all empty"),
    ("undecodable", "not valid UTF-8|undecodable"),
])
def test_bad_corpora_give_clear_errors(tmp_path, case, match):
    path = corpora.corpus_path("docs", tmp_path)
    if case == "no_docs":
        _write_corpus(tmp_path, "docs", [])
    elif case == "all_empty":
        _write_corpus(tmp_path, "docs", ["", "  ", "\n\t"])
    elif case == "undecodable":
        import gzip
        with gzip.open(path, "wb") as f:
            f.write(b'{"id": "a", "text": "\xff\xfe bad"}\n')
    with pytest.raises(corpora.CorpusError, match=match):
        tokenized.load("docs", tmp_path)
    with pytest.raises(ValueError, match=match):  # the stream surfaces the same message
        stream_lib.MixtureStream(["docs"], "causal", [1.0], 64, 2, 0, data_dir=tmp_path)


# ----------------------------------------------------------------------------- weights


def test_weight_recipes():
    sizes = {"a": 100.0, "b": 300.0, "c": 600.0}
    assert recipes.proportional(sizes) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    np.testing.assert_allclose(recipes.temperature([1, 3, 6], 1.0), [0.1, 0.3, 0.6])
    t = recipes.temperature([1, 3, 6], 1e6)
    np.testing.assert_allclose(t, np.full(3, 1 / 3), atol=1e-5)
    t2 = recipes.temperature([1, 3, 6], 2.0)
    np.testing.assert_allclose(t2, np.sqrt([1, 3, 6]) / np.sqrt([1, 3, 6]).sum())
    assert recipes.uniform(["x", "y"]) == {"x": 0.5, "y": 0.5}
    # UniMax: budget 3000 tokens, at most 5 epochs: 'a' is capped at 500, the rest share 2500.
    u = recipes.unimax(sizes, 3000, 5)
    assert u == pytest.approx({"a": 500 / 3000, "b": 1250 / 3000, "c": 1250 / 3000})
    # When every domain hits its cap, the weights are the capped token counts.
    assert recipes.unimax(sizes, 3000, 2) == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    # A budget every domain can afford uniformly gives uniform weights.
    np.testing.assert_allclose(recipes.unimax([100, 300, 600], 150, 4), np.full(3, 1 / 3))


@pytest.mark.parametrize("weights,match", [
    ([-1, 1], "non-negative"),
    ([float("nan"), 1], "NaN"),
    ([0, 0], "all zero"),
    ({"nope": 1.0}, "not in the mixture's domains"),
    ({}, "empty"),
    ([], "empty"),
    ([1, 2, 3], "one weight per domain"),
])
def test_validate_weights_errors(weights, match):
    with pytest.raises(ValueError, match=match):
        recipes.validate_weights(weights, ["code", "docs"])


def test_bad_stream_configs():
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        _stream(domains=["poetry"], weights=[1.0])
    with pytest.raises(ValueError, match="not divisible"):
        _stream(batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="unknown objective"):
        _stream(objective="mlm")
    with pytest.raises(ValueError, match="all zero"):
        _stream(weights=[0] * 5)
    with pytest.raises(ValueError, match="no domains"):
        _stream(domains=[], weights=[])
    # A schedule that goes bad later fails at that step, with the step in the message.
    s = _stream(weights=lambda t: [1, 1, 1, 1, 1] if t < 3 else [1, -1, 0, 0, 0])
    s.batch(2)
    with pytest.raises(ValueError, match="at step 3.*non-negative"):
        s.batch(3)
    assert corpora.resolve_domain("loam_code_causal") == "code"


# ----------------------------------------------------------------------------- packing


def _segments(b, r):
    seg = b["segment_ids"][r]
    return [np.flatnonzero(seg == s) for s in range(1, seg.max() + 1)]


@pytest.mark.parametrize("objective", ["causal", "span_corruption", "ul2"])
def test_packing_invariants(objective):
    s = _stream(objective)
    corpora_by_id = {dd.domain_id: dd for dd in s.data}
    C = s.max_input_len
    for step in (0, 5):
        b = s.batch(step)
        assert {k: v.shape for k, v in b.items()} == {k: (16, 512) for k in b}
        for r in range(16):
            seg = b["segment_ids"][r]
            pad = seg == 0
            assert np.all(b["loss_weights"][r][pad] == 0) and np.all(b["doc_ids"][r][pad] == -1)
            assert np.all(b["targets"][r][pad] == 0) and np.all(b["inputs"][r][pad] == 0)
            assert len(set(b["domain_ids"][r].tolist())) == 1  # one domain per row
            dd = corpora_by_id[int(b["domain_ids"][r, 0])]
            for k, idx in enumerate(_segments(b, r)):
                # Contiguous segments numbered 1, 2, ... from the row start, nothing crossing.
                assert idx.size and np.all(np.diff(idx) == 1)
                assert k == 0 and idx[0] == 0 or idx[0] == _segments(b, r)[k - 1][-1] + 1
                np.testing.assert_array_equal(b["positions"][r][idx], np.arange(idx.size))
                t, i = b["targets"][r][idx], b["inputs"][r][idx]
                np.testing.assert_array_equal(i, np.concatenate([[0], t[:-1]]))
                assert len(set(b["doc_ids"][r][idx].tolist())) == 1
                lw, pf = b["loss_weights"][r][idx], b["prefix"][r][idx]
                if objective == "causal":
                    assert lw.all() and not pf.any()
                    # The segment is a chunk of its document, cut at a multiple of max_input_len.
                    split = dd.split
                    j = int(np.searchsorted(split.doc_index, b["doc_ids"][r, idx[0]]))
                    doc = np.asarray(split.tokens[split.offsets[j]:split.offsets[j + 1]])
                    starts = range(0, doc.size, C)
                    assert any(np.array_equal(doc[a:a + t.size], t) for a in starts)
                else:
                    p = int(np.argmax(lw > 0))  # first predicted position = prefix_len
                    assert p > 0 and lw[p:].all() and not lw[:p].any()
                    np.testing.assert_array_equal(pf, (np.arange(idx.size) <= p).astype(int))
                    if objective == "ul2":
                        assert t[0] in (3, 4, 5)  # [NLU] [NLG] [S2S], inside the prefix
                    if t[0] != 5:  # span corruption targets end with EOS; prefix LM need not
                        assert t[-1] == vocab_lib.EOS_ID


def test_causal_padding_below_five_percent_at_512():
    s = _stream("causal")
    for k in range(len(DOMAINS)):
        st = s.epoch_stats(k, 0)
        assert st["padding_fraction"] < 0.05, (DOMAINS[k], st)
        assert st["tokens"] == s.data[k].split.num_tokens  # every token, once per epoch


def test_long_documents_split_not_dropped_and_epochs(tmp_path):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(5, 400, size=80)]
    data_dir = _write_corpus(tmp_path, "dialogue", texts)
    s = stream_lib.MixtureStream(["dialogue"], "causal", [1.0], 64, 4, seed=3,
                                 data_dir=data_dir)
    split = s.data[0].split
    assert split.lengths.max() > 4 * 64  # documents much longer than a row
    rows_epoch0 = s.epoch_stats(0, 0)["rows"]
    steps = -(-rows_epoch0 // 4) + 3  # a little past one epoch
    seen_tokens = []
    for t in range(steps):
        b = s.batch(t)
        seen_tokens.append(b["targets"][b["segment_ids"] > 0])
    # Epoch 0 is exactly the first rows_epoch0 rows: it conserves every training token.
    b_all = [s.global_batch(t) for t in range(steps)]
    rows = [(bb["targets"][r], bb["segment_ids"][r]) for bb in b_all for r in range(4)]
    epoch0 = np.concatenate([t[seg > 0] for t, seg in rows[:rows_epoch0]])
    np.testing.assert_array_equal(np.sort(epoch0), np.sort(np.asarray(split.tokens)))
    st = s.stats(steps)
    assert st["rows"] == [steps * 4]
    assert 1.0 < st["epochs"][0] < 1.5
    assert st["tokens"][0] == sum(x.size for x in seen_tokens)
    assert s.stats(0)["epochs"] == [0.0]
    # The next epoch is a different order of the same chunks.
    p0, p1 = s.packing(0, 0), s.packing(0, 1)
    assert not np.array_equal(p0.order, p1.order)
    np.testing.assert_array_equal(np.sort(p0.order), np.sort(p1.order))


# ----------------------------------------------------------------------------- determinism


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("objective", ["causal", "ul2"])
def test_random_access_equals_iteration(objective):
    it = _stream(objective, seed=11, batch_size=8)
    seq = [it.batch(t) for t in range(38)]
    _same(_stream(objective, seed=11, batch_size=8).batch(37), seq[37])
    _same(it.batch(20), seq[20])  # asking again after moving on
    assert not np.array_equal(seq[36]["targets"], seq[37]["targets"])


def test_process_slices_concatenate_to_global_batch():
    full = _stream("span_corruption", seed=5).batch(9)
    parts = [_stream("span_corruption", seed=5, process_index=p, process_count=4).batch(9)
             for p in range(4)]
    for k in full:
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])


def test_same_batch_in_a_fresh_process(tmp_path, cache_dir):
    code = (
        "import sys, numpy as np\n"
        "from loam.data import stream as stream_lib\n"
        "s = stream_lib.MixtureStream(['literature', 'code', 'reference'], 'ul2',\n"
        "    lambda t: [1.0, 2.0, 1.0 + t % 3], 512, 8, seed=42)\n"
        "np.savez(sys.argv[1], **s.batch(23))\n")
    out = tmp_path / "batch.npz"
    env = dict(os.environ, LOAM_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=REPO)
    here = stream_lib.MixtureStream(["literature", "code", "reference"], "ul2",
                                    lambda t: [1.0, 2.0, 1.0 + t % 3], 512, 8,
                                    seed=42).batch(23)
    with np.load(out) as there:
        _same(dict(there), here)


def test_state_dict_and_check():
    s = _stream(weights={"code": 3.0, "docs": 1.0, "literature": 1.0})
    state = json.loads(json.dumps(s.state_dict(40)))  # survives a JSON round trip
    assert state["step"] == 40 and sum(state["rows_consumed"]) == 40 * 16
    s.check_state(state)
    _stream(weights={"code": 3.0, "docs": 1.0, "literature": 1.0}).check_state(state)
    with pytest.raises(ValueError, match="rows_consumed.*changed since it was saved"):
        _stream(weights={"code": 1.0, "docs": 1.0, "literature": 1.0}).check_state(state)
    with pytest.raises(ValueError, match="seed"):
        _stream(weights={"code": 3.0, "docs": 1.0, "literature": 1.0}, seed=1).check_state(state)


# ----------------------------------------------------------------------------- shares


def test_rows_track_cumulative_target_exactly():
    w = np.array([0.5, 0.3, 0.1, 0.07, 0.03])
    s = _stream(weights=w)
    for t in range(0, 3000, 7):
        assert np.all(np.abs(s.rows_consumed(t) - 16 * t * w) < 1.0 + 1e-9)
    assert np.all(s.rows_at(11) >= 0) and s.rows_at(11).sum() == 16


def test_step_dependent_schedule_shares():
    w_early, w_late = np.array([0.7, 0.1, 0.1, 0.1, 0.0]), np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    sched = lambda t: w_early if t < 100 else w_late  # noqa: E731
    s = _stream(weights=sched, batch_size=8)
    np.testing.assert_allclose(s.weights_at(99), w_early)
    late = s.rows_consumed(400) - s.rows_consumed(100)
    assert np.all(np.abs(late - 300 * 8 * w_late) <= 2)
    assert late[0] == 0  # a zero weight gets nothing once its share is met
    # Realised token shares follow the weights (rows are nearly full, so within a few percent).
    tok = np.zeros(5)
    for t in range(100, 160):
        b = s.batch(t)
        tok += np.bincount(b["domain_ids"][b["segment_ids"] > 0], minlength=5)
    np.testing.assert_allclose(tok / tok.sum(), w_late, atol=0.02)
    st = s.stats(160)
    np.testing.assert_allclose(st["rows"], s.rows_consumed(160))
    assert st["padding_fraction"] < 0.05


def test_schedule_object_interface():
    class Stages(weights.Schedule):
        def weights_at(self, step):
            return np.eye(len(self.domains))[min(step // 10, len(self.domains) - 1)]

    s = _stream(weights=Stages(DOMAINS), batch_size=4)
    assert set(s.batch(3)["domain_ids"][:, 0].tolist()) == {0}
    assert set(s.batch(25)["domain_ids"][:, 0].tolist()) == {2}
    # A schedule over the domains in another order (or a subset) is matched by name.
    s2 = _stream(weights=weights.constant({"code": 1.0, "literature": 3.0}), batch_size=4)
    np.testing.assert_allclose(s2.weights_at(0), [0.75, 0, 0.25, 0, 0])
    assert s2.rows_consumed(10).tolist() == [30, 0, 10, 0, 0]


# ----------------------------------------------------------------------------- eval


def test_eval_batches_fixed_and_cover_bytes():
    batches, nbytes = heldout.eval_batches("docs", objectives.CausalLM(), 256, 4, 20000)
    again, nbytes2 = heldout.eval_batches("docs", "causal", 256, 4, 20000)
    assert nbytes == nbytes2 and len(batches) == len(again)
    for a, b in zip(batches, again):
        _same(a, b)
    val = tokenized.load("docs").validation
    n_docs = int(np.searchsorted(val.offsets[1:], 20000, side="right"))
    assert n_docs > 1 and nbytes == int(np.asarray(val.doc_bytes[:n_docs]).sum())
    total = sum(int(b["loss_weights"].sum()) for b in batches)
    assert total == int(val.offsets[n_docs]) <= 20000  # whole documents, every token scored
    assert all(b["targets"].shape == (4, 256) for b in batches)
    assert np.all(batches[0]["domain_ids"] == corpora.DOMAIN_NAMES.index("docs"))
    sc, _ = heldout.eval_batches("docs", "span_corruption", 256, 4, 20000)
    assert sum(float(b["loss_weights"].sum()) for b in sc) < total
    # A budget below the first document still evaluates that one document.
    one, one_bytes = heldout.eval_batches("docs", "causal", 256, 4, 1)
    assert one_bytes == val.doc_bytes[0]
    assert sum(int(b["loss_weights"].sum()) for b in one) == val.offsets[1]
