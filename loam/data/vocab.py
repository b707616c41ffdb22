"""Tokenizers: the bundled SentencePiece vocabulary, any SentencePiece model, or a Hugging Face
``tokenizers`` JSON file; and the trainer of loam's SentencePiece models.

Layout of the bundled 8192 ids (seqio's convention, so seqio and loam agree on every id):
  0 pad, 1 eos, 2 unk, 3..5 the UL2 mode tokens [NLU] [NLG] [S2S] (user-defined pieces), then
  8086 learned pieces with byte fallback, then the 100 sentinels <extra_id_99> .. <extra_id_0>
  that seqio appends: sentinel i is id 8191 - i.

A run names its tokenizer in ``config.data.tokenizer`` (see `get_tokenizer`):

  ``"bundled"``                      the model above (the default);
  ``"sentencepiece:PATH"``           any SentencePiece model file (``PATH.model`` alone works too);
  ``"hf:PATH"``                      a Hugging Face ``tokenizers`` JSON file (``PATH.json`` alone
                                     works too).

PATH may also be a URL (``gs://``, ``s3://``, ``memory://`` ...), read with fsspec where the
filesystem's package is installed; a ``?`` ends it and starts the options below. The
tokenizer's fingerprint (what prepared data is keyed on) is a hash of the file's bytes and the
options, wherever the file lies.

Every tokenizer gets 100 sentinels on top of its own ids, as seqio does (sentinel i is
``vocab_size - 1 - i``), except a ``tokenizers`` file that already ends with ``<extra_id_99>`` ..
``<extra_id_0>`` (T5's ``tokenizer.json``): those are its sentinels, and its ids equal seqio's.
Encoding never adds BOS or EOS: loam appends EOS to every document itself (and a ``</s>``
written in a document is text, not the EOS id). The end-of-sequence
token is the model's own (a SentencePiece model's eos piece; in a ``tokenizers`` file the first
of ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<eos>``, ``<|eos|>``, ``[EOS]`` it has),
or the one the spec names: ``hf:PATH?eos=<|im_end|>``; ``&pad=<pad>`` names the padding token
likewise. Without a pad token, padding is id 0 when that is a special token, else EOS (padding
carries zero loss weight, so it only needs a valid id). UL2 needs [NLU] [NLG] [S2S] as single
ids; a tokenizer without them refuses it.

Train a SentencePiece model with loam's id layout on a sample of a run's sources with
``python -m loam.data.vocab --config FILE --out PATH [--vocab_size N]``; without ``--config``
(``--out PATH [--data_dir DIR]``) it samples the five bundled corpora, which is how the bundled
model was made (``--config loam/configs/default.py`` gives the same bytes). The sample is
deterministic and bounded: in each domain, the training-split documents with the smallest sha256
of their id, up to ``--sample_bytes`` (1.5 MB) of paragraphs, whatever the order of the files.

This module imports sentencepiece and tokenizers. The seqio vocabulary of loam's tasks, with ids
equal to this module's on every path, is ``loam.data.tasks.vocabulary()`` (it imports seqio and
TensorFlow).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import heapq
import io
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import fsspec
import sentencepiece as spm
import tokenizers

from loam import cli
from loam.data import corpora, sources
from loam.data.corpora import CorpusError

MODEL_PATH = corpora.BUNDLED_DIR / "loam.model"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODE_TOKENS = ("[NLU]", "[NLG]", "[S2S]")
NUM_SENTINELS = 100
SP_VOCAB_SIZE = 8092
VOCAB_SIZE = SP_VOCAB_SIZE + NUM_SENTINELS
SAMPLE_BYTES_PER_DOMAIN = 1_500_000
KINDS = ("sentencepiece", "hf")
# End-of-sequence and padding tokens looked for in a `tokenizers` file, first found first.
EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
PAD_TOKENS = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
SPEC_OPTIONS = ("eos", "pad")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SPEC_HELP = ("use 'bundled', 'sentencepiece:PATH' (or a path ending in .model) or 'hf:PATH' "
              "(or a path ending in .json), optionally with ?eos=TOKEN&pad=TOKEN")


def sentinel_id(i: int) -> int:
    """Id of <extra_id_i> in the bundled vocabulary, counted down from the top as seqio and T5
    do."""
    if not 0 <= i < NUM_SENTINELS:
        raise ValueError(f"sentinel index {i} outside [0, {NUM_SENTINELS})")
    return VOCAB_SIZE - 1 - i


# Threads a batch encode may use: -1, the library's default (every core); 1 in the workers of a
# preparation pipeline, where the workers are the parallelism (see set_encode_threads).
_ENCODE_THREADS = -1


def set_encode_threads(n: int) -> None:
    """Threads per batch encode in this process: 1 where several processes encode at once
    (Beam workers), -1 for every core."""
    global _ENCODE_THREADS
    _ENCODE_THREADS = int(n)
    if n == 1:  # Hugging Face tokenizers: its batch encode's thread pool
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


class Tokenizer(Protocol):
    """What loam needs of a tokenizer (`Vocabulary` and `HFTokenizer` implement it)."""

    spec: str            # "bundled" | "sentencepiece:/abs/path.model" | "hf:/abs/tokenizer.json"
    fingerprint: str     # sha256 hex of the kind, the model file's bytes and the spec's options
    vocab_size: int      # the model's vocabulary: the tokenizer's ids + 100 sentinels
    pad_id: int
    eos_id: int
    mode_ids: dict[str, int]   # those of [NLU] [NLG] [S2S] the tokenizer has as single ids

    def encode(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    def sentinel_id(self, i: int) -> int: ...


# ----------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: str                               # sentencepiece | hf
    path: str                               # absolute
    options: tuple[tuple[str, str], ...]    # sorted (eos|pad, token)
    bundled: bool = False

    @property
    def text(self) -> str:
        if self.bundled:
            return "bundled"
        opts = "&".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kind}:{self.path}" + (f"?{opts}" if opts else "")

    def option(self, key: str) -> str | None:
        return dict(self.options).get(key)


def _parse_spec(spec: str) -> _Spec:
    if not isinstance(spec, str) or not spec.strip():
        raise CorpusError(f"tokenizer spec {spec!r} is empty or not a string; {_SPEC_HELP}")
    spec = spec.strip()
    if spec == "bundled":
        return _Spec("sentencepiece", str(MODEL_PATH), (), bundled=True)
    body, _, query = spec.partition("?")
    kind, sep, path = body.partition(":")
    if not sep or kind not in KINDS:
        kind, path = "", body
        if body.endswith(".model"):
            kind = "sentencepiece"
        elif body.endswith(".json"):
            kind = "hf"
        else:
            raise CorpusError(f"tokenizer {spec!r}: unknown kind; {_SPEC_HELP}")
    if not path:
        raise CorpusError(f"tokenizer {spec!r} names no file after '{kind}:'; {_SPEC_HELP}")
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if key not in SPEC_OPTIONS or not eq or not value:
            raise CorpusError(f"tokenizer {spec!r}: bad option {item!r}; options are "
                              "eos=TOKEN and pad=TOKEN, e.g. hf:tokenizer.json?eos=<|endoftext|>")
        options[key] = value
    return _Spec(kind, _absolute(path), tuple(sorted(options.items())))


def _absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL (gs://, s3://, memory:// ...) as it is."""
    path = os.fspath(path)
    return path if _URL.match(path) else os.path.abspath(os.path.expanduser(path))


