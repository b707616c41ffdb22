"""Tokenizers: the bundled SentencePiece model (ids unchanged), a Hugging Face `tokenizers` file
and SentencePiece models trained by `python -m loam.data.vocab`, the special ids objectives take
from them, and one clear error for every bad tokenizer spec."""

from __future__ import annotations

import ast
import gzip
import hashlib
import itertools
import json
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import ml_collections
import numpy as np
import pytest
import sentencepiece as spm
import tokenizers as tk
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from loam.data import corpora
from loam.data import objectives as obj
from loam.data import vocab as vocab_lib
from loam.data.corpora import CorpusError

from helpers import env


def _docs(domain: str, n: int, validation: bool = False) -> list[tuple[str, str]]:
    docs = ((d, t) for d, t in corpora.read_documents(corpora.corpus_path(domain))
            if corpora.is_validation(d) == validation)
    return list(itertools.islice(docs, n))


def _train_hf(path: Path, extra_special=()) -> Path:
    """A byte-level BPE `tokenizers` file trained on bundled text, saved with a post-processor
    that appends <|endoftext|>, truncation to 8 tokens and padding enabled (encoding must ignore
    all three)."""
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<pad>", *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for _, t in _docs("docs", 200) + _docs("code", 40)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", 0)])
    tok.enable_truncation(max_length=8)
    tok.enable_padding(pad_id=1, pad_token="<pad>")
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def hf_file(tmp_path_factory) -> Path:
    return _train_hf(tmp_path_factory.mktemp("hf") / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_modes_file(tmp_path_factory) -> Path:
    return _train_hf(tmp_path_factory.mktemp("hf_modes") / "tokenizer.json",
                     extra_special=vocab_lib.MODE_TOKENS)


def _write_jsonl(path: Path, docs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")


def _web_docs() -> list[tuple[str, str]]:
    return _docs("docs", 120) + _docs("dialogue", 60) + _docs("docs", 10, validation=True)


def _config_file(path: Path, sources: dict) -> Path:
    path.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "    c = ml_collections.ConfigDict()\n"
                    "    c.data = ml_collections.ConfigDict()\n"
                    f"    c.data.sources = {sources!r}\n"
                    "    return c\n")
    return path


def _vocab_cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "loam.data.vocab", *map(str, args)],
                          env=env(1), capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"loam.data.vocab failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def sp_trained(tmp_path_factory) -> tuple[Path, dict, Path]:
    """A 1000-id SentencePiece model trained by `python -m loam.data.vocab --config` on a
    two-domain config: JSON-lines shards made from bundled text, and a bundled corpus."""
    root = tmp_path_factory.mktemp("sp")
    docs = _web_docs()
    _write_jsonl(root / "web/part-0.jsonl.gz", docs[::2])
    _write_jsonl(root / "web/part-1.jsonl.gz", docs[1::2])
    sources = {"web": f"jsonl:{root}/web/*.jsonl.gz", "code": "bundled:code"}
    config = _config_file(root / "config.py", sources)
    out = root / "tok.model"
    proc = _vocab_cli("--config", config, "--out", out, "--vocab_size", 1000,
                      "--sample_bytes", 60_000)
    return out, json.loads(proc.stdout.strip().splitlines()[-1]), root


# ----------------------------------------------------------------------------- bundled


