"""Deduplication: exact and MinHash LSH clusters as Beam transforms over the bundled corpora with
injected duplicates; survivors the same on one and two workers; bad parameters refused."""

import json
import random

import numpy as np
import pytest

from loam.data import corpora
from loam.selection import dedup
from loam.selection.base import Doc, ScorerError, make

from helpers import run_scorer


def edit(text, k, tag="edit", offset=0.0):
    """The text with k of its words, evenly spread (shifted by `offset` of the spacing),
    replaced by new words."""
    words = text.split()
    step = len(words) / k if k else 0
    for i in range(k):
        words[int((i + offset) * step)] = f"{tag}{i}"
    return " ".join(words)


@pytest.fixture(scope="module")
def chapters():
    """KJV chapters of 400 to 1,500 words (no two of them near duplicates)."""
    texts = [t for _, t in corpora.read_documents(corpora.corpus_path("literature"))
             if 400 <= len(t.split()) <= 1500]
    return texts[:40]


def docs_of(texts, domain="lit"):
    return [Doc(domain, i, f"{domain}{i}", "train", t, len(t.split()) + 1)
            for i, t in enumerate(texts)]


def test_normalisation_and_exact_duplicates(tmp_path, chapters):
    base = chapters[0]
    variants = [base.upper(), base.replace(" ", "  \n"), base.replace(",", " , ").replace(".", "")]
    assert {dedup.normalise(v) for v in variants} == {dedup.normalise(base)}
    assert dedup.normalise("Hello,  World! It's 3+4 — «done».") == "hello world it s 3+4 done"
    texts = chapters[:6] + variants + [edit(base, 1)]
    out = run_scorer(make("dedup", {"method": "exact"}), docs_of(texts), tmp_path)
    copies = [6, 7, 8]
    for i in [0, *copies]:
        assert out["lit", i] == {"dup_cluster": 0.0, "dup_cluster_size": 4.0,
                                 "dup_keep": float(i == 0), "dup_repeat": 3.0 if i == 0 else 0.0}
    for i in [1, 2, 3, 4, 5, 9]:  # one changed word is not an exact duplicate
        assert out["lit", i] == {"dup_cluster": float(i), "dup_cluster_size": 1.0,
                                 "dup_keep": 1.0, "dup_repeat": 1.0}


