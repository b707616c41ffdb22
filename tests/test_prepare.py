"""Preparation (sources -> token shards, on Beam) and the shard reader, on the bundled corpora
and JSON-lines shards made from them: equality with a whole-corpus computation, worker- and
shard-count invariance of the bytes, resumption, and every bad input preparation meets."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from loam.data import corpora, shards, sources
from loam.data import prepare as prep
from loam.data import vocab as vocab_lib
from loam.data.corpora import CorpusError

FIELDS = ("tokens", "offsets", "doc_index", "doc_bytes")


@pytest.fixture(scope="module")
def tok():
    return vocab_lib.get_tokenizer("bundled")


def _bundled(name: str, n: int | None = None) -> list[tuple[str, str]]:
    docs = list(corpora.read_documents(corpora.corpus_path(name)))
    return docs[:n] if n else docs


def _write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _jsonl_source(directory: Path, docs, files: int, domain: str = "web") -> sources.Source:
    """`docs` cut into `files` consecutive JSON-lines files (text under 'body')."""
    bounds = np.linspace(0, len(docs), files + 1).astype(int)
    for i in range(files):
        _write_jsonl(directory / f"part-{i:03d}.jsonl",
                     [{"id": d, "body": t} for d, t in docs[bounds[i]:bounds[i + 1]]])
    return sources.parse(domain, {"source": f"jsonl:{directory}/*.jsonl", "text_field": "body"})


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixed_docs():
    """Documents of two bundled domains, ids kept (they are unique across the two)."""
    return _bundled("literature", 150) + _bundled("docs", 250)


# ------------------------------------------------------------------------------ the default job

def _whole_corpus(name: str, tok) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """The arrays of a bundled domain computed the plain way, the whole corpus in memory at once
    (what the trainer's cache did before preparation existed): the reference the streaming,
    sharded preparation must equal."""
    docs = _bundled(name)
    kept = [(i, d, t) for i, (d, t) in enumerate(docs) if t.strip()]
    ids = tok.encode([t for _, _, t in kept])
    out = {}
    for split in shards.SPLITS:
        sel = [k for k, (_, d, _) in enumerate(kept)
               if corpora.is_validation(d) == (split == "validation")]
        lengths = np.array([len(ids[k]) + 1 for k in sel], np.int64)
        tokens = np.concatenate([np.append(ids[k], tok.eos_id) for k in sel]).astype(np.int64)
        out[split] = {"tokens": tokens, "offsets": np.concatenate([[0], np.cumsum(lengths)]),
                      "doc_index": np.array([kept[k][0] for k in sel]),
                      "doc_bytes": np.array([len(kept[k][2].encode()) for k in sel])}
    return out, len(docs) - len(kept)


def test_bundled_domains_equal_the_whole_corpus_computation(tok, tmp_path):
    for name in corpora.DOMAIN_NAMES:
        src = sources.parse(name, f"bundled:{name}")
        domain = prep.ensure_prepared(src, tok, tmp_path / "prepared")
        want, dropped = _whole_corpus(name, tok)
        assert domain.dtype == np.uint16 and domain.manifest["eos_id"] == tok.eos_id
        for split in shards.SPLITS:
            new = domain.split(split)
            for f in FIELDS:
                np.testing.assert_array_equal(getattr(new, f), want[split][f],
                                              err_msg=f"{name}/{split}/{f}")
            assert domain.num_tokens(split) == want[split]["tokens"].shape[0]
            assert domain.num_documents(split) == want[split]["doc_index"].shape[0]
        assert domain.dropped_documents == dropped


def test_blocks_cover_the_split_in_whole_documents(tok, tmp_path, mixed_docs):
    src = _jsonl_source(tmp_path / "web", mixed_docs, 3)
    domain = prep.ensure_prepared(src, tok, tmp_path / "prepared")
    assert [s["base"] for s in domain.manifest["shards"]] == [0, 133, 266]
    whole = domain.split("train")
    blocks = domain.blocks("train", 20_000)
    assert len(blocks) > 3 and {b.shard for b in blocks} == {0, 1, 2}
    for b in blocks:
        assert b.num_tokens <= 20_000 or b.num_documents == 1
        assert b.offsets[0] == 0 and b.offsets[-1] == b.num_tokens == b.tokens.shape[0]
        assert isinstance(b.tokens, np.memmap)
    for f in (*FIELDS[1:], "doc_hash"):
        got = np.concatenate([getattr(b, f) for b in blocks]) if f != "offsets" else \
            np.concatenate([[0], np.cumsum(np.concatenate([b.lengths for b in blocks]))])
        np.testing.assert_array_equal(got, getattr(whole, f), err_msg=f)
    np.testing.assert_array_equal(np.concatenate([b.tokens for b in blocks]), whole.tokens)
    # Global doc_index: the record's position in the files read one after the other.
    ids = [d for d, _ in mixed_docs]
    assert [ids[i] for i in whole.doc_index] == [
        d for d in ids if not corpora.is_validation(d)]
    big = domain.blocks("train", 1)  # every document alone
    assert len(big) == domain.num_documents("train")


def test_same_documents_in_other_shard_counts_give_the_same_split(tok, tmp_path, mixed_docs):
    splits = []
    for files in (1, 4):
        src = _jsonl_source(tmp_path / f"web{files}", mixed_docs, files)
        d = prep.ensure_prepared(src, tok, tmp_path / "prepared")
        assert len(d.manifest["shards"]) == files
        splits.append({s: d.split(s) for s in shards.SPLITS})
    for s in shards.SPLITS:
        for f in (*FIELDS, "doc_hash"):
            np.testing.assert_array_equal(getattr(splits[0][s], f), getattr(splits[1][s], f))


# ------------------------------------------------------------------------------ Beam

def test_beam_bytes_do_not_depend_on_workers_and_equal_in_process(tok, tmp_path, mixed_docs):
    srcs = {"web": _jsonl_source(tmp_path / "web", mixed_docs, 4),
            "code": sources.parse("code", "bundled:code")}
    trees = []
    for workers in (1, 2):
        root = tmp_path / f"beam{workers}"
        out = prep.prepare(srcs, tok, root, num_workers=workers)
        assert list(out) == ["web", "code"]
        trees.append(_tree(root))
    assert trees[0] == trees[1]
    assert sum(k.endswith("shard.json") for k in trees[0]) == 5
    assert not [k for k in trees[0] if "tmp" in k or k.startswith(".prepare")]
    for src in srcs.values():  # the trainer's in-process path writes the same bytes
        prep.ensure_prepared(src, tok, tmp_path / "inproc")
    assert _tree(tmp_path / "inproc") == trees[0]


def test_beam_reports_a_bad_line_and_keeps_the_other_shards(tok, tmp_path, mixed_docs):
    src = _jsonl_source(tmp_path / "web", mixed_docs, 3)
    bad = tmp_path / "web" / "part-001.jsonl"
    good = bad.read_text()
    bad.write_text(good + "{not json\n")
    root = tmp_path / "prepared"
    with pytest.raises(CorpusError, match=r"part-001\.jsonl:134: not valid JSON.*skip_bad_lines"):
        prep.prepare({"web": src}, tok, root, num_workers=1)
    path = Path(prep.prepared_path(src, tok, root))
    assert not (path / "manifest.json").exists() and not (path / "shards/00001").exists()
    assert all((path / f"shards/{i:05d}/shard.json").exists() for i in (0, 2))
    skipping = sources.parse("web", {**src.to_json(), "skip_bad_lines": True})
    out = prep.prepare({"web": skipping}, tok, root, num_workers=1)["web"]
    assert out.manifest["skipped_bad_lines"] == out.manifest["shards"][1]["skipped_bad_lines"] == 1
    assert out.num_documents("train") + out.num_documents("validation") == len(mixed_docs)


def test_resume_keeps_complete_shards_and_redoes_the_rest(tok, tmp_path, mixed_docs):
    src = _jsonl_source(tmp_path / "web", mixed_docs, 4)
    root = tmp_path / "prepared"
    path = Path(prep.ensure_prepared(src, tok, root).path)
    before = _tree(path)
    stat = {i: os.stat(path / f"shards/{i:05d}/train.tokens") for i in range(4)}
    (path / "manifest.json").unlink()
    shutil.rmtree(path / "shards/00001")                       # a shard never written
    (path / "shards/00002/shard.json").unlink()                 # half-written: no shard.json
    (path / "shards/00002/train.tokens").write_bytes(b"garbage")
    fake = path / "shards/.00003.tmp-interrupted"               # an interrupted run's temp dir
    fake.mkdir()
    (fake / "train.tokens").write_bytes(b"partial")
    with pytest.raises(CorpusError, match="not prepared yet"):  # not trusted as it is
        prep.ensure_prepared(src, tok, root, auto_max_bytes=1)
    prep.prepare({"web": src}, tok, root, num_workers=1)
    assert _tree(path) == before  # the half-written shard redone, the missing one written
    assert not fake.exists()
    for i in (0, 3):
        now = os.stat(path / f"shards/{i:05d}/train.tokens")
        assert (now.st_ino, now.st_mtime_ns) == (stat[i].st_ino, stat[i].st_mtime_ns)


# ------------------------------------------------------------------------------ bad input

def test_changed_source_is_not_reused(tok, tmp_path, mixed_docs):
    src = _jsonl_source(tmp_path / "web", mixed_docs[:100], 2)
    root = tmp_path / "prepared"
    first = prep.ensure_prepared(src, tok, root)
    part = tmp_path / "web" / "part-001.jsonl"
    part.write_text(part.read_text() + json.dumps({"id": "new", "body": "added later"}) + "\n")
    second = prep.ensure_prepared(src, tok, root)
    assert second.path != first.path
    assert second.manifest["records"] == first.manifest["records"] + 1
    with pytest.raises(CorpusError, match=r"has changed since.*python -m loam\.data\.prepare"):
        prep.ensure_prepared(src, tok, first.path)  # config.data.prepared_dir = that domain
    with pytest.raises(CorpusError, match="has changed since"):
        prep.open_prepared(first.path / "manifest.json", src, tok)
    # Files changed between the shards and the manifest: no manifest for the mixture.
    fingerprint = sources.fingerprint(src)
    units = sources.units(src)
    path = tmp_path / "midway"
    metas = [prep.prepare_unit(u, tok, path) for u in units]
    part.write_text(part.read_text() + json.dumps({"id": "newer", "body": "later"}) + "\n")
    with pytest.raises(CorpusError, match="changed while it was being prepared"):
        prep.finalize_domain(src, tok, path, metas, units, fingerprint)
    assert not (path / "manifest.json").exists()


def test_cache_of_another_tokenizer_is_not_used(tok, tmp_path, mixed_docs):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator([t for _, t in mixed_docs[:50]], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    other = vocab_lib.get_tokenizer(f"hf:{tmp_path / 'tokenizer.json'}")
    src = sources.parse("literature", "bundled:literature")
    root = tmp_path / "prepared"
    mine = prep.ensure_prepared(src, tok, root)
    theirs = prep.ensure_prepared(src, other, root)
    assert theirs.path != mine.path and theirs.tokenizer_fingerprint == other.fingerprint
    assert theirs.manifest["eos_id"] == other.eos_id
    train = theirs.split("train")
    assert np.all(train.tokens[train.offsets[1:] - 1] == other.eos_id)
    assert int(train.tokens.max()) < other.vocab_size
    with pytest.raises(CorpusError, match="prepared with the tokenizer 'bundled'"):
        prep.ensure_prepared(src, other, mine.path)


def test_duplicate_ids_name_both_records(tok, tmp_path, mixed_docs):
    docs = mixed_docs[:60] + [(mixed_docs[5][0], "the same id again")]
    src = _jsonl_source(tmp_path / "web", docs, 3)
    pattern = (rf"document id '{mixed_docs[5][0]}' appears twice: record 6 of part-000\.jsonl "
               r"\(shard 00000\) and record 21 of part-002\.jsonl \(shard 00002\).*id_field")
    with pytest.raises(CorpusError, match=pattern):
        prep.ensure_prepared(src, tok, tmp_path / "a")
    with pytest.raises(CorpusError, match=pattern):
        prep.prepare({"web": src}, tok, tmp_path / "b", num_workers=1)
    path = Path(prep.prepared_path(src, tok, tmp_path / "b"))
    assert not (path / "manifest.json").exists() and (path / "shards/00002/shard.json").exists()


def test_empty_documents_are_dropped_and_counted(tok, tmp_path):
    records = [{"id": "a", "text": "first"}, {"id": "b", "text": "  \n\t"},
               {"id": "c", "text": ""}, {"id": "d", "text": "fourth"}]
    _write_jsonl(tmp_path / "web" / "x.jsonl", records)
    src = sources.parse("web", f"jsonl:{tmp_path}/web/*.jsonl")
    domain = prep.ensure_prepared(src, tok, tmp_path / "prepared")
    m = domain.manifest
    assert (m["records"], m["dropped_empty"]) == (4, 2)
    assert m["splits"]["train"]["documents"] + m["splits"]["validation"]["documents"] == 2
    assert sorted(np.concatenate([domain.split(s).doc_index for s in shards.SPLITS])) == [0, 3]


@pytest.mark.parametrize("texts, why", [
    (["", "   "], "all empty"),
    ([], "holds no documents"),
])
def test_a_domain_left_without_documents_is_refused(tok, tmp_path, texts, why):
    _write_jsonl(tmp_path / "web" / "x.jsonl", [{"text": t} for t in texts])
    src = sources.parse("web", f"jsonl:{tmp_path}/web/*.jsonl")
    with pytest.raises(CorpusError, match=f"{why}.*drop the domain"):
        prep.ensure_prepared(src, tok, tmp_path / "prepared")
    path = Path(prep.prepared_path(src, tok, tmp_path / "prepared"))
    assert not (path / "manifest.json").exists()


def test_large_source_names_the_prepare_command(tok, tmp_path, mixed_docs):
    src = _jsonl_source(tmp_path / "web", mixed_docs[:50], 2)
    root = tmp_path / "prepared"
    with pytest.raises(CorpusError, match=r"python -m loam\.data\.prepare --config FILE"):
        prep.ensure_prepared(src, tok, root, auto_max_bytes=10_000)
    assert not root.exists()
    prep.prepare({"web": src}, tok, root, num_workers=1)
    assert prep.ensure_prepared(src, tok, root, auto_max_bytes=10_000).num_tokens() > 0


def test_damaged_or_unfinished_preparation_is_refused(tok, tmp_path):
    with pytest.raises(CorpusError, match="not a prepared domain"):
        shards.open_prepared(tmp_path)
    src = sources.parse("dialogue", "bundled:dialogue")
    domain = prep.ensure_prepared(src, tok, tmp_path / "prepared")
    (domain.path / "shards/00000/train.tokens").write_bytes(b"\0" * 10)
    with pytest.raises(CorpusError, match="holds 10 bytes.*prepare again"):
        shards.open_prepared(domain.path).split("train")


# ------------------------------------------------------------------------------ object stores

def test_prepared_on_a_url_filesystem_reads_the_same(tok, tmp_path, monkeypatch, mixed_docs):
    import fsspec

    monkeypatch.setenv("LOAM_CACHE_DIR", str(tmp_path / "cache"))
    src = _jsonl_source(tmp_path / "web", mixed_docs[:80], 2)
    url = f"memory://loam-test-{os.getpid()}/prepared"
    try:
        remote = prep.ensure_prepared(src, tok, url)
        local = prep.ensure_prepared(src, tok, tmp_path / "prepared")
        assert remote.origin.startswith("memory://") and remote.path.is_relative_to(
            tmp_path / "cache")
        assert _tree(remote.path) == _tree(local.path)
        again = prep.ensure_prepared(src, tok, url)  # complete: opened, not redone
        assert again.path == remote.path
    finally:
        fsspec.filesystem("memory").rm(f"/loam-test-{os.getpid()}", recursive=True)


# ------------------------------------------------------------------------------ the command

def test_command_splits_beam_options():
    ours, beam = prep.split_beam_args(
        ["--config", "c.py:x", "--runner=DataflowRunner", "--project", "p", "--num_workers=3",
         "--config.data.tokenizer", "bundled", "--temp_location=gs://b/t", "--save_main_session",
         "--prepared_dir", "gs://b/p"])
    assert ours == ["--config", "c.py:x", "--runner=DataflowRunner", "--num_workers=3",
                    "--config.data.tokenizer", "bundled", "--prepared_dir", "gs://b/p"]
    assert beam == ["--project", "p", "--temp_location=gs://b/t", "--save_main_session"]


def _config_file(tmp_path, sources_literal: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text("from loam.configs import default\n\n\ndef get_config(arg=None):\n"
                    "    c = default.get_config(arg)\n"
                    f"    c.data.sources = {sources_literal}\n    return c\n")
    return path


def test_command_prints_counts_and_bad_input_is_one_line(tok, tmp_path, capsys, mixed_docs):
    _jsonl_source(tmp_path / "web", mixed_docs[:40], 2)
    cfg = _config_file(tmp_path, f"{{'web': {{'source': 'jsonl:{tmp_path}/web/*.jsonl', "
                                 "'text_field': 'body'}, 'code': 'bundled:code'}")
    root = tmp_path / "prepared"
    out = prep.main(["prepare", f"--config={cfg}", f"--prepared_dir={root}", "--num_workers=1"])
    assert list(out) == ["web", "code"]
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["domain", "documents", "tokens"]
    web = lines[1].split()
    assert web[0] == "web" and int(web[1]) + int(web[3]) == 40 and web[5:7] == ["0", "0"]
    _write_jsonl(tmp_path / "web" / "part-002.jsonl", [{"id": mixed_docs[0][0], "body": "x"}])
    with pytest.raises(SystemExit) as e:
        prep.main(["prepare", f"--config={cfg}", f"--prepared_dir={root}", "--num_workers=1"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: domain 'web': document id") and "appears twice" in err


# ------------------------------------------------------------------------------ the benchmark

BENCH_KEYS = ("corpus_bytes", "tokens_per_s_1_worker", "tokens_per_s_2_workers",
              "plain_loop_tokens_per_s", "prepare_peak_rss_mb_10pct",
              "prepare_peak_rss_mb_100pct", "stream_batches_per_s_large",
              "stream_batches_per_s_bundled", "stream_rss_mb_large", "stream_rss_mb_bundled")


@pytest.mark.e2e
def test_bench_prints_its_keys_at_small_scale(tmp_path, monkeypatch, capsys):
    from loam.bench import prepare as bench

    monkeypatch.setenv("LOAM_CACHE_DIR", str(tmp_path / "cache"))
    bench.main(["--quick", "--workdir", str(tmp_path / "bench"), "--batch_size", "4",
                "--seq_len", "64"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in BENCH_KEYS:
        assert isinstance(report[key], (int, float)) and report[key] > 0, key
    assert "replicas" in report["corpus"] and report["tokens"] > 0
    assert not list((tmp_path / "bench").glob("prepared-*"))  # scratch removed