def test_bundled_tokenizer_keeps_its_ids():
    tok = vocab_lib.get_tokenizer("bundled")
    assert tok is vocab_lib.default_vocabulary() is vocab_lib.get_tokenizer()
    texts = ["def f(x):\n    return x + 1\n", "Hello, world! 12345 ünïcödé 漢字 [NLU] \t tabs", ""]
    assert tok.encode(texts) == [
        [389, 515, 284, 342, 275, 268, 285, 362, 1403, 616, 264, 281, 268],
        [264, 7782, 262, 820, 392, 264, 281, 300, 311, 339, 347, 264, 201, 194, 276, 201, 181,
         348, 201, 188, 291, 201, 175, 264, 236, 194, 168, 235, 179, 157, 264, 3, 264, 15, 264,
         2336, 266],
        []]
    # Every document of a sample: the plain SentencePiece model's ids, and back to the text.
    sp = spm.SentencePieceProcessor(model_file=str(vocab_lib.MODEL_PATH))
    sample = [t for d in corpora.DOMAIN_NAMES for _, t in _docs(d, 5, validation=True)]
    ids = tok.encode(sample)
    assert ids == sp.encode(sample, out_type=int)
    assert [tok.decode(i + [tok.eos_id, tok.pad_id, tok.sentinel_id(0)]) for i in ids] == sample
    assert (tok.spec, tok.vocab_size, tok.pad_id, tok.eos_id) == ("bundled", 8192, 0, 1)
    assert (vocab_lib.PAD_ID, vocab_lib.EOS_ID, vocab_lib.VOCAB_SIZE) == (0, 1, 8192)
    assert tok.mode_ids == {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5} == obj.MODE_IDS
    assert [tok.sentinel_id(i) for i in (0, 1, 99)] == [8191, 8190, 8092]
    assert [vocab_lib.sentinel_id(i) for i in (0, 99)] == [8191, 8092]
    data = vocab_lib.MODEL_PATH.read_bytes()
    library = f"sentencepiece\nsentencepiece {spm.__version__}\n".encode()
    assert tok.fingerprint == hashlib.sha256(library + data).hexdigest()
    # The same file named by path: the same ids and fingerprint, its own spec.
    by_path = vocab_lib.get_tokenizer(str(vocab_lib.MODEL_PATH))
    assert by_path.spec == f"sentencepiece:{vocab_lib.MODEL_PATH}"
    assert by_path.fingerprint == tok.fingerprint and by_path.encode(sample) == ids
    # Objectives built without a tokenizer and with the bundled one are the same.
    for name in ("span_corruption", "ul2"):
        a, b = obj.get_objective(name), obj.get_objective(name, tok)
        chunk = np.array(ids[0][:200] + [1], np.int32)
        for seed in range(5):
            np.testing.assert_array_equal(a.apply(chunk, seed)["tokens"],
                                          b.apply(chunk, seed)["tokens"])
        assert repr(a) == repr(b)


# ----------------------------------------------------------------------------- tokenizers


def test_hf_tokenizer(hf_file, hf_modes_file, tmp_path):
    tok = vocab_lib.get_tokenizer(f"hf:{hf_file}")
    raw = tk.Tokenizer.from_file(str(hf_file))
    assert isinstance(tok, vocab_lib.HFTokenizer) and tok.spec == f"hf:{hf_file}"
    assert tok.vocab_size == raw.get_vocab_size() + 100 == 700
    assert tok.eos_id == raw.token_to_id("<|endoftext|>") == 0
    assert tok.pad_id == raw.token_to_id("<pad>") == 1
    assert [tok.sentinel_id(i) for i in (0, 99)] == [699, 600] and tok.mode_ids == {}
    texts = [t for _, t in _docs("docs", 20, validation=True) + _docs("code", 3, validation=True)]
    ids = tok.encode(texts)
    # No EOS added, no truncation, no padding (all three in the file); ids are the file's own;
    # decoding gives the text back.
    assert raw.encode(texts[0]).ids[-1] == tok.eos_id and len(raw.encode(texts[0]).ids) == 8
    raw.no_truncation()
    raw.no_padding()
    assert ids == [raw.encode(t, add_special_tokens=False).ids for t in texts]
    assert max(len(i) for i in ids) > 100 and 0 not in {x for i in ids for x in i}
    assert [tok.decode(i + [tok.eos_id, tok.sentinel_id(0)]) for i in ids] == texts
    # A special token written in a document is text, never the EOS id.
    assert tok.eos_id not in tok.encode(["the end <|endoftext|> and <pad>"])[0]
    # The bare path means the same; the fingerprint is the bytes', wherever they are.
    assert vocab_lib.get_tokenizer(str(hf_file)) is tok
    copy = tmp_path / "copy.json"
    shutil.copy(hf_file, copy)
    same = vocab_lib.get_tokenizer(str(copy))
    assert same is not tok and same.fingerprint == tok.fingerprint
    assert same.encode(texts) == ids
    # Another tokenizer, or the same file with another EOS, has another fingerprint.
    other = vocab_lib.get_tokenizer(f"hf:{hf_file}?eos=<pad>")
    assert other.eos_id == 1 and other.fingerprint != tok.fingerprint
    # A pickled tokenizer carries its file's bytes and settings.
    pickled = pickle.dumps(same)
    # A file replaced on disk is loaded again.
    shutil.copy(hf_modes_file, copy)
    back = pickle.loads(pickled)
    assert back.fingerprint == tok.fingerprint and back.mode_ids == {}
    assert back.encode(texts + ["<|endoftext|>"]) == tok.encode(texts + ["<|endoftext|>"])
    changed = vocab_lib.get_tokenizer(str(copy))
    assert changed is not same and changed.fingerprint != tok.fingerprint
    assert set(changed.mode_ids) == set(vocab_lib.MODE_TOKENS)


