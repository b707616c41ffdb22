"""Perplexity under a reference checkpoint (the shared miniature run) and CCNet terciles, on Beam;
and pairwise judgments generated from that checkpoint's losses."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loam import run as run_lib
from loam.data import corpora
from loam.data import vocab as vocab_lib
from loam.selection import perplexity, ratings
from loam.selection.base import Doc, ScorerError

from helpers import run_scorer

pytestmark = pytest.mark.e2e



def direct_loss(params, model, ids, seq_len):
    """Mean next-token loss of a token list (input = the tokens shifted right after a 0): one
    unpadded forward pass if it fits in seq_len, else chunk by chunk, each alone in a row of
    seq_len (the rest of the row padding, segment 0)."""
    @jax.jit
    def nll(params, inputs, targets, segment_ids):
        logits = model.apply({"params": params}, inputs, segment_ids=segment_ids,
                             positions=jnp.arange(seq_len)[None],
                             prefix=jnp.zeros_like(inputs))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    if len(ids) <= seq_len:  # one chunk: one unpadded forward pass
        c = np.asarray(ids, np.int32)[None]
        inputs = np.concatenate([np.zeros((1, 1), np.int32), c[:, :-1]], axis=1)
        logits = jax.jit(model.apply)({"params": params}, inputs, segment_ids=np.ones_like(c),
                                      positions=np.arange(c.shape[1])[None],
                                      prefix=np.zeros_like(c))
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))[0]
        return float(-logp[np.arange(c.shape[1]), c[0]].mean())
    total = 0.0
    for s in range(0, len(ids), seq_len):
        c = np.asarray(ids[s:s + seq_len], np.int32)
        n = len(c)
        inputs, targets, seg = (np.zeros((1, seq_len), np.int32) for _ in range(3))
        inputs[0, 1:n], targets[0, :n], seg[0, :n] = c[:-1], c, 1
        total += float(np.asarray(nll(params, inputs, targets, seg))[0, :n].sum())
    return total / len(ids)


def test_losses_and_terciles(reference_run, tmp_path):
    tok = vocab_lib.get_tokenizer("bundled")
    docs = []
    for domain, n in (("reference", 15), ("literature", 9)):
        for i, (doc_id, text) in enumerate(list(corpora.read_documents(
                corpora.corpus_path(domain)))[:n]):
            docs.append(Doc(domain, i, doc_id, "train", text, len(tok.encode([text])[0]) + 1))
    scorer = perplexity.Perplexity(workdir=str(reference_run), batch_size=8)
    scorer.check(None)
    assert scorer.inputs()["checkpoint"] == f"{reference_run}@12"
    got = run_scorer(scorer, docs, tmp_path)
    assert len(got) == len(docs)

    # One short (reference: a gloss) and one long (literature: a chapter, many chunks) document
    # against a forward pass written out here.
    params, run, _ = run_lib.load_params(reference_run)
    seq_len = int(run.config.data.seq_len)
    for d in (docs[0], docs[15]):
        ids = list(tok.encode([d.text])[0]) + [tok.eos_id]
        want = direct_loss(params, run.model, ids, seq_len)
        assert got[d.domain, d.index]["ppl_loss"] == pytest.approx(want, rel=1e-5)
    assert docs[15].tokens > 3 * seq_len

    for domain, n in (("reference", 15), ("literature", 9)):
        cols = [got[domain, i] for i in range(n)]
        loss = np.array([c["ppl_loss"] for c in cols])
        assert np.all(np.isfinite(loss)) and loss.std() > 0
        np.testing.assert_allclose([c["ppl"] for c in cols], np.exp(loss), rtol=1e-12)
        t = np.array([c["ppl_tercile"] for c in cols])
        counts = np.bincount(t.astype(int), minlength=3)
        assert np.all(np.abs(counts - n / 3) <= 1), counts
        # head = the lowest perplexities
        assert loss[t == 0].max() < loss[t == 1].min() <= loss[t == 1].max() < loss[t == 2].min()
    report = scorer.report("reference", {k: np.array([got["reference", i][k] for i in range(15)])
                                         for k in scorer.columns}, np.ones(15))
    assert sum(report["documents"].values()) == 15

    # Judgments generated from the same checkpoint's losses: lower loss = better.
    out = tmp_path / "judgments.jsonl"
    ratings.main(["judge", "--from", "loss", "--workdir", str(reference_run), "--domains",
                  "reference", "--max_docs", "6", "--pairs", "20", "--out", str(out)])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 20
    assert all(r["judge"].startswith(f"loss:{reference_run}@12 (generated") for r in lines)
    loss = {d.doc_id: got[d.domain, d.index]["ppl_loss"] for d in docs[:6]}
    for r in lines:
        assert (r["p"] > 0.5) == (loss[r["a"]] < loss[r["b"]])
        assert r["p"] == pytest.approx(1 / (1 + np.exp(-(loss[r["b"]] - loss[r["a"]])
                                                       / np.std(list(loss.values())))),
                                       abs=1e-5)


def test_bad_reference(tmp_path, reference_run):
    with pytest.raises(ScorerError, match="needs --param workdir"):
        perplexity.Perplexity().check(None)
    with pytest.raises(ScorerError, match="not a loam run"):
        perplexity.Perplexity(workdir=str(tmp_path)).check(None)
    with pytest.raises(ScorerError, match=r"no checkpoint for step 5; available: \[4, 8, 12\]"):
        perplexity.Perplexity(workdir=str(reference_run), step=5).check(None)
