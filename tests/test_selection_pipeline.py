"""The Beam scoring pipeline and its command on real sources: a JSON-lines domain of three
files (one empty document, dropped at preparation) and the bundled code corpus."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data import corpora
from loam.data import sources as sources_lib
from loam.selection import base, heuristics, pipeline, scorers
from loam.selection import score as score_cmd

from helpers import ROOT


def write_web(directory, texts_per_file=(25, 30, 20), empty_at=(1, 4)):
    """Three JSON-lines files of documents of the bundled docs corpus; the record `empty_at`
    (file, line) has no text. Returns the texts in global-index order."""
    docs = corpora.read_documents(corpora.corpus_path("docs"))
    texts = []
    directory.mkdir(parents=True, exist_ok=True)
    for f, n in enumerate(texts_per_file):
        with open(directory / f"part{f}.jsonl", "w") as out:
            for line in range(n):
                doc_id, text = next(docs)
                text = "" if (f, line) == empty_at else text
                out.write(json.dumps({"id": f"{f}-{doc_id}", "text": text}) + "\n")
                texts.append(text)
    return texts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    texts = write_web(tmp / "web")
    config = tmp / "config.py"
    config.write_text(
        "from loam.configs import default\n\n\n"
        "def get_config(arg=''):\n"
        "    c = default.get_config('runlocal')\n"
        f"    c.data.sources = {{'web': 'jsonl:{tmp}/web/*.jsonl', 'code': 'bundled:code'}}\n"
        f"    c.data.prepared_dir = '{tmp}/prepared'\n"
        "    return c\n")
    cat = catalog_lib.Catalog({"web": sources_lib.parse("web", f"jsonl:{tmp}/web/*.jsonl"),
                               "code": sources_lib.parse("code", "bundled:code")},
                              "bundled", prepared_dir=tmp / "prepared")
    return cat, texts, config


def test_heuristic_columns_on_one_and_two_workers(setup):
    cat, texts, _ = setup
    scorer = base.make("heuristic")
    one = pipeline.score(scorer, cat, ["web", "code"], num_workers=1)
    q1 = {d: columns_lib.load(cat, d, "quality") for d in ("web", "code")}
    two = pipeline.score(scorer, cat, ["web", "code"], num_workers=2)
    q2 = {d: columns_lib.load(cat, d, "quality") for d in ("web", "code")}
    for d in ("web", "code"):
        assert np.array_equal(q1[d], q2[d], equal_nan=True)
        assert one[d]["manifest"] == two[d]["manifest"]
    # Each record's value sits at its global index across the three files; the empty record,
    # dropped at preparation, is unscored.
    web = q1["web"]
    assert web.shape == (len(texts),) and int(np.isnan(web).sum()) == 1
    assert np.isnan(web[25 + 4])  # file 1, line 4
    expect = heuristics.score_documents([t for t in texts if t])["quality"]
    assert np.allclose(web[~np.isnan(web)], expect, atol=1e-6)
    # The bundled corpus: the same values it ships (indexed by position in its file).
    with np.load(ROOT / "loam/data/bundled/code.scores.npz") as z:
        shipped = z["quality"]
    assert np.array_equal(q1["code"], shipped)
    m = one["web"]["manifest"]
    prepared = cat.prepared("web")
    assert m["scorer"] == "heuristic" and "quality" in m["columns"]
    assert m["source_fingerprint"] == prepared.source_fingerprint
    assert m["records"] == len(texts) and m["documents"] == len(texts) - 1
    # The report, beside the columns.
    report = json.loads((prepared.path / "columns" / "heuristic.report.json").read_text())
    assert report == one["web"]["report"]
    assert report["documents"] == len(texts) - 1
    assert report["tokens"] == int(columns_lib.doc_tokens(prepared).sum())
    assert report["quality_deciles"][5] == pytest.approx(float(np.median(expect)), abs=1e-4)


@base.register
@dataclasses.dataclass
class Failing(base.PerDocument):
    """Gives `quality` a value, then fails on the 40th document of the web domain."""
    name = "failing_for_test"
    columns = ("quality",)

    def score(self, doc):
        if doc.domain == "web" and doc.index == 40:
            raise RuntimeError("scorer failed on document 40")
        return {"quality": -1.0}


def test_a_failed_run_leaves_the_columns_as_they_were(setup):
    cat, _, _ = setup
    path = cat.prepared("web").path / "columns" / "quality.npz"
    if not path.exists():
        pipeline.score(base.make("heuristic"), cat, ["web"], num_workers=1)
    before = path.read_bytes()
    with pytest.raises(Exception, match="scorer failed on document 40"):
        pipeline.score(Failing(), cat, ["web"], num_workers=1)
    assert path.read_bytes() == before
    assert np.nanmin(columns_lib.load(cat, "web", "quality")) >= 0
    assert not list(cat.prepared("web").path.parent.glob(".score-*"))


def _score(*args):
    return subprocess.run([sys.executable, "-m", "loam.selection.score", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.mark.e2e
def test_command_scores_a_configured_domain(setup):
    cat, _, config = setup
    proc = _score("--scorer", "random", f"--config={config}", "--domains", "web",
                  "--num_workers", "1")
    assert proc.returncode == 0, proc.stderr
    assert "web" in proc.stdout and "random mean" in proc.stdout
    got = columns_lib.load(cat, "web", "random")
    with open(config.parent / "web" / "part0.jsonl") as f:
        first = json.loads(f.readline())["id"]
    assert got[0] == pytest.approx(scorers.id_uniform(first))


@pytest.mark.parametrize("args, message", [
    (["--scorer", "nope"], "unknown scorer 'nope'"),
    (["--scorer", "random", "--param", "depth=3"], "has no parameter(s) ['depth']"),
    (["--scorer", "random", "--domains", "poetry"], "unknown domain 'poetry'"),
    (["--scorer", "model"], "needs --param workdir=RUN"),
])
def test_command_refuses_bad_input(setup, capsys, args, message):
    _, _, config = setup
    with pytest.raises(SystemExit) as e:
        score_cmd.main(["score", *args, f"--config={config}"])
    assert e.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error:") and message in lines[-1]