def _url_fs(spec: _Spec):
    try:
        return fsspec.core.url_to_fs(spec.path)
    except ImportError as e:
        raise CorpusError(f"tokenizer {spec.text}: the filesystem package for {spec.path} is not "
                          f"installed ({e}); install it (e.g. gcsfs for gs://, s3fs for s3://)"
                          ) from None
    except ValueError as e:
        raise CorpusError(f"tokenizer {spec.text}: cannot read {spec.path} ({e})") from None


def _identity(spec: _Spec) -> tuple:
    """What changes when the model file is replaced; () if it cannot be read."""
    try:
        if _URL.match(spec.path):
            fs, path = _url_fs(spec)
            return ("url", fs.ukey(path))
        st = os.stat(spec.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    except (OSError, CorpusError):
        return ()


def _read_model(spec: _Spec) -> bytes:
    what = "SentencePiece model" if spec.kind == "sentencepiece" else "tokenizers JSON file"
    try:
        if _URL.match(spec.path):
            fs, path = _url_fs(spec)
            return fs.cat_file(path)
        return Path(spec.path).read_bytes()
    except FileNotFoundError:
        fix = ("train one with `python -m loam.data.vocab --config FILE --out PATH`"
               if spec.kind == "sentencepiece" else
               "save one with tokenizers' Tokenizer.save(PATH)")
        raise CorpusError(f"tokenizer {spec.text}: {what} {spec.path} does not exist; fix "
                          f"config.data.tokenizer or {fix}") from None
    except OSError as e:
        raise CorpusError(f"tokenizer {spec.text}: cannot read {what} {spec.path} "
                          f"({e.strerror or e}); fix config.data.tokenizer") from None


def _fingerprint(spec: _Spec, data: bytes) -> str:
    """The kind, the library's version (a release may segment a text differently), the model
    file's bytes and the options."""
    if spec.kind == "sentencepiece":
        library = f"sentencepiece {spm.__version__}"
    else:
        library = f"tokenizers {tokenizers.__version__}"
    h = hashlib.sha256(f"{spec.kind}\n{library}\n".encode())
    h.update(data)
    if spec.options:
        h.update(("\n" + json.dumps(spec.options)).encode())
    return h.hexdigest()


def _unreadable(spec: _Spec, what: str, error: BaseException) -> CorpusError:
    detail = cli.one_line(error)[:200] or type(error).__name__
    return CorpusError(f"tokenizer {spec.text}: {spec.path} is not a readable {what} ({detail}); "
                       f"point config.data.tokenizer at a valid file ({_SPEC_HELP})")


def _eos_and_pad(spec: _Spec, lookup: Callable[[str], int | None], own_eos: int | None,
                 own_pad: int | None, zero_is_special: bool) -> tuple[int, int]:
    """(eos id, pad id): the spec's eos=/pad= tokens, else the model's own, else the first of
    EOS_TOKENS / PAD_TOKENS it has; padding without any: id 0 if it is a special token (no text
    piece), else EOS."""
    ids: dict[str, int | None] = {}
    for key, own, names in (("eos", own_eos, EOS_TOKENS), ("pad", own_pad, PAD_TOKENS)):
        named = spec.option(key)
        if named is not None:
            ids[key] = lookup(named)
            if ids[key] is None:
                raise CorpusError(f"tokenizer {spec.text}: {key}={named!r} is not a token of "
                                  f"{spec.path}; name a token the tokenizer has as a single id")
        else:
            ids[key] = own if own is not None else next(
                (i for t in names if (i := lookup(t)) is not None), None)
    eos = ids["eos"]
    if eos is None:
        example = "PIECE" if spec.kind == "sentencepiece" else "<|im_end|>"
        raise CorpusError(f"tokenizer {spec.text}: found no end-of-sequence token in "
                          f"{spec.path} (looked for {' '.join(EOS_TOKENS)}); name it in the "
                          f"spec: {spec.kind}:{spec.path}?eos={example}")
    pad = ids["pad"]
    return eos, pad if pad is not None else 0 if zero_is_special else eos


# ----------------------------------------------------------------------------- SentencePiece


class _Sentinels:
    """The 100 sentinels on top of a tokenizer's own ids (seqio's layout): <extra_id_i> is
    vocab_size - 1 - i."""

    vocab_size: int

    def sentinel_id(self, i: int) -> int:
        if not 0 <= i < NUM_SENTINELS:
            raise ValueError(f"sentinel index {i} outside [0, {NUM_SENTINELS})")
        return self.vocab_size - 1 - i


class Vocabulary(_Sentinels):
    """A SentencePiece model with 100 sentinels on top, id-for-id equal to seqio's vocabulary
    of the same file. `Vocabulary()` is the bundled model."""

    def __init__(self, model_path: str | os.PathLike = MODEL_PATH, *, spec: str | None = None,
                 data: bytes | None = None):
        path = _absolute(model_path)
        if spec is None:
            bundled = path == os.path.abspath(MODEL_PATH)
            spec = "bundled" if bundled else f"sentencepiece:{path}"
        parsed = _parse_spec(spec)
        if parsed.kind != "sentencepiece":
            raise CorpusError(f"tokenizer {spec}: not a SentencePiece model; use HFTokenizer")
        self.model_path = Path(model_path)
        self.spec = parsed.text
        if data is None:
            data = _read_model(dataclasses.replace(parsed, path=path))
        self._data = data
        self.fingerprint = _fingerprint(parsed, data)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError, OSError ...
            raise _unreadable(parsed, "SentencePiece model", e) from None
        sp = self._sp
        self._base = sp.get_piece_size()
        self.vocab_size = self._base + NUM_SENTINELS
        self.mode_ids = {t: i for t in MODE_TOKENS if self._has(t, i := sp.piece_to_id(t))}
        self.eos_id, self.pad_id = _eos_and_pad(
            parsed, self._piece_id, sp.eos_id() if sp.eos_id() >= 0 else None,
            sp.pad_id() if sp.pad_id() >= 0 else None,
            self._base > 0 and (sp.is_control(0) or sp.is_unknown(0)))

    def __reduce__(self):  # the model's bytes travel with it (a remote worker lacks the file)
        return (_rebuild, (type(self), str(self.model_path), self.spec, self._data))

    def _has(self, piece: str, i: int) -> bool:
        return 0 <= i < self._base and self._sp.id_to_piece(i) == piece

    def _piece_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        return i if self._has(piece, i) else None

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int, num_threads=_ENCODE_THREADS)

    def decode(self, ids) -> str:
        skip = {self.pad_id, self.eos_id}
        return self._sp.decode([int(i) for i in ids
                                if 0 <= int(i) < self._base and int(i) not in skip])

    def piece(self, i: int) -> str:
        if i >= self._base:
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return self._sp.id_to_piece(i)

    def __repr__(self):
        return f"Vocabulary({self.spec!r}, vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- tokenizers