def test_hf_tokenizer_on_a_url_filesystem(hf_file):
    url = "memory://loam-test-tokenizers/tokenizer.json"
    with fsspec.open(url, "wb") as f:
        f.write(hf_file.read_bytes())
    tok = vocab_lib.get_tokenizer(f"hf:{url}")
    local = vocab_lib.get_tokenizer(f"hf:{hf_file}")
    assert tok.spec == f"hf:{url}" and tok.fingerprint == local.fingerprint
    assert tok.encode(["a url-addressed tokenizer"]) == local.encode(["a url-addressed tokenizer"])
    with pytest.raises(CorpusError, match="memory://loam-test-tokenizers/absent.json"):
        vocab_lib.get_tokenizer("hf:memory://loam-test-tokenizers/absent.json")


def test_sentencepiece_trained_from_config(sp_trained):
    out, report, _ = sp_trained
    tok = vocab_lib.get_tokenizer(f"sentencepiece:{out}")
    assert vocab_lib.get_tokenizer(str(out)) is tok
    assert report["out"] == str(out) and report["fingerprint"] == tok.fingerprint
    assert set(report["sample_bytes"]) == {"web", "code"}
    assert all(60_000 <= b < 200_000 for b in report["sample_bytes"].values())
    assert report["bytes_per_token"]["web"] > 1 and report["bytes_per_token"]["code"] > 1
    assert tok.vocab_size == report["vocab_size"] == 1000
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    assert tok.mode_ids == {"[NLU]": 3, "[NLG]": 4, "[S2S]": 5}
    assert [tok.sentinel_id(i) for i in (0, 99)] == [999, 900]
    assert tok.fingerprint != vocab_lib.default_vocabulary().fingerprint
    texts = [t for _, t in _docs("reference", 10, validation=True) + _docs("code", 2)]
    texts.append("ünïcödé 漢字 ☃ bytes the sample never saw")
    ids = tok.encode(texts)
    assert max(x for i in ids for x in i) < 900 and min(x for i in ids for x in i) >= 2
    assert [tok.decode(i) for i in ids] == texts
    assert tok.encode(texts) != vocab_lib.default_vocabulary().encode(texts)


def test_training_sample_ignores_file_order(sp_trained, tmp_path):
    out, _, _ = sp_trained
    docs = _web_docs()
    random.Random(0).shuffle(docs)
    for k in range(3):
        _write_jsonl(tmp_path / f"web/shard-{k}.jsonl.gz", docs[k::3])
    config = ml_collections.ConfigDict({"data": {"sources": {
        "web": f"jsonl:{tmp_path}/web/*.jsonl.gz", "code": "bundled:code"}}})
    again = tmp_path / "again.model"
    vocab_lib.train_from_config(config, again, vocab_size=1000, sample_bytes=60_000)
    assert again.read_bytes() == out.read_bytes()


