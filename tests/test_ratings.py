"""Bradley-Terry ratings from pairwise judgments, as a Beam scorer; generated judgments."""

import json

import numpy as np
import pytest

from loam.selection import heuristics, ratings
from loam.selection.base import ScorerError

from helpers import corpus_docs, run_scorer


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_recovers_simulated_scores(tmp_path):
    """Win/loss outcomes drawn from known scores: the fit correlates > 0.95 with them; the
    prior centres the scores; unjudged documents get no value."""
    docs = corpus_docs("reference", 50)
    judged = docs[:40]
    rng = np.random.default_rng(0)
    true = rng.normal(0, 1.5, len(judged))
    a = rng.integers(0, 40, 3000)
    b = (a + rng.integers(1, 40, 3000)) % 40
    a_wins = rng.random(3000) < 1 / (1 + np.exp(-(true[a] - true[b])))
    lines = [{"winner": judged[i].doc_id, "loser": judged[k].doc_id} if w else
             {"winner": judged[k].doc_id, "loser": judged[i].doc_id}
             for i, k, w in zip(a, b, a_wins)]
    scorer = ratings.Ratings(judgments=write_jsonl(tmp_path / "j.jsonl", lines))
    scorer.check(None)
    assert scorer.inputs()["judge"] == "unlabelled"
    got = run_scorer(scorer, docs, tmp_path)
    assert sorted(got) == [("reference", i) for i in range(40)]
    fit = np.array([got["reference", i]["rating"] for i in range(40)])
    assert np.corrcoef(fit, true)[0, 1] > 0.95
    assert abs(fit.mean()) < 1e-6

    # Soft labels at the true probabilities: a near-exact recovery (up to the prior's shrinkage).
    p = 1 / (1 + np.exp(-(true[a] - true[b])))
    s = ratings.fit_bradley_terry(a, b, p, 40, l2=1e-4)
    assert np.corrcoef(s, true)[0, 1] > 0.999


def test_separable_judgments_stay_finite():
    # Document 0 wins every comparison: maximum likelihood diverges, the prior keeps it finite.
    a, b = np.array([0, 0, 1]), np.array([1, 2, 2])
    s = ratings.fit_bradley_terry(a, b, np.ones(3), 3)
    assert np.all(np.isfinite(s)) and s[0] > s[1] > s[2] and s[0] < 100
    with pytest.raises(ScorerError, match="l2 must be > 0"):
        ratings.fit_bradley_terry(a, b, np.ones(3), 3, l2=0.0)


def test_unknown_ids_one_error(tmp_path):
    docs = corpus_docs("reference", 5)
    lines = [{"a": docs[0].doc_id, "b": docs[1].doc_id, "p": 0.7}]
    lines += [{"a": f"nowhere/{i}", "b": docs[2].doc_id, "p": 0.5} for i in range(7)]
    scorer = ratings.Ratings(judgments=write_jsonl(tmp_path / "j.jsonl", lines))
    scorer.check(None)
    with pytest.raises(ScorerError, match=r"7 judged document id\(s\) are not among the scored "
                                        r"documents, e\.g\. 'nowhere/0', 'nowhere/1'"):
        run_scorer(scorer, docs, tmp_path)


def test_bad_judgments(tmp_path):
    def check(records, match, raw=None):
        path = tmp_path / "bad.jsonl"
        if raw is not None:
            path.write_text(raw)
        else:
            write_jsonl(path, records)
        with pytest.raises(ScorerError, match=match):
            ratings.Ratings(judgments=str(path)).check(None)

    check([], "has no judgments")
    check([{"a": "x", "b": "y", "p": float("nan")}], r"bad.jsonl:1: p must be a number in "
                                                     r"\[0, 1\], got nan")
    check([{"a": "x", "b": "y", "p": 0.5}, {"a": "x", "b": "y", "p": 1.5}], "bad.jsonl:2: p must")
    check([{"a": "x", "b": "x", "p": 0.5}], "compared with itself")
    check([{"winner": "x"}], "ids must be strings")
    check(None, "bad.jsonl:1: not JSON", raw="{oops\n")
    with pytest.raises(ScorerError, match="does not exist.*judge --from heuristic"):
        ratings.Ratings(judgments=str(tmp_path / "missing.jsonl")).check(None)
    with pytest.raises(ScorerError, match="NaN or infinite value.*'d1'"):
        ratings.pair_judgments(["d0", "d1"], [0.5, float("nan")], 4, 0, "test")


def test_judge_from_heuristic(tmp_path):
    out = tmp_path / "judgments.jsonl"
    ratings.main(["judge", "--from", "heuristic", "--domains", "docs,reference", "--max_docs",
                  "20", "--pairs", "300", "--out", str(out)])
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(lines) == 300
    assert {r["judge"] for r in lines} == {
        "heuristic:quality (generated, not a human or LLM judge)"}
    docs = corpus_docs("docs", 20) + corpus_docs("reference", 20)
    quality = dict(zip([d.doc_id for d in docs],
                       heuristics.score_documents(d.text for d in docs)["quality"]))
    assert all((r["p"] > 0.5) == (quality[r["a"]] > quality[r["b"]]) for r in lines
               if quality[r["a"]] != quality[r["b"]])
    scorer = ratings.Ratings(judgments=str(out))
    scorer.check(None)
    assert scorer.inputs()["judge"].startswith("heuristic:quality (generated")
    _, fitted = scorer._fit()
    ids = sorted(fitted)
    assert np.corrcoef([fitted[i] for i in ids], [quality[i] for i in ids])[0, 1] > 0.9