class HFTokenizer(_Sentinels):
    """A Hugging Face ``tokenizers`` JSON file with 100 sentinels on top (or its own
    ``<extra_id_*>`` tokens, when it ends with them). Encoding adds no special tokens, matches
    no special token written in the text, and neither truncates nor pads."""

    def __init__(self, path: str | os.PathLike, *, spec: str | None = None,
                 data: bytes | None = None):
        self.path = _absolute(path)
        parsed = _parse_spec(spec if spec is not None else f"hf:{self.path}")
        if parsed.kind != "hf":
            raise CorpusError(f"tokenizer {spec}: not a tokenizers JSON file; use Vocabulary")
        self.spec = parsed.text
        if data is None:
            data = _read_model(dataclasses.replace(parsed, path=self.path))
        self._data = data
        self.fingerprint = _fingerprint(parsed, data)
        try:
            tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise _unreadable(parsed, "tokenizers JSON file", e) from None
        padding = tok.padding
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True  # a "</s>" written in a document is text, not EOS
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise _unreadable(parsed, "tokenizers JSON file", ValueError("empty vocabulary"))
        size = max(vocab.values()) + 1
        special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        own = all(vocab.get(f"<extra_id_{i}>") == size - 1 - i for i in range(NUM_SENTINELS))
        self._base = size - NUM_SENTINELS if own else size
        self.vocab_size = self._base + NUM_SENTINELS
        self.mode_ids = {t: i for t in MODE_TOKENS if (i := vocab.get(t)) is not None}
        own_pad = int(padding["pad_id"]) if padding is not None else None
        self.eos_id, self.pad_id = _eos_and_pad(
            parsed, vocab.get, None, own_pad if own_pad is not None and 0 <= own_pad < size
            else None, 0 in special)
        self._skip = {self.eos_id} | ({self.pad_id} if self.pad_id in special else set())
        self._encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def __reduce__(self):  # rebuilt from the file's bytes (tokenizers' own pickle drops the
        return (_rebuild, (type(self), self.path, self.spec, self._data))  # encoding settings)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids
                                 if 0 <= int(i) < self._base and int(i) not in self._skip],
                                skip_special_tokens=True)

    def piece(self, i: int) -> str:
        if i >= self._base:
            return f"<extra_id_{self.vocab_size - 1 - i}>"
        return self._tok.id_to_token(i) or ""

    def __repr__(self):
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size})"