def near_set(chapters):
    """Originals, copies with a few words changed, copies with a quarter changed."""
    originals = chapters[:20]
    near = [edit(t, k) for t, k in zip(originals, [1, 2, 3, 4, 5] * 4)]
    far = [edit(t, len(t.split()) // 4, "far") for t in originals[:10]]
    return originals, near, far


def chain_set(chapters):
    """A chain of copies, each with new edits at other places than the last, until the ends
    are no longer near duplicates."""
    chain = [min(chapters[20:], key=lambda t: len(t.split()))]
    for step in range(8):
        chain.append(edit(chain[-1], 6, f"s{step}x", offset=step / 8))
        if dedup.jaccard(chain[0], chain[-1]) < 0.6:
            break
    return chain


@pytest.fixture(scope="module")
def minhash_run(tmp_path_factory, chapters):
    """One pipeline (scope: domain) over two domains: "near" and "chain"."""
    originals, near, far = near_set(chapters)
    chain = chain_set(chapters)
    docs = (docs_of(originals + near + far, "near")
            + docs_of(chapters[10:14] + chain[::-1], "chain"))  # the chain's original last
    return run_scorer(make("dedup", {}), docs, tmp_path_factory.mktemp("minhash"))


def test_near_duplicates_above_the_threshold_found_none_well_below(minhash_run, chapters):
    """Copies with a few words changed (Jaccard of word 5-grams >= 0.85: LSH finds each with
    probability >= 0.988 under 14 x 8) are clustered with their original; copies with a quarter
    of their words changed (Jaccard <= 0.2: probability < 1e-4) are not."""
    originals, near, far = near_set(chapters)
    sims_near = [dedup.jaccard(a, b) for a, b in zip(originals, near)]
    sims_far = [dedup.jaccard(a, b) for a, b in zip(originals, far)]
    assert min(sims_near) >= 0.85 and max(sims_far) <= 0.2
    out = minhash_run
    for i in range(20):
        original, copy = out["near", i], out["near", 20 + i]
        assert original["dup_cluster"] == copy["dup_cluster"] == i
        assert original["dup_cluster_size"] == copy["dup_cluster_size"] == 2
        assert (original["dup_keep"], copy["dup_keep"]) == (1.0, 0.0)
        assert (original["dup_repeat"], copy["dup_repeat"]) == (2.0, 0.0)
    for i in range(10):
        assert out["near", 40 + i]["dup_cluster_size"] == 1
        assert out["near", 40 + i]["dup_keep"] == 1


def test_clusters_are_transitive(minhash_run, chapters):
    """Neighbours in a chain of edited copies are near duplicates (LSH finds them with
    probability > 0.99), its ends are not (Jaccard under 0.6, found with probability < 0.2),
    yet all are one cluster with one survivor."""
    chain = chain_set(chapters)
    assert all(dedup.jaccard(a, b) >= 0.85 for a, b in zip(chain, chain[1:]))
    assert dedup.jaccard(chain[0], chain[-1]) < 0.6
    out = minhash_run
    n = len(chain)
    members = [out["chain", i] for i in range(4, 4 + n)]
    assert {m["dup_cluster"] for m in members} == {4.0}
    assert {m["dup_cluster_size"] for m in members} == {float(n)}
    assert [m["dup_keep"] for m in members] == [1] + [0] * (n - 1)
    assert [m["dup_repeat"] for m in members] == [dedup.repeat_weight(n, dedup.FINEWEB2_REPEAT)] \
        + [0] * (n - 1)
    assert all(out["chain", i]["dup_cluster_size"] == 1 for i in range(4))
    # Union-find gives the same components whatever the order of the edges.
    edges = [(("a", 3), ("a", 1)), (("a", 7), ("a", 3)), (("b", 0), ("b", 2)), (("a", 9), ("a", 7))]
    expected = dedup.components(edges)
    rng = random.Random(0)
    for _ in range(5):
        rng.shuffle(edges)
        assert dedup.components([(v, u) if rng.random() < 0.5 else (u, v) for u, v in edges]) \
            == expected
    assert dict(expected) == {("a", i): (("a", 1), 4) for i in (1, 3, 7, 9)} | {
        ("b", i): (("b", 0), 2) for i in (0, 2)}


def test_same_survivors_on_one_and_two_workers_and_global_scope(tmp_path, chapters):
    originals = chapters[20:32]
    copies = [edit(t, 2) for t in originals[:6]] + [originals[6]]
    lit = docs_of(originals + copies, "lit")
    # A second domain holding copies of some of the first's documents, and one of its own twice.
    own = chapters[33]
    web = docs_of([originals[0], edit(originals[1], 3), own, own.lower()], "web")
    docs = lit + web
    results = {}
    for workers in (1, 2):
        d = tmp_path / f"w{workers}"
        d.mkdir()
        results[workers] = run_scorer(make("dedup", {"scope": "global"}), docs, d, workers)
    assert results[1] == results[2]
    out = results[1]
    assert sum(c["dup_keep"] for c in out.values()) == len(docs) - 7 - 3
    # Across domains, the survivor is the smallest (domain, index): "lit" sorts before "web".
    assert out["web", 0] == {"dup_cluster": 0.0, "dup_cluster_domain": 0.0,
                             "dup_cluster_size": 3.0, "dup_keep": 0.0, "dup_repeat": 0.0}
    assert out["lit", 0]["dup_keep"] == 1 and out["lit", 0]["dup_repeat"] == 3
    assert (out["web", 3]["dup_cluster"], out["web", 3]["dup_cluster_domain"]) == (2, 1)
    assert out["web", 2]["dup_keep"] == 1 and out["lit", 5]["dup_cluster_domain"] == 0
    assert make("dedup", {"scope": "global"}).columns[-1] == "dup_cluster_domain"
    # Within domains, the web copies are their own survivors.
    d = tmp_path / "domain"
    d.mkdir()
    per_domain = run_scorer(make("dedup", {}), docs, d)
    assert per_domain["web", 0]["dup_keep"] == 1 and per_domain["web", 1]["dup_keep"] == 1
    assert per_domain["web", 3]["dup_cluster"] == 2 and per_domain["lit", 0]["dup_repeat"] == 2
    assert all(set(c) == set(dedup.Dedup.columns) for c in per_domain.values())


def test_rehydration_weights_and_report():
    table = dedup.parse_repeat("fineweb2")
    sizes = [1, 2, 3, 4, 5, 99, 100, 999, 1000, 5000]
    assert [dedup.repeat_weight(s, table) for s in sizes] == [1, 2, 3, 3, 5, 5, 8, 8, 1, 1]
    assert dedup.repeat_weight(7, dedup.parse_repeat("1:1,2:2,5:4")) == 4
    scorer = make("dedup", {})
    columns = {"dup_cluster": np.array([0, 0, 0, 3, 4], np.float32),
               "dup_cluster_size": np.array([3, 3, 3, 1, 1], np.float32),
               "dup_keep": np.array([1, 0, 0, 1, 1], np.float32),
               "dup_repeat": np.array([3, 0, 0, 1, 1], np.float32)}
    rep = scorer.report("lit", columns, np.array([10, 11, 12, 20, 30]))
    assert rep["removed"] == {"documents": 2, "tokens": 23}
    assert rep["kept"] == {"documents": 3, "tokens": 60}
    assert rep["in_clusters"] == {"documents": 3, "tokens": 33}
    assert rep["rehydrated"] == {"documents": 5.0, "tokens": 80.0}
    assert rep["lsh_threshold"] == pytest.approx((1 / 14) ** (1 / 8), abs=1e-4)


@pytest.mark.parametrize("params,message", [
    ({"ngram": 0}, r"ngram \(words per shingle\) must be a whole number >= 1, not 0"),
    ({"ngram": "2.5"}, "ngram .* must be a whole number >= 1, not '2.5'"),
    ({"bands": 14, "rows": 8, "num_perm": 128}, "num_perm=128 hash functions cannot make 14 "
                                                "bands of 8 rows .*set num_perm=112"),
    ({"rows": 0}, "rows must be a whole number >= 1"),
    ({"method": "simhash"}, "unknown method 'simhash'"),
    ({"scope": "world"}, "unknown scope 'world'"),
    ({"repeat": "2:2"}, "not a rehydration table"),
])
def test_bad_parameters(params, message):
    with pytest.raises(ScorerError, match=message):
        make("dedup", params)


def test_bench_at_toy_size_without_datatrove(tmp_path, capsys):
    """The benchmark's corpus and loam's scores on it. Its near copies have Jaccard >= 0.75
    (at most 2% of >= 100 words replaced), where 14 x 8 LSH finds a pair with probability
    >= 0.83 and on average (the bench's expected_recall) >= 0.95; its far copies have Jaccard
    <= 0.3 (probability < 1e-3 each). So recall >= 0.85 and precision >= 0.9 hold unless the
    hashing or the clustering is broken (a miss or a false merge costs ~2-5% at this size)."""
    from loam.bench import dedup as bench

    report = bench.main(["--documents", "60", "--workdir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    truth = json.loads((tmp_path / "ground_truth.json").read_text())
    near = [c for c in truth if c["duplicate"]]
    assert report["injected_duplicates"] == len(near) >= 10
    assert report["num_documents"] == 60 + len(truth)
    assert report["near_jaccard_min"] >= 0.75 and report["far_jaccard_max"] <= 0.3
    assert report["expected_recall"] >= 0.95
    assert report["loam_recall"] >= 0.85 and report["loam_precision"] >= 0.9
    assert report["loam_docs_per_s"] > 0
    assert report["datatrove_docs_per_s"] is None and report["datatrove_recall"] is None
    # The corpus on disk is what was scored: each copy of the truth is in it, once.
    ids = [json.loads(line)["id"] for line in
           (tmp_path / "corpus" / "corpus.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == report["num_documents"]
    assert {c["id"] for c in truth} <= set(ids)


def test_bench_refuses_bad_settings(capsys):
    from loam.bench import dedup as bench

    for argv, message in [(["--ngram", "0"], "ngram (words per shingle) must be a whole number"),
                          (["--bands", "0"], "bands must be a whole number >= 1"),
                          (["--datatrove_python", "/no/such/python"], "is not an interpreter")]:
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err