def test_bounded_sample_is_the_smallest_hashes():
    docs = [(d, t) for d, t in _docs("dialogue", 300)]
    budget = 40_000
    sample = vocab_lib._Sample(budget)
    for d, t in reversed(docs):
        sample.add(d, t)
    # The shortest prefix, in sha256-of-id order, whose paragraphs reach the budget.
    expect, used = [], 0
    for _, t in sorted(docs, key=lambda dt: hashlib.sha256(dt[0].encode()).digest()):
        expect += vocab_lib._chunks(t)
        used += sum(len(c.encode()) for c in vocab_lib._chunks(t))
        if used >= budget:
            break
    assert sample.sentences() == expect and budget <= sample.total < 2 * budget


def test_bundled_form_of_the_command(tmp_path):
    data = tmp_path / "corpora"
    for name in corpora.DOMAIN_NAMES:
        corpora.write_documents(data / f"{name}.jsonl.gz", _docs(name, 15) + _docs(name, 2, True))
    out = tmp_path / "small.model"
    proc = _vocab_cli("--out", out, "--data_dir", data, "--vocab_size", 700)
    tok = vocab_lib.get_tokenizer(str(out))
    assert tok.vocab_size == 700 and tok.mode_ids == obj.MODE_IDS
    assert set(ast.literal_eval(proc.stdout.strip().splitlines()[-1])) == set(corpora.DOMAIN_NAMES)
    again = tmp_path / "again.model"
    vocab_lib.train(again, data, vocab_size=700)
    assert again.read_bytes() == out.read_bytes()


def test_sentencepiece_model_trained_elsewhere(tmp_path):
    """A SentencePiece model with the trainer's default layout (unk 0, bos 1, eos 2, no pad, no
    mode tokens): 100 sentinels on top, its own EOS, padding on <unk>, no UL2."""
    text = "\n".join(t for _, t in _docs("docs", 60))
    (tmp_path / "text.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=400,
                                   minloglevel=2, num_threads=1)
    tok = vocab_lib.get_tokenizer(str(tmp_path / "plain.model"))
    assert tok.vocab_size == 500 and tok.eos_id == 2 and tok.pad_id == 0 and tok.mode_ids == {}
    assert tok.sentinel_id(0) == 499
    ex = obj.get_objective("span_corruption", tok).apply(
        np.array(tok.encode([text[:2000]])[0] + [tok.eos_id]), 1)
    assert ex["tokens"][-1] == 2 and 499 in ex["tokens"] and ex["tokens"].max() < 500
    with pytest.raises(CorpusError, match=r"UL2 objective needs the mode token\(s\) \[NLU\]"):
        obj.get_objective("ul2", tok)


# ----------------------------------------------------------------------------- objectives


def _reconstruct(example, tok, lead=0):
    toks, p = example["tokens"], example["prefix_len"]
    lowest = tok.sentinel_id(vocab_lib.NUM_SENTINELS - 1)
    targets = toks[p:]
    assert targets[-1] == tok.eos_id
    spans, cur = {}, None
    for t in targets[:-1]:
        if t >= lowest:
            cur = int(t)
            spans[cur] = []
        else:
            spans[cur].append(int(t))
    out = []
    for t in toks[lead:p]:
        out.extend(spans.pop(int(t)) if t >= lowest else [int(t)])
    assert not spans
    return np.array(out, np.int32)