def _rebuild(cls, path: str, spec: str, data: bytes):
    """An unpickled tokenizer, made from the bytes it was loaded from."""
    return cls(path, spec=spec, data=data)


_CACHE: dict[str, tuple[tuple, Tokenizer]] = {}
_CACHE_LOCK = threading.Lock()


def get_tokenizer(spec: str = "bundled") -> Tokenizer:
    """The tokenizer a spec names (see the module docstring), loaded once per spec and file
    state: a file replaced on disk is loaded again. CorpusError on a bad spec, a missing file or
    one that is not a tokenizer of the named kind."""
    parsed = _parse_spec(spec)
    identity = _identity(parsed)
    with _CACHE_LOCK:
        hit = _CACHE.get(parsed.text)
        if hit is not None and identity and hit[0] == identity:
            return hit[1]
        tok: Tokenizer
        if parsed.kind == "sentencepiece":
            tok = Vocabulary(parsed.path, spec=parsed.text)
        else:
            tok = HFTokenizer(parsed.path, spec=parsed.text)
        _CACHE[parsed.text] = (identity, tok)
        return tok


@functools.cache
def default_vocabulary() -> Vocabulary:
    """The bundled vocabulary (the instance `get_tokenizer("bundled")` gives)."""
    tok = get_tokenizer("bundled")
    assert isinstance(tok, Vocabulary)
    return tok


