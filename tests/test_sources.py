"""Sources (loam/data/sources): every file kind reads back exactly the documents written, made
from the bundled corpora; bundled sources read as loam.data.corpora does; fingerprints follow the
files; every bad input is one CorpusError naming the file (and line)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import uuid

import ml_collections
import pytest

from loam.data import corpora, sources
from loam.data.corpora import CorpusError
from loam.data.sources import files


def bundled(domain, n=None):
    docs = list(corpora.read_documents(corpora.corpus_path(domain, corpora.BUNDLED_DIR)))
    return docs if n is None else docs[:n]


def jsonl_bytes(records) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)


def zst(data: bytes, frames=1) -> bytes:
    import zstandard
    step = -(-len(data) // frames)
    c = zstandard.ZstdCompressor()
    return b"".join(c.compress(data[i:i + step]) for i in range(0, len(data), step))


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read(domain, spec, **kw):
    return list(sources.read_documents(sources.parse(domain, spec), **kw))


# --- bundled ---------------------------------------------------------------------------------

def test_bundled_reads_as_corpora_and_is_the_default():
    srcs = sources.from_config(ml_collections.ConfigDict({"data": {"dir": ""}}))
    assert list(srcs) == list(corpora.DOMAIN_NAMES)
    for name, src in srcs.items():
        assert (src.kind, src.target, src.options) == ("bundled", name, ())
        stats: dict[str, int] = {}
        [unit] = sources.units(src)
        got = list(sources.read_unit(unit, stats))
        assert got == list(corpora.read_documents(corpora.corpus_path(name)))
        assert stats == {"records": len(got), "skipped_bad_lines": 0}
    # empty sources also mean the five bundled corpora; config.data.dir becomes their data_dir
    c = ml_collections.ConfigDict({"data": {"dir": "/corpora", "sources": {}}})
    assert [s.option("data_dir") for s in sources.from_config(c).values()] == ["/corpora"] * 5


def test_bundled_data_dir_and_fingerprint_follow_the_content(tmp_path, monkeypatch):
    src = sources.parse("code", "bundled:code")
    before = sources.fingerprint(src)
    assert sources.fingerprint(src) == before
    copy = tmp_path / "corpora"
    shutil.copytree(corpora.BUNDLED_DIR, copy)  # new mtimes, same bytes
    monkeypatch.setenv("LOAM_DATA_DIR", str(copy))
    assert sources.fingerprint(src) == before
    docs = bundled("code", 5)
    corpora.write_documents(copy / "code.jsonl.gz", docs)
    assert sources.fingerprint(src) != before
    assert read("code", "bundled:code") == docs
    monkeypatch.delenv("LOAM_DATA_DIR")
    assert read("code", {"source": "bundled:code", "data_dir": str(copy)}) == docs
    with pytest.raises(CorpusError, match="does not exist.*loam.data.build"):
        sources.units(sources.parse("code", {"source": "bundled:code",
                                             "data_dir": str(tmp_path / "none")}))
    with pytest.raises(CorpusError, match="literature, dialogue, code, docs, reference"):
        sources.parse("web", "bundled:web")


# --- config, parsing -------------------------------------------------------------------------

def test_from_config_keeps_order_and_options(tmp_path):
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    c.data.dir = ""
    c.data.sources = ml_collections.ConfigDict()
    c.data.sources.web = "jsonl:web/*.jsonl"
    c.data.sources.code = {"source": "text:repo/**/*.py", "skip_bad_lines": True}
    c.data.sources.books = "bundled:literature"
    srcs = sources.from_config(c)
    assert list(srcs) == ["web", "code", "books"]  # the config's order, not sorted
    code = srcs["code"]
    assert code.option("skip_bad_lines") is True and code.option("text_field", "x") == "x"
    assert code.describe() == 'text:repo/**/*.py {"skip_bad_lines": true}'
    assert srcs["web"].describe() == "jsonl:web/*.jsonl"
    assert sources.parse("code", code.to_json()) == code
    assert len({code, sources.parse("code", code.to_json())}) == 1  # hashable
    assert list(sources.from_config({"data": {"sources": {"b": "jsonl:x", "a": "jsonl:y"}}})) \
        == ["b", "a"]
    for bad in ("", "a b", "a/b", "a:b", 3):
        with pytest.raises(CorpusError, match="domain name"):
            sources.from_config({"data": {"sources": {bad: "bundled:code"}}})
    with pytest.raises(CorpusError, match="unknown source kind 'csv'.*bundled, jsonl, parquet, "
                                          "text, tfds, hf, seqio"):
        sources.parse("web", "csv:data.csv")
    with pytest.raises(CorpusError, match="not 'kind:target'"):
        sources.parse("web", "data/*.jsonl")
    with pytest.raises(CorpusError, match="unknown option 'text_feild'.*known options: id_field, "
                                          "skip_bad_lines, text_field, validation"):
        sources.parse("web", {"source": "jsonl:x", "text_feild": "body"})
    with pytest.raises(CorpusError, match="unknown option 'text_field'.*data_dir"):
        sources.parse("code", {"source": "bundled:code", "text_field": "body"})
    with pytest.raises(CorpusError, match="needs the key 'source'"):
        sources.parse("web", {"path": "x"})
    with pytest.raises(CorpusError, match="skip_bad_lines' must be true or false"):
        sources.parse("web", {"source": "jsonl:x", "skip_bad_lines": "yes"})


def test_units_pickle():
    [unit] = sources.units(sources.parse("code", "bundled:code"))
    assert pickle.loads(pickle.dumps(unit)) == unit


# --- jsonl -----------------------------------------------------------------------------------

def test_jsonl_shards_plain_gz_zst(tmp_path):
    docs = bundled("docs", 150)
    recs = [{"id": i, "text": t} for i, t in docs]
    write(tmp_path / "web/part-0.jsonl", jsonl_bytes(recs[:40]))
    write(tmp_path / "web/part-1.jsonl.gz", gzip.compress(jsonl_bytes(recs[40:90])))
    write(tmp_path / "web/part-2.jsonl.zst", zst(jsonl_bytes(recs[90:]), frames=3))
    write(tmp_path / "web/README.md", b"not matched")
    src = sources.parse("web", f"jsonl:{tmp_path}/web/*.jsonl*")
    us = sources.units(src)
    assert [(u.index, u.key, u.split) for u in us] == [
        (0, "part-0.jsonl", None), (1, "part-1.jsonl.gz", None), (2, "part-2.jsonl.zst", None)]
    assert list(sources.read_documents(src)) == docs
    train = list(sources.read_documents(src, "train"))
    val = list(sources.read_documents(src, "validation"))
    assert val and len(train) + len(val) == len(docs)
    assert all(corpora.is_validation(i) for i, _ in val)


def test_jsonl_fields_and_ids(tmp_path):
    docs = bundled("reference", 20)
    recs = [{"n": k, "body": t, "meta": {"i": i}} for k, (i, t) in enumerate(docs)]
    path = write(tmp_path / "a.jsonl", jsonl_bytes(recs[:10]) + b"\n" + jsonl_bytes(recs[10:]))
    spec = {"source": f"jsonl:{path}", "text_field": "body", "id_field": "n"}
    assert read("r", spec) == [(str(k), t) for k, (_, t) in enumerate(docs)]
    # no id field: <unit key>:<line> (line 11 is blank)
    got = read("r", {"source": f"jsonl:{path}", "text_field": "body"})
    assert [i for i, _ in got][9:12] == ["a.jsonl:10", "a.jsonl:12", "a.jsonl:13"]
    assert [t for _, t in got] == [t for _, t in docs]
    # empty texts are records too
    write(tmp_path / "e.jsonl", jsonl_bytes([{"text": ""}, {"text": "x", "id": "b"}]))
    assert read("e", f"jsonl:{tmp_path}/e.jsonl") == [("e.jsonl:1", ""), ("b", "x")]


def test_relative_and_absolute_globs(tmp_path, monkeypatch):
    docs = bundled("dialogue", 30)
    for k in range(3):
        write(tmp_path / f"data/s{k}.jsonl", jsonl_bytes(
            [{"id": i, "text": t} for i, t in docs[k * 10:(k + 1) * 10]]))
    monkeypatch.chdir(tmp_path)
    rel = sources.parse("d", "jsonl:data/*.jsonl")
    absolute = sources.parse("d", f"jsonl:{tmp_path}/data/*.jsonl")
    assert list(sources.read_documents(rel)) == list(sources.read_documents(absolute)) == docs
    assert [u.key for u in sources.units(rel)] == [u.key for u in sources.units(absolute)]
    assert read("d", "jsonl:data/s1.jsonl") == docs[10:20]
    monkeypatch.chdir(tmp_path / "data")
    assert read("d", "jsonl:*.jsonl") == docs
    with pytest.raises(CorpusError, match=f"'data/\\*.jsonl' matches no file.*{tmp_path}/data"):
        sources.units(rel)


def test_fingerprint_follows_files_and_options(tmp_path):
    docs = bundled("docs", 20)
    a = write(tmp_path / "c/a.jsonl", jsonl_bytes([{"id": i, "text": t} for i, t in docs[:10]]))
    write(tmp_path / "c/b.jsonl", jsonl_bytes([{"id": i, "text": t} for i, t in docs[10:]]))
    src = sources.parse("d", f"jsonl:{tmp_path}/c/*.jsonl")
    fp = sources.fingerprint(src)
    assert sources.fingerprint(src) == fp
    assert sources.fingerprint(sources.parse("other", f"jsonl:{tmp_path}/c/*.jsonl")) == fp
    assert sources.fingerprint(sources.parse(
        "d", {"source": f"jsonl:{tmp_path}/c/*.jsonl", "skip_bad_lines": True})) != fp
    a.write_bytes(a.read_bytes() + jsonl_bytes([{"id": "new", "text": "more"}]))
    fp2 = sources.fingerprint(src)
    assert fp2 != fp
    c = write(tmp_path / "c/c.jsonl", b"")
    fp3 = sources.fingerprint(src)
    assert fp3 not in (fp, fp2)
    c.unlink()
    assert sources.fingerprint(src) == fp2


def test_jsonl_bad_input(tmp_path):
    def error(lines, *match, name="bad.jsonl", **opts):
        path = write(tmp_path / name, b"".join(lines))
        with pytest.raises(CorpusError) as e:
            read("w", {"source": f"jsonl:{path}", **opts})
        for m in match:
            assert m in str(e.value), str(e.value)
        return str(e.value)

    good = b'{"id": "a", "text": "x"}\n'
    p = tmp_path / "bad.jsonl"
    error([good, good, b'{"id": "c", "text": \n'], f"{p}:3", "not valid JSON", "skip_bad_lines")
    error([good, b"[1, 2]\n"], f"{p}:2", "not an object")
    msg = error([good, b'{"id": "b", "body": "y", "n": 1}\n'], f"{p}:2", "no text field 'text'",
                "'id', 'body', 'n'", "text_field")
    assert "keys" in msg
    error([b'{"id": "b", "text": 3}\n'], f"{p}:1", "'text' is a int, not a string")
    error([b'{"id": "b", "text": null}\n'], f"{p}:1", "NoneType")
    error([good, b'{"id": "b", "text": "caf\xe9"}\n'], f"{p}:2", "not UTF-8")
    error([b'{"id": 1.5, "text": "x"}\n'], f"{p}:1", "ids must be strings or integers")
    error([b'{"key": 1, "text": "x"}\n', b'{"text": "x"}\n'], f"{p}:2", "no id field 'key'",
          "remove id_field", id_field="key", text_field="text")
    gz = gzip.compress(jsonl_bytes([{"id": str(i), "text": "t" * 500} for i in range(200)]))
    error([gz[: len(gz) // 2]], f"{tmp_path / 'cut.jsonl.gz'}:", "gzip", name="cut.jsonl.gz")
    error([b"plain text, not gzip\n"], "bad.jsonl.gz:1", "gzip", name="bad.jsonl.gz")
    error([b"plain text, not zstd\n"], "bad.jsonl.zst:1", "zstd", name="bad.jsonl.zst")
    with pytest.raises(CorpusError, match=f"file {tmp_path}/missing.jsonl does not exist"):
        sources.units(sources.parse("w", f"jsonl:{tmp_path}/missing.jsonl"))
    with pytest.raises(CorpusError, match="is a directory; name its files with a glob"):
        sources.units(sources.parse("w", f"jsonl:{tmp_path}"))
    with pytest.raises(CorpusError, match=r"the glob '.*/nothing/\*\*/\*.jsonl' matches no file"):
        sources.units(sources.parse("w", f"jsonl:{tmp_path}/nothing/**/*.jsonl"))


def test_skip_bad_lines_counts(tmp_path, caplog):
    lines = [b'{"id": "a", "text": "one"}\n', b"{oops\n", b'"str"\n', b'{"id": "b"}\n',
             b'{"id": "c", "text": "caf\xe9"}\n', b'{"id": "d", "text": "two"}\n', b"\n"]
    path = write(tmp_path / "x.jsonl.gz", gzip.compress(b"".join(lines)))
    src = sources.parse("w", {"source": f"jsonl:{path}", "skip_bad_lines": True})
    [unit] = sources.units(src)
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING, logger="loam.data.sources.files"):
        got = list(sources.read_unit(unit, stats))
    assert got == [("a", "one"), ("d", "two")]
    assert stats == {"records": 2, "skipped_bad_lines": 4}
    assert "skipped 4 bad record(s) in x.jsonl.gz" in caplog.text
    assert f"first: {path}:2: not valid JSON" in caplog.text


# --- parquet ---------------------------------------------------------------------------------

def test_parquet_row_groups_and_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = bundled("literature", 120)
    for k, part in enumerate((docs[:70], docs[70:])):
        table = pa.table({"key": [i for i, _ in part], "content": [t for _, t in part],
                          "n": list(range(len(part)))})
        pq.write_table(table, tmp_path / f"p{k}.parquet", row_group_size=16)
    assert pq.ParquetFile(tmp_path / "p0.parquet").num_row_groups == 5
    glob = f"parquet:{tmp_path}/*.parquet"
    assert read("l", {"source": glob, "text_field": "content", "id_field": "key"}) == docs
    got = read("l", {"source": glob, "text_field": "content"})  # no 'id' column: row numbers
    assert [i for i, _ in got][68:72] == ["p0.parquet:68", "p0.parquet:69", "p1.parquet:0",
                                          "p1.parquet:1"]
    ints = read("l", {"source": glob, "text_field": "content", "id_field": "n"})
    assert [i for i, _ in ints][:2] == ["0", "1"] and [t for _, t in ints] == [t for _, t in docs]
    with pytest.raises(CorpusError, match=r"p0.parquet: no text column 'text' \(columns: 'key', "
                                          r"'content', 'n'\); set the source option text_field"):
        read("l", glob)
    with pytest.raises(CorpusError, match="p0.parquet: no id column 'id'"):
        read("l", {"source": glob, "text_field": "content", "id_field": "id"})
    with pytest.raises(CorpusError, match="text column 'n' has type int64"):
        read("l", {"source": glob, "text_field": "n"})
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    nulls = f"parquet:{tmp_path}/nulls.parquet"
    with pytest.raises(CorpusError, match="nulls.parquet: row 1: text column 'text' is null"):
        read("l", nulls)
    stats: dict[str, int] = {}
    [unit] = sources.units(sources.parse("l", {"source": nulls, "skip_bad_lines": True}))
    assert list(sources.read_unit(unit, stats)) == [("nulls.parquet:0", "a"),
                                                     ("nulls.parquet:2", "c")]
    assert stats["skipped_bad_lines"] == 1
    write(tmp_path / "junk.parquet", b"not parquet at all")
    with pytest.raises(CorpusError, match="junk.parquet: cannot read as Parquet"):
        read("l", f"parquet:{tmp_path}/junk.parquet")


# --- text ------------------------------------------------------------------------------------

def make_repo(root, docs):
    """Each document a file in a nested folder; returns the (relative name, text) pairs, sorted."""
    out = []
    for k, (_, text) in enumerate(docs):
        name = f"pkg{k % 3}/{'sub/' * (k % 2)}mod_{k:02d}.py"
        write(root / name, text.encode())
        out.append((name, text))
    write(root / ".git/objects/x.py", b"hidden")
    write(root / "pkg0/notes.txt", b"not matched")
    return sorted(out)


def test_text_folder(tmp_path, monkeypatch):
    docs = make_repo(tmp_path / "repo", bundled("code", 24))
    src = sources.parse("code", f"text:{tmp_path}/repo/**/*.py")
    assert read("code", f"text:{tmp_path}/repo/**/*.py") == docs
    [unit] = sources.units(src)
    assert unit.key == f"{docs[0][0]} .. {docs[-1][0]}"
    monkeypatch.setattr(files, "TEXT_UNIT_FILES", 5)
    us = sources.units(src)
    assert len(us) == 5 and [u.index for u in us] == list(range(5))
    assert [d for u in us for d in sources.read_unit(u)] == docs
    monkeypatch.chdir(tmp_path)
    assert read("code", "text:repo/pkg1/*.py") == [
        (n.removeprefix("pkg1/"), t) for n, t in docs if n.startswith("pkg1/mod")]
    assert read("code", "text:repo/pkg0/notes.txt") == [("notes.txt", "not matched")]


def test_text_bad_files(tmp_path):
    docs = make_repo(tmp_path / "repo", bundled("code", 4))
    write(tmp_path / "repo/pkg1/logo.py", b"\x89PNG\r\n\x1a\n\xff\xd8")
    write(tmp_path / "repo/pkg2/data.py", b"abc\x00\x00def")
    glob = f"text:{tmp_path}/repo/**/*.py"
    with pytest.raises(CorpusError, match=f"{tmp_path}/repo/pkg1/logo.py: not UTF-8.*narrow"):
        read("c", glob)
    stats: dict[str, int] = {}
    [unit] = sources.units(sources.parse("c", {"source": glob, "skip_bad_lines": True}))
    assert list(sources.read_unit(unit, stats)) == docs
    assert stats == {"records": len(docs), "skipped_bad_lines": 2}
    (tmp_path / "repo/pkg1/logo.py").unlink()
    with pytest.raises(CorpusError, match=f"{tmp_path}/repo/pkg2/data.py: a binary file"):
        read("c", glob)


# --- validation split from its own source; URL-addressed files -------------------------------

def test_validation_source(tmp_path):
    docs = bundled("docs", 30)
    write(tmp_path / "train.jsonl", jsonl_bytes([{"id": i, "text": t} for i, t in docs[:20]]))
    write(tmp_path / "val.jsonl", jsonl_bytes([{"key": i, "body": t} for i, t in docs[20:]]))
    src = sources.parse("d", {"source": f"jsonl:{tmp_path}/train.jsonl", "validation": {
        "source": f"jsonl:{tmp_path}/val.jsonl", "text_field": "body", "id_field": "key"}})
    us = sources.units(src)
    assert [(u.index, u.key, u.split) for u in us] == [(0, "train.jsonl", "train"),
                                                       (1, "val.jsonl", "validation")]
    assert list(sources.read_documents(src, "train")) == docs[:20]
    assert list(sources.read_documents(src, "validation")) == docs[20:]
    assert sources.doc_split(us[1], docs[0][0]) == "validation"
    fp = sources.fingerprint(src)
    (tmp_path / "val.jsonl").write_text("")
    assert sources.fingerprint(src) != fp
    with pytest.raises(CorpusError, match="unknown option 'text_feild'"):
        sources.parse("d", {"source": "jsonl:x", "validation": {"source": "jsonl:y",
                                                                "text_feild": "b"}})


def test_url_addressed_files():
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/loam-test-{uuid.uuid4().hex}"
    docs = bundled("docs", 30)
    try:
        fs.pipe(f"{root}/web/a.jsonl", jsonl_bytes([{"id": i, "text": t} for i, t in docs[:10]]))
        fs.pipe(f"{root}/web/b.jsonl.gz",
                gzip.compress(jsonl_bytes([{"id": i, "text": t} for i, t in docs[10:]])))
        fs.pipe(f"{root}/repo/x/y.py", b"print(1)\n")
        fs.pipe(f"{root}/repo/z.py", b"")
        fs.pipe(f"{root}/repo/.hidden/h.py", b"hidden")
        src = sources.parse("web", f"jsonl:memory://{root}/web/*.jsonl*")
        assert [u.key for u in sources.units(src)] == ["a.jsonl", "b.jsonl.gz"]
        assert list(sources.read_documents(src)) == docs
        fp = sources.fingerprint(src)
        assert sources.fingerprint(src) == fp
        fs.pipe(f"{root}/web/c.jsonl", b"")
        assert sources.fingerprint(src) != fp
        assert read("code", f"text:memory://{root}/repo/**/*.py") == [("x/y.py", "print(1)\n"),
                                                                      ("z.py", "")]
        with pytest.raises(CorpusError, match="matches no file"):
            sources.units(sources.parse("web", f"jsonl:memory://{root}/none/*.jsonl"))
    finally:
        fs.rm(root, recursive=True)


def test_reading_jsonl_imports_no_heavy_package(tmp_path):
    write(tmp_path / "a.jsonl.zst", zst(jsonl_bytes([{"text": "hello"}])))
    code = ("import sys; from loam.data import sources as s; "
            f"assert list(s.read_documents(s.parse('w', 'jsonl:{tmp_path}/*.zst'))) == "
            "[('a.jsonl.zst:1', 'hello')]; "
            "print(sorted(m for m in ('tensorflow', 'pyarrow', 'datasets', 'jax', 'seqio') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(corpora.BUNDLED_DIR.parents[2])})
    assert out.stdout.strip() == "[]"