def test_objectives_take_the_tokenizers_ids(hf_file, hf_modes_file):
    tok = vocab_lib.get_tokenizer(str(hf_file))
    text = _docs("docs", 1, validation=True)[0][1]
    chunk = np.array(tok.encode([text])[0][:300] + [tok.eos_id], np.int32)
    sc = obj.get_objective("span_corruption", tok)
    assert "tokenizer=" in repr(sc)
    for seed in range(10):
        ex = sc.apply(chunk, seed)
        np.testing.assert_array_equal(_reconstruct(ex, tok), chunk)
        p = ex["prefix_len"]
        sentinels = ex["tokens"][:p][ex["tokens"][:p] >= 600]
        np.testing.assert_array_equal(sentinels, 699 - np.arange(sentinels.shape[0]))
        assert ex["tokens"].max() < tok.vocab_size and ex["tokens"][-1] == tok.eos_id == 0
    plm = obj.get_objective("prefix_lm", tok)
    ex = plm.apply(chunk, 3)
    np.testing.assert_array_equal(ex["tokens"], chunk)
    assert 1 <= ex["prefix_len"] < chunk.shape[0]
    # UL2 is refused without mode tokens, at construction, and works with them.
    with pytest.raises(CorpusError, match=r"\[NLU\] \[NLG\] \[S2S\].*lacks"):
        obj.get_objective("ul2", tok)
    with pytest.raises(CorpusError, match=r"\[NLU\]"):
        obj.UL2(weights={"R": 1}, tokenizer=tok)
    modes = vocab_lib.get_tokenizer(str(hf_modes_file))
    assert set(modes.mode_ids) == set(vocab_lib.MODE_TOKENS)
    assert modes.eos_id == 0 and modes.vocab_size == 700
    chunk = np.array(modes.encode([text])[0][:200] + [modes.eos_id], np.int32)
    ul2 = obj.get_objective("ul2", modes, weights={"R": 1, "X": 1, "S": 1})
    lead_ids = {int(ul2.apply(chunk, s)["tokens"][0]) for s in range(60)}
    assert lead_ids == set(modes.mode_ids.values())
    for s in range(30):
        ex = ul2.apply(chunk, s)
        if ex["tokens"][0] != modes.mode_ids["[S2S]"]:
            np.testing.assert_array_equal(_reconstruct(ex, modes, lead=1), chunk)
    # A UL2 that uses only the modes a tokenizer has is fine; a built objective keeps its ids.
    assert obj.get_objective(sc, tok) is sc
    with pytest.raises(ValueError, match="built for tokenizer"):
        obj.get_objective(sc, vocab_lib.default_vocabulary())


# ----------------------------------------------------------------------------- bad input


def test_bad_tokenizer_specs(tmp_path, hf_file):
    (tmp_path / "config.json").write_text(json.dumps({"model": {"size": "nano"}}))
    (tmp_path / "garbage.model").write_bytes(b"\x00not a sentencepiece model")
    (tmp_path / "latin1.json").write_bytes(b'{"x": "\xe9"}')
    no_eos = tk.Tokenizer.from_file(str(hf_file))
    vocab = no_eos.get_vocab()
    trimmed = tk.Tokenizer(models.WordLevel({t: i for t, i in vocab.items()
                                             if t not in vocab_lib.EOS_TOKENS} | {"[UNK]": 9999},
                                            unk_token="[UNK]"))
    trimmed.save(str(tmp_path / "no_eos.json"))
    cases = [
        (f"hf:{tmp_path}/absent.json", r"absent\.json does not exist"),
        (f"{tmp_path}/absent.model", r"absent\.model does not exist.*loam\.data\.vocab"),
        ("wordpiece:vocab.txt", "unknown kind"),
        (f"{tmp_path}/vocab.txt", "unknown kind"),
        ("", "empty"),
        ("hf:", "names no file"),
        (f"hf:{tmp_path}/config.json", r"config\.json is not a readable tokenizers JSON file"),
        (f"hf:{tmp_path}/latin1.json", r"latin1\.json is not a readable tokenizers JSON"),
        (f"{tmp_path}/garbage.model", r"garbage\.model is not a readable SentencePiece model"),
        (f"hf:{hf_file}?bos=<s>", "bad option 'bos=<s>'"),
        (f"hf:{hf_file}?eos=</nope>", r"eos='</nope>' is not a token"),
        (f"{tmp_path}/no_eos.json", r"no end-of-sequence token.*\?eos="),
    ]
    for spec, match in cases:
        with pytest.raises(CorpusError, match=match):
            vocab_lib.get_tokenizer(spec)
    # The command: one line, exit 1.
    config = _config_file(tmp_path / "config.py", {"web": f"jsonl:{tmp_path}/none/*.jsonl"})
    proc = _vocab_cli("--config", config, "--out", tmp_path / "x.model", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "none/*.jsonl" in proc.stderr
    proc = _vocab_cli("--config", _config_file(tmp_path / "ok.py", {"code": "bundled:code"}),
                      "--out", tmp_path / "x.model", "--vocab_size", 300, check=False)
    assert proc.returncode == 1 and "--vocab_size 300 is too small" in proc.stderr
    assert not (tmp_path / "x.model").exists()