# ----------------------------------------------------------------------------- sample


def _chunks(text: str) -> list[str]:
    """A document's training sentences: its non-blank paragraphs, each cut at 3000 chars."""
    return [p for p in (para[:3000] for para in text.split("\n\n")) if p.strip()]


class _Sample:
    """The documents with the smallest (sha256 of id, sha256 of text) whose sentences reach
    `budget` bytes: the shortest such prefix of that order, whatever order documents arrive in.
    Memory: the budget plus one document."""

    def __init__(self, budget: int):
        self.budget = budget
        self._heap: list[tuple[int, int, int, list[str]]] = []  # (-key, -tie, bytes, chunks)
        self.total = 0

    def add(self, doc_id: str, text: str) -> None:
        key = int.from_bytes(hashlib.sha256(doc_id.encode()).digest(), "big")
        heap = self._heap
        if self.total >= self.budget and heap and key > -heap[0][0]:
            return  # beyond the prefix that already reaches the budget
        tie = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
        chunks = _chunks(text)
        size = sum(len(c.encode()) for c in chunks)
        heapq.heappush(heap, (-key, -tie, size, chunks))
        self.total += size
        while heap and self.total - heap[0][2] >= self.budget:
            self.total -= heapq.heappop(heap)[2]

    def sentences(self) -> list[str]:
        return [c for *_, chunks in sorted(self._heap, reverse=True) for c in chunks]


