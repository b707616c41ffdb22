"""ZIP-FIT: gzip compression alignment to a target set, as a Beam scorer."""

import gzip
import json

import numpy as np
import pytest

from loam.data import corpora
from loam.selection import zipfit
from loam.selection.base import Doc, ScorerError

from helpers import run_scorer


def C(s: str) -> int:
    return len(gzip.compress(s.encode(), compresslevel=9, mtime=0))


def test_against_direct_gzip(tmp_path):
    targets = ["the quick brown fox jumps over the lazy dog",
               "a quick brown dog jumps over the lazy fox",
               "def f(x):\n    return x + 1\n"]
    raw = ["the quick brown fox jumps over the lazy cat", "import os\nprint(os.getcwd())\n", ""]
    path = tmp_path / "target.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in targets))

    def direct(x):
        ncds = [(C(x + y) - min(C(x), C(y))) / max(C(x), C(y)) for y in targets]
        return 1 - sum(ncds) / len(ncds)

    scorer = zipfit.ZipFit(target=str(path))
    scorer.check(None)
    got = run_scorer(scorer, [Doc("web", i, f"d{i}", "train", t, 1) for i, t in enumerate(raw)],
                     tmp_path)
    for i, x in enumerate(raw):
        assert got["web", i]["zipfit_align"] == pytest.approx(direct(x), abs=1e-12)
    # The near-copy of a target aligns best, and NCD of a text with itself is small.
    assert got["web", 0]["zipfit_align"] > got["web", 1]["zipfit_align"]
    assert zipfit.ncd(targets[0].encode(), targets[0].encode()) < 0.2


def test_real_corpora_and_target_sample(tmp_path):
    """Code files align better with code than documentation sections do; max_targets takes
    the same examples whatever order they are read in."""
    code = list(corpora.read_documents(corpora.corpus_path("code")))[:8]
    docs = list(corpora.read_documents(corpora.corpus_path("docs")))[:8]
    records = [Doc("code", i, d, "train", t, 1) for i, (d, t) in enumerate(code)]
    records += [Doc("docs", i, d, "train", t, 1) for i, (d, t) in enumerate(docs)]
    scorer = zipfit.ZipFit(target="code:validation", max_targets=6, max_bytes=2048)
    scorer.check(None)
    got = run_scorer(scorer, records, tmp_path)
    a = np.array([got[r.domain, r.index]["zipfit_align"] for r in records])
    assert np.median(a[:8]) > np.median(a[8:])
    texts = [t for i, t in corpora.read_documents(corpora.corpus_path("code"))
             if corpora.is_validation(i)]
    chosen = zipfit.prepare_targets(texts, 6, 2048)
    assert chosen == zipfit.prepare_targets(texts[::-1], 6, 2048) and len(chosen) == 6
    np.testing.assert_allclose(a, [zipfit.alignment(r.text, chosen, 2048) for r in records],
                               atol=1e-12)


def test_bad_parameters(tmp_path):
    with pytest.raises(ScorerError, match="max_targets"):
        zipfit.ZipFit(target="code", max_targets=0).check(None)
    with pytest.raises(ScorerError, match="level"):
        zipfit.ZipFit(target="code", level=12).check(None)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ScorerError, match="has no documents"):
        zipfit.ZipFit(target=str(empty)).check(None)
