"""Training on the user's own data: sources named in the config, domain ids in their order, a
chosen tokenizer, refusals when the data under a run changes, and the stream over prepared
shards cut into blocks."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from loam import run as run_lib
from loam.configs import default
from loam.data import catalog as catalog_lib
from loam.data import corpora
from loam.data import stream as stream_lib

from helpers import losses, run_train


def _write_shards(directory, docs, shards: int, suffix=".jsonl.gz"):
    directory.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        part = docs[s::shards]
        data = "".join(json.dumps({"id": f"web-{d}", "body": t}) + "\n" for d, t in part)
        path = directory / f"part-{s:03d}{suffix}"
        if suffix.endswith(".gz"):
            path.write_bytes(gzip.compress(data.encode(), mtime=0))
        else:
            path.write_text(data)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """A 'web' corpus of three gzip'd JSONL shards with its own field names (text under
    'body'), made from two bundled corpora."""
    root = tmp_path_factory.mktemp("own")
    docs = [(f"lit{d}", t) for d, t in corpora.read_documents(corpora.corpus_path("literature"))]
    docs += [(f"doc{d}", t) for d, t in corpora.read_documents(corpora.corpus_path("docs"))]
    _write_shards(root / "web", docs[:600], 3)
    config = root / "own.py"
    config.write_text(
        "from loam.configs import default\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default.get_config(arg)\n"
        f"    c.data.sources = {{'web': {{'source': 'jsonl:{root}/web/*.jsonl.gz', "
        "'text_field': 'body'}, 'code': 'bundled:code'}\n"
        "    return c\n")
    return root, config


def _config(root, **data):
    c = default.get_config("runlocal")
    c.data.sources = {"web": {"source": f"jsonl:{root}/web/*.jsonl.gz", "text_field": "body"},
                      "code": "bundled:code"}
    for k, v in data.items():
        c.data[k] = v
    c, _ = run_lib.resolve_config(c)
    return c


def test_domain_ids_follow_the_sources_order(web):
    root, _ = web
    c = _config(root)
    assert list(c.data.domains) == ["web", "code"]  # every source, in the order written
    assert run_lib.num_domains(c) == 2
    s = run_lib.build_stream(c)
    b = s.global_batch(0)
    ids = set(np.unique(b["domain_ids"]).tolist())
    assert ids <= {0, 1} and len(ids) == 2
    # 'code' is domain 1 here (it is 2 in the bundled five): ids are the config's, not global.
    assert catalog_lib.for_config(c).domain_id("code") == 1


def test_unknown_domain_and_task_names_are_refused(web):
    root, _ = web
    with pytest.raises(run_lib.ConfigError, match="unknown domain 'literature'.*web, code"):
        _config(root, domains=["literature"])
    with pytest.raises(run_lib.ConfigError, match="seqio:loam.code.span_corruption"):
        _config(root, domains=["loam.code.span_corruption"])


def test_blocks_read_every_document_once_per_epoch(web):
    """A domain cut into many blocks: an epoch still reads every training token exactly once,
    and the batch at step t does not depend on which batches were asked for before."""
    root, _ = web
    c = _config(root)
    cat = catalog_lib.for_config(c)
    small = stream_lib.MixtureStream(["web"], "causal", {"web": 1.0}, 64, 8, seed=3,
                                     catalog=cat, block_tokens=4096)
    assert len(small._blocks[0]) > 5
    st = small.epoch_stats(0, 0)
    assert st["tokens"] == cat.num_tokens("web")
    fresh = stream_lib.MixtureStream(["web"], "causal", {"web": 1.0}, 64, 8, seed=3,
                                     catalog=cat, block_tokens=4096)
    rows_per_epoch = st["rows"]
    late = rows_per_epoch // 8 + 3  # a step in the second epoch
    for t in range(late + 1):
        small.global_batch(t)
    a, b = small.global_batch(late), fresh.global_batch(late)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # A whole epoch's documents, in order of consumption, are each document once.
    docs = []
    for t in range(rows_per_epoch // 8):
        d = small.global_batch(t)["doc_ids"]
        docs.extend(np.unique(d[d >= 0]).tolist())
    assert len(set(docs)) > 0.9 * cat.split("web", "train").num_documents


@pytest.mark.e2e
def test_train_on_own_data_then_refuse_changed_data(web, tmp_path):
    root, config = web
    work = tmp_path / "run"
    run_train(work, config=str(config))
    last = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(last["loss_per_domain"]) == ["web", "code"]
    ev = json.loads((work / "eval" / "step_12.json").read_text())
    assert list(ev["per_domain"]) == ["web", "code"]
    assert all(ev["per_domain"][d]["bytes"] > 0 for d in ("web", "code"))
    saved = json.loads((work / "config.json").read_text())
    assert [name for name, _ in saved["data"]["sources"]] == ["web", "code"]

    # An edited source list: refused before anything is written, naming the field.
    edited = tmp_path / "edited.py"
    edited.write_text(config.read_text().replace("'code': 'bundled:code'",
                                                 "'code': 'bundled:docs'"))
    before = (work / "metrics.jsonl").read_text()
    proc = run_train(work, "--config.steps=16", config=str(edited), check=False)
    assert proc.returncode == 1 and "data.sources" in proc.stderr
    assert (work / "metrics.jsonl").read_text() == before

    # The same config, but a source's files changed since the checkpoint: refused, naming it.
    shard = sorted((root / "web").glob("*.jsonl.gz"))[0]
    original, stat = shard.read_bytes(), shard.stat()
    try:
        text = gzip.decompress(original).decode().replace("the", "THE")
        shard.write_bytes(gzip.compress(text.encode(), mtime=0))
        proc = run_train(work, "--config.steps=16", config=str(config), check=False)
        assert proc.returncode == 1 and "'web'" in proc.stderr and "changed" in proc.stderr
        assert (work / "metrics.jsonl").read_text() == before
    finally:
        shard.write_bytes(original)
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # Restored files (as `cp -p` restores them): the run resumes and continues.
    run_train(work, "--config.steps=16", config=str(config))
    assert max(losses(work)) == 16


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["no_match", "bad_json"])
def test_bad_source_is_one_line_and_writes_nothing(tmp_path, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "bad_json":
        (data / "a.jsonl").write_text('{"text": "fine"}\n{"text": "cut\n{"text": "fine"}\n')
    config = tmp_path / "bad.py"
    config.write_text(
        "from loam.configs import default\n\n\n"
        "def get_config(arg=None):\n"
        "    c = default.get_config(arg)\n"
        f"    c.data.sources = {{'mine': 'jsonl:{data}/*.jsonl', 'code': 'bundled:code'}}\n"
        "    return c\n")
    work = tmp_path / "run"
    proc = run_train(work, config=str(config), check=False)
    assert proc.returncode == 1
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1, proc.stderr
    if case == "no_match":
        assert f"{data}/*.jsonl" in err[0] and "matches no file" in err[0]
    else:
        assert "a.jsonl:2" in err[0] and "skip_bad_lines" in err[0]
    assert not (work / "config.json").exists() and not (work / "checkpoints").exists()


def test_a_chosen_tokenizer_sets_the_vocabulary_and_the_data(web, tmp_path):
    """A Hugging Face tokenizer file: the model's vocabulary follows it, the domains are
    prepared with it (separately from the bundled tokenizer's shards) and the batches decode
    back to the documents' text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    root, _ = web
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [t for _, t in corpora.read_documents(corpora.corpus_path("code"))][:100]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))

    c = _config(root, tokenizer=f"hf:{path}")
    cat = run_lib.build_catalog(c)
    assert run_lib.model_config(c).vocab_size == cat.tokenizer.vocab_size == 700 + 100
    bundled = _config(root)
    assert (run_lib.build_catalog(bundled).prepared("code").path
            != cat.prepared("code").path)  # each tokenizer has its own shards
    web = cat.split("web", "train")
    assert np.all(web.tokens[web.offsets[1:] - 1] == cat.tokenizer.eos_id)  # its EOS ends docs
    b = run_lib.build_stream(c).global_batch(0)
    assert b["targets"].max() < 700
    row = b["targets"][0][(b["segment_ids"][0] == 1) & (b["loss_weights"][0] > 0)]
    assert len(cat.tokenizer.decode(row[row != cat.tokenizer.eos_id]).strip()) > 20
    # A run cannot resume with another tokenizer.
    assert "data.tokenizer" in run_lib.resume_mismatch(bundled, c)