def _sample(directory=None, budget: int = SAMPLE_BYTES_PER_DOMAIN) -> list[str]:
    """Deterministic training sample of the five bundled corpora (or those under `directory`):
    paragraphs of each domain's training documents in hash order, up to `budget` bytes a
    domain."""
    out = []
    for name in corpora.DOMAIN_NAMES:
        sample = _Sample(budget)
        for doc_id, text in corpora.read_documents(corpora.corpus_path(name, directory)):
            if not corpora.is_validation(doc_id):
                sample.add(doc_id, text)
        out.extend(sample.sentences())
    return out


@dataclasses.dataclass
class SourceSample:
    """One domain's sample: training sentences, validation paragraphs to measure bytes per
    token on, and the number of (non-empty) documents read."""
    train: list[str]
    validation: list[str]
    documents: int


def sample_sources(srcs: Mapping[str, sources.Source], budget: int = SAMPLE_BYTES_PER_DOMAIN
                   ) -> dict[str, SourceSample]:
    """A bounded, deterministic sample of every source: its training documents with the
    smallest sha256 of their id up to `budget` bytes, and likewise validation documents up to
    a tenth of it. One pass over each source; memory bounded by the budgets."""
    out = {}
    for domain, source in srcs.items():
        train, val, n = _Sample(budget), _Sample(max(budget // 10, 1)), 0
        for unit in sources.units(source):
            for doc_id, text in sources.read_unit(unit):
                if not text.strip():
                    continue
                n += 1
                split = sources.doc_split(unit, doc_id)
                (train if split == "train" else val).add(doc_id, text)
        out[domain] = SourceSample(train.sentences(), val.sentences(), n)
    return out


# ----------------------------------------------------------------------------- training


def train_model(sentences: Iterable[str], out: str | os.PathLike,
                vocab_size: int = VOCAB_SIZE) -> Path:
    """Trains a SentencePiece model with loam's id layout (pad 0, eos 1, unk 2, the mode tokens
    3..5, byte fallback; `vocab_size` counts the 100 sentinels added on top) and writes it."""
    _check_vocab_size(vocab_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model,
            vocab_size=vocab_size - NUM_SENTINELS, model_type="unigram",
            character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=4096, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            user_defined_symbols=list(MODE_TOKENS), shuffle_input_sentence=False,
            input_sentence_size=0, num_threads=1, seed_sentencepiece_size=200_000,
            minloglevel=2)
    except RuntimeError as e:
        raise CorpusError(f"cannot train a {vocab_size}-id SentencePiece model on the sample: "
                          f"{cli.one_line(e)}; change --vocab_size (or sample more text with "
                          "--sample_bytes)") from None
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, path)
    return path


def _check_vocab_size(vocab_size: int) -> None:
    minimum = NUM_SENTINELS + 3 + len(MODE_TOKENS) + 256 + 1
    if vocab_size < minimum:
        raise CorpusError(f"--vocab_size {vocab_size} is too small: the model needs at least "
                          f"{minimum} ids (100 sentinels, 6 special, 256 byte pieces, text); "
                          "use a larger --vocab_size")


def train(out: str | os.PathLike, directory=None, vocab_size: int = VOCAB_SIZE) -> Path:
    """Trains on the bundled corpora (or those under `directory`): the bundled model."""
    _check_vocab_size(vocab_size)
    return train_model(_sample(directory), out, vocab_size)


def train_from_config(config, out: str | os.PathLike, vocab_size: int = VOCAB_SIZE,
                      sample_bytes: int = SAMPLE_BYTES_PER_DOMAIN) -> dict[str, Any]:
    """Trains a model on a sample of ``config.data.sources``; returns a report (the model's
    path, vocab_size, fingerprint and each domain's validation bytes per token)."""
    if sample_bytes < 1:
        raise CorpusError(f"--sample_bytes must be positive, got {sample_bytes}")
    _check_vocab_size(vocab_size)
    srcs = sources.from_config(config)
    samples = sample_sources(srcs, sample_bytes)
    empty = [d for d, s in samples.items() if not s.train]
    if empty:
        raise CorpusError(f"domain(s) {', '.join(empty)} have no training text to sample; fix "
                          "config.data.sources")
    path = train_model((s for smp in samples.values() for s in smp.train), out, vocab_size)
    vocab = Vocabulary(path)
    _check_layout(vocab)
    return {"out": str(path), "vocab_size": vocab.vocab_size, "fingerprint": vocab.fingerprint,
            "documents": {d: s.documents for d, s in samples.items()},
            "sample_bytes": {d: sum(len(t.encode()) for t in s.train)
                             for d, s in samples.items()},
            "bytes_per_token": {d: round(_bytes_per_token(vocab, s.validation), 3)
                                if s.validation else None for d, s in samples.items()}}


def _check_layout(vocab: Vocabulary) -> None:
    want = {t: 3 + i for i, t in enumerate(MODE_TOKENS)}
    if (vocab.pad_id, vocab.eos_id, vocab.mode_ids) != (PAD_ID, EOS_ID, want):
        raise RuntimeError(f"{vocab.model_path}: pad {vocab.pad_id}, eos {vocab.eos_id}, mode "
                           f"tokens {vocab.mode_ids}; expected 0, 1 and {want}")


def _bytes_per_token(vocab: Tokenizer, texts: Sequence[str]) -> float:
    n_tok = sum(len(ids) for ids in vocab.encode(list(texts)))
    return sum(len(t.encode()) for t in texts) / max(n_tok, 1)


def bytes_per_token(directory=None, vocab: Tokenizer | None = None) -> dict[str, float]:
    """UTF-8 bytes per token of each bundled domain's validation split."""
    vocab = vocab or default_vocabulary()
    report = {}
    for name in corpora.DOMAIN_NAMES:
        texts = [t for d, t in corpora.read_documents(corpora.corpus_path(name, directory))
                 if corpora.is_validation(d)]
        report[name] = _bytes_per_token(vocab, texts)
    return report


def _define_flags(flags) -> None:
    flags.DEFINE_string("out", None, "Where to write the SentencePiece model (PATH.model).")
    flags.mark_flag_as_required("out")
    flags.DEFINE_integer("vocab_size", VOCAB_SIZE, "Ids of the model, 100 sentinels included.")
    flags.DEFINE_integer("sample_bytes", SAMPLE_BYTES_PER_DOMAIN,
                         "Bytes of training text sampled from each domain.")


def _run(config, flags) -> dict[str, Any]:
    report = train_from_config(config, flags.out, flags.vocab_size, flags.sample_bytes)
    print(json.dumps(report), flush=True)
    return report


def _main_bundled(argv: list[str]) -> None:
    p = argparse.ArgumentParser(
        prog="python -m loam.data.vocab",
        description="Train a loam SentencePiece vocabulary: on a sample of a run's sources "
                    "(--config FILE, see loam/configs) or of the bundled corpora (default).")
    p.add_argument("--out", type=Path, default=MODEL_PATH,
                   help="where to write the model (default: the bundled model's file)")
    p.add_argument("--data_dir", default=None, help="corpora to sample (default: bundled)")
    p.add_argument("--vocab_size", type=int, default=VOCAB_SIZE,
                   help="ids of the model, 100 sentinels included")
    p.add_argument("--config", help=f"{cli.CONFIG_HELP}: train on its data.sources")
    args = p.parse_args(argv)
    with cli.user_errors():
        path = train(args.out, args.data_dir, args.vocab_size)
        vocab = Vocabulary(path)
        _check_layout(vocab)
        print({k: round(v, 3) for k, v in bytes_per_token(args.data_dir, vocab).items()})


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv if argv is None else argv)
    if any(a == "--config" or a.startswith(("--config=", "--config.")) for a in args[1:]):
        cli.config_main(_run, define_flags=_define_flags, argv=args)
    else:
        _main_bundled(args[1:])


if __name__ == "__main__":
    main()

