"""DSIR: hashed n-gram importance weights as a Beam scorer, checked by hand and on the corpora."""

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from loam.data import corpora
from loam.selection import dsir
from loam.selection.base import Doc, ScorerError

from helpers import corpus_docs, run_scorer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_weights_by_hand(tmp_path):
    """Two raw documents, one target document, 7 buckets: every probability written out."""
    raw = ["The cat sat.", "the dog sat"]
    target = ["the cat"]
    nb = 7

    def b(s):  # sha256 of the n-gram, big-endian, modulo the number of buckets
        return int(hashlib.sha256(s.encode()).hexdigest(), 16) % nb

    # Tokens: lower-cased words and punctuation runs; then unigrams + bigrams.
    grams = [["the", "cat", "sat", ".", "the cat", "cat sat", "sat ."],
             ["the", "dog", "sat", "the dog", "dog sat"]]
    target_grams = ["the", "cat", "the cat"]
    raw_counts = [0] * nb
    for g in grams[0] + grams[1]:
        raw_counts[b(g)] += 1
    target_counts = [1] * nb  # add-one smoothing
    for g in target_grams:
        target_counts[b(g)] += 1
    p_raw = [c / 12 for c in raw_counts]
    p_target = [c / (nb + 3) for c in target_counts]
    expected = [sum(math.log(p_target[b(g)] + 1e-8) - math.log(p_raw[b(g)] + 1e-8) for g in gs)
                for gs in grams]

    docs = [Doc("web", i, f"d{i}", "train", t, 4) for i, t in enumerate(raw)]
    scorer = dsir.DSIR(target=write_jsonl(tmp_path / "target.jsonl", [{"text": target[0]}]),
                       num_buckets=nb)
    scorer.check(None)
    got = run_scorer(scorer, docs, tmp_path)
    assert sorted(got) == [("web", 0), ("web", 1)]
    for i in range(2):
        assert got["web", i]["dsir_logw"] == pytest.approx(expected[i], rel=1e-12)
    np.testing.assert_allclose(dsir.importance_weights(raw, target, nb), expected, rtol=1e-12)


def test_hashing_is_stable_across_processes():
    text = max((d.text for d in corpus_docs("docs", 20)), key=len)
    here = dsir.features(text).tolist()
    code = ("import json, sys; from loam.selection import dsir; "
            "print(json.dumps(dsir.features(sys.stdin.read()).tolist()))")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        proc = subprocess.run([sys.executable, "-c", code], input=text, env=env,
                              capture_output=True, text=True, check=True)
        assert json.loads(proc.stdout) == here
    assert len(here) > 100 and len(set(here)) > 50


def test_real_corpora_target_domain(tmp_path):
    """Code and docs documents scored against the code domain's validation split: the Beam
    scorer equals the in-memory computation, the same with two workers, and code ranks above
    prose."""
    docs = corpus_docs("code", 25) + corpus_docs("docs", 40)
    scorer = dsir.DSIR(target="code:validation")
    scorer.check(None)
    assert scorer.inputs()["target"].startswith("code:validation (")
    one = run_scorer(scorer, docs, tmp_path / "one")
    two = run_scorer(scorer, docs, tmp_path / "two", direct_num_workers=2,
                     direct_running_mode="multi_threading")
    assert one == two
    target = [t for i, t in corpora.read_documents(corpora.corpus_path("code"))
              if corpora.is_validation(i)]
    want = dsir.importance_weights([d.text for d in docs], target)
    got = np.array([one[d.domain, d.index]["dsir_logw"] for d in docs])
    np.testing.assert_allclose(got, want, rtol=1e-9)
    # The weight sums over a document's n-grams; per n-gram, code is far closer to the target.
    per_gram = got / [max(len(dsir.features(d.text)), 1) for d in docs]
    assert np.median(per_gram[:25]) > np.percentile(per_gram[25:], 90)

    # raw=domain: each domain is its own raw distribution.
    per = dsir.DSIR(target="code:validation", raw="domain")
    per.check(None)
    got_per = run_scorer(per, docs, tmp_path / "per")
    want_docs = dsir.importance_weights([d.text for d in docs[25:]], target)
    np.testing.assert_allclose([got_per["docs", d.index]["dsir_logw"] for d in docs[25:]],
                               want_docs, rtol=1e-9)
    report = scorer.report("code", {"dsir_logw": got[:25]}, None)
    assert report["documents"] == 25 and report["p10"] <= report["median"] <= report["p90"]


def test_resample():
    logw = np.log(np.array([1.0, 1.0, 1.0, 1e6, 1.0, 1.0]))
    picks = [tuple(dsir.resample(logw, 2, seed=s)) for s in range(20)]
    assert all(3 in p and len(set(p)) == 2 for p in picks)
    assert len(set(picks)) > 1                       # other picks vary with the seed
    assert dsir.resample(logw, 2, seed=7).tolist() == dsir.resample(logw, 2, seed=7).tolist()
    assert dsir.resample([0.5, 3.0, 1.0, 2.0], 2, top_k=True).tolist() == [1, 3]
    with pytest.raises(ValueError, match="NaN"):
        dsir.resample([0.0, float("nan")], 1)
    with pytest.raises(ValueError, match="cannot draw"):
        dsir.resample([0.0, 1.0], 3)


def test_bad_targets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ScorerError, match="has no documents"):
        dsir.DSIR(target=str(empty)).check(None)
    ids = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7]}])
    with pytest.raises(ScorerError, match="token ids .*another tokenizer"):
        dsir.DSIR(target=ids).check(None)
    gz = tmp_path / "t.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write('{"text": "hello world"}\nnot json\n')
    with pytest.raises(ScorerError, match=r"t.jsonl.gz:2: not JSON"):
        dsir.DSIR(target=str(gz)).check(None)
    with pytest.raises(ScorerError, match="unknown domain 'kode'.*did you mean 'code'"):
        dsir.DSIR(target="kode").check(None)
    with pytest.raises(ScorerError, match="train or validation"):
        dsir.DSIR(target="code:test").check(None)
    with pytest.raises(ScorerError, match="raw=all"):
        dsir.DSIR(target="code", raw="global").check(None)
    with pytest.raises(ScorerError, match="no target"):
        dsir.DSIR().check(None)


def test_bench_toy_size(capsys):
    """The benchmark at a toy size, without the reference package (unless it is installed)."""
    from loam.bench import dsir as bench

    assert bench.main(["--raw_domains", "docs,code", "--max_docs", "6", "--fraction", "0.25",
                       "--target", "code:validation"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["docs"] == 12 and report["k"] == 3 and report["loam_docs_per_s"] > 0
    assert {"loam_docs_per_s", "reference_docs_per_s", "selection_overlap"} <= set(report)
    if report["reference"] is None:
        assert "pip install data-selection==1.0.3" in report["reference_missing"]
    else:
        assert report["logw_max_abs_diff"] < 1e-6 and report["topk_overlap"] == 1.0
