"""The column store of prepared domains (loam.data.columns): written and read back at global
indices, the bundled corpora's shipped columns as fallback, missing and stale columns refused,
and views ordering and keeping documents of a source that is not bundled."""

from __future__ import annotations

import json
import shutil

import ml_collections
import numpy as np
import pytest

from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data import corpora, objectives, views, weights
from loam.data import sources as sources_lib
from loam.data import stream as stream_lib

from helpers import ROOT


def write_jsonl(path, n, skip=0):
    docs = corpora.read_documents(corpora.corpus_path("literature"))
    with open(path, "w") as f:
        for i, (doc_id, text) in enumerate(docs):
            if i >= n + skip:
                break
            if i >= skip:
                f.write(json.dumps({"id": doc_id, "text": text}) + "\n")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("columns")
    (tmp / "books").mkdir()
    write_jsonl(tmp / "books" / "a.jsonl", 40)
    write_jsonl(tmp / "books" / "b.jsonl", 40, skip=40)
    cat = catalog_lib.Catalog({"books": sources_lib.parse("books", f"jsonl:{tmp}/books/*.jsonl"),
                               "code": sources_lib.parse("code", "bundled:code")},
                              "bundled", prepared_dir=tmp / "prepared")
    return tmp, cat


def test_write_and_read_back(store):
    _, cat = store
    p = cat.prepared("books")
    tokens = columns_lib.doc_tokens(p)
    assert tokens.shape == (80,) and np.all(tokens > 0)
    length = tokens.astype(np.float32)
    length[::7] = np.nan  # some documents unscored
    m = columns_lib.write(p, "lengths", {"unit": "tokens"}, {"table": "abc"},
                          {"length": length}, report={"longest": int(tokens.max())})
    got = columns_lib.load(cat, "books", "length")
    assert np.array_equal(got, length, equal_nan=True)
    assert m["scorer"] == "lengths" and m["params"] == {"unit": "tokens"}
    assert m["inputs"] == {"table": "abc"} and m["columns"] == ["length"]
    assert m["records"] == 80 and m["scored"] == {"length": 80 - len(range(0, 80, 7))}
    assert m["source_fingerprint"] == p.source_fingerprint
    assert m["tokenizer_fingerprint"] == p.tokenizer_fingerprint
    on_disk = json.loads((p.path / "columns" / "lengths.json").read_text())
    assert on_disk == m and columns_lib.manifest(cat, "books", "length")["column"] == "length"
    assert json.loads((p.path / "columns" / "lengths.report.json").read_text()) == {
        "longest": int(tokens.max())}
    assert columns_lib.available(cat, "books") == {"length": "lengths"}
    # The recorded inputs: the same ones read, other ones are stale.
    columns_lib.load(cat, "books", "length", inputs={"lengths": {"table": "abc"}})
    with pytest.raises(columns_lib.ColumnError, match="stale: the inputs of scorer 'lengths'"):
        columns_lib.load(cat, "books", "length", inputs={"lengths": {"table": "xyz"}})
    # A malformed write changes nothing.
    before = (p.path / "columns" / "length.npz").read_bytes()
    with pytest.raises(columns_lib.ColumnError, match="needs one value per record"):
        columns_lib.write(p, "lengths", {}, {}, {"length": np.zeros(79)})
    assert (p.path / "columns" / "length.npz").read_bytes() == before


def test_missing_column_names_the_command(store):
    _, cat = store
    with pytest.raises(columns_lib.ColumnError) as e:
        columns_lib.load(cat, "books", "quality")
    assert "score column 'quality' does not exist for domain 'books'" in str(e.value)
    assert "python -m loam.selection.score --scorer" in str(e.value)


def test_columns_of_another_version_of_the_source_are_stale(store):
    tmp, cat = store
    (tmp / "books2").mkdir()
    write_jsonl(tmp / "books2" / "a.jsonl", 40)
    src = sources_lib.parse("books", f"jsonl:{tmp}/books2/*.jsonl")
    old = catalog_lib.Catalog({"books": src}, "bundled", prepared_dir=tmp / "prepared2")
    p = old.prepared("books")
    columns_lib.write(p, "lengths", {}, {}, {"length": columns_lib.doc_tokens(p)})
    write_jsonl(tmp / "books2" / "a.jsonl", 41)  # the source grows by one document
    new = catalog_lib.Catalog({"books": sources_lib.parse("books",
                                                          f"jsonl:{tmp}/books2/*.jsonl")},
                              "bundled", prepared_dir=tmp / "prepared2")
    q = new.prepared("books")
    assert q.path != p.path
    with pytest.raises(columns_lib.ColumnError, match="does not exist"):
        columns_lib.load(new, "books", "length")
    shutil.copytree(p.path / "columns", q.path / "columns")  # columns carried over by hand
    with pytest.raises(columns_lib.ColumnError, match="is stale: it scores another version"):
        columns_lib.load(new, "books", "length")


def test_bundled_columns_without_a_scoring_run(store):
    _, cat = store
    p = cat.prepared("code")
    with np.load(ROOT / "loam/data/bundled/code.scores.npz") as z:
        shipped = {k: z[k] for k in z.files if k != columns_lib.SHA_KEY}
    assert set(columns_lib.available(cat, "code")) == set(shipped)
    assert np.array_equal(columns_lib.load(cat, "code", "quality"), shipped["quality"])
    # A written column takes precedence over the shipped one.
    mine = np.arange(int(p.manifest["records"]), dtype=np.float32)
    columns_lib.write(p, "position", {}, {}, {"quality": mine})
    assert np.array_equal(columns_lib.load(cat, "code", "quality"), mine)
    assert columns_lib.available(cat, "code")["quality"] == "position"


def test_views_order_and_keep_any_prepared_source(store):
    _, cat = store
    p = cat.prepared("books")
    idx = np.arange(int(p.manifest["records"]))
    rank = ((idx * 37) % 80).astype(np.float32)  # a permutation of the documents
    columns_lib.write(p, "rank", {}, {}, {"rank": rank})
    stages = [dict(name="a", start=0, weights={"books": 1.0}, order={"books": "rank:asc"},
                   keep={"books": "rank:0.0:0.5"})]
    c = ml_collections.ConfigDict(dict(steps=10, data=dict(domains=["books"], weights="uniform",
                                                           stages=stages, dir="", sources={}),
                                       optim=dict(schedule="wsd", warmup_steps=1,
                                                  decay_fraction=0.2)))
    c.data.sources = {"books": "jsonl:x"}  # only the names matter to the stages
    source = weights.source_from_config(c)
    stream = stream_lib.MixtureStream(["books"], objectives.get_objective("causal"), source,
                                      seq_len=128, batch_size=4, seed=1, catalog=cat)
    seen = list(dict.fromkeys(int(d) for t in range(8) for row in stream.batch(t)["doc_ids"]
                              for d in row if d >= 0))
    train = np.asarray(cat.split("books", "train").doc_index)
    cut = np.sort(rank[train])[int(0.5 * (train.shape[0] - 1))]
    assert seen and rank[seen].max() <= cut
    assert np.mean(np.diff(rank[seen]) >= 0) > 0.8 and rank[seen[0]] == rank[train].min()
    assert views.load_column("books", "rank", catalog=cat).shape == (80,)
