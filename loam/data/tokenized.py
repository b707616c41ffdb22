"""Each domain's corpus, tokenized once and cached as flat memory-mapped arrays.

Tokenizing the bundled corpora takes seconds; every later run maps the cached arrays instead.
The cache entry is keyed by the corpus file's bytes and the vocabulary model's bytes, so editing
either one re-tokenizes, and entries are written to a temporary directory and renamed into place,
so a crash never leaves a half-written entry that a later run would trust.

Layout per split (``train`` and ``validation``, by ``corpora.is_validation``):
  tokens     int32 [T]    every kept document's tokens followed by EOS, concatenated
  offsets    int64 [N+1]  document i is tokens[offsets[i]:offsets[i+1]]
  doc_index  int32 [N]    the document's position in the corpus file (its doc id in batches)
  doc_bytes  int64 [N]    UTF-8 bytes of its text (for bits per byte)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from loam.data import corpora
from loam.data import vocab as vocab_lib

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
_ARRAYS = ("tokens", "offsets", "doc_index", "doc_bytes")


def cache_dir() -> Path:
    env = os.environ.get("LOAM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "loam"


def domain_id(name: str) -> int:
    if name not in corpora.DOMAIN_NAMES:
        raise ValueError(f"unknown domain {name!r}; known domains: "
                         f"{', '.join(corpora.DOMAIN_NAMES)}")
    return corpora.DOMAIN_NAMES.index(name)


@dataclasses.dataclass(frozen=True)
class Split:
    tokens: np.ndarray
    offsets: np.ndarray
    doc_index: np.ndarray
    doc_bytes: np.ndarray

    @property
    def num_documents(self) -> int:
        return int(self.doc_index.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TokenizedCorpus:
    """One domain's tokenized train and validation splits (memory-mapped from the cache)."""

    def __init__(self, domain: str, data_dir=None, vocab: vocab_lib.Vocabulary | None = None,
                 cache: str | os.PathLike | None = None):
        self.domain = domain
        self.domain_id = domain_id(domain)
        self.path = corpora.corpus_path(domain, data_dir)
        if not self.path.exists():
            next(corpora.read_documents(self.path), None)  # raises CorpusError with the fix
        self.vocab = vocab or vocab_lib.default_vocabulary()
        key = hashlib.sha256(json.dumps(
            [FORMAT_VERSION, _sha256(self.path), _sha256(self.vocab.model_path)]).encode())
        self.entry = Path(cache or cache_dir()) / f"{domain}-{key.hexdigest()[:24]}"
        if not (self.entry / "meta.json").exists():
            self._build()
        self.meta = json.loads((self.entry / "meta.json").read_text())
        self.dropped_documents = int(self.meta["dropped_documents"])
        self._splits = {
            s: Split(*(np.load(self.entry / f"{s}_{a}.npy", mmap_mode="r") for a in _ARRAYS))
            for s in SPLITS}

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return self._splits[name]

    @property
    def train(self) -> Split:
        return self._splits["train"]

    @property
    def validation(self) -> Split:
        return self._splits["validation"]

    def _build(self) -> None:
        docs = list(corpora.read_documents(self.path))
        if not docs:
            raise corpora.CorpusError(
                f"{self.path} holds no documents; rebuild it with `python -m loam.data.build` "
                f"or drop the domain {self.domain!r} from the mixture")
        kept = [(i, d, t) for i, (d, t) in enumerate(docs) if t.strip()]
        dropped = len(docs) - len(kept)
        if not kept:
            raise corpora.CorpusError(
                f"{self.path}: all {len(docs)} documents are empty (only whitespace); rebuild the "
                f"corpus or drop the domain {self.domain!r} from the mixture")
        if dropped:
            logging.warning("%s: dropped %d of %d documents that are empty after stripping",
                            self.path, dropped, len(docs))
        ids = self.vocab.encode([t for _, _, t in kept])
        arrays: dict[str, dict[str, np.ndarray]] = {}
        counts: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            want_val = split == "validation"
            sel = [k for k, (_, d, _) in enumerate(kept) if corpora.is_validation(d) == want_val]
            lengths = np.array([len(ids[k]) + 1 for k in sel], np.int64)
            tokens = np.full(int(lengths.sum()), vocab_lib.EOS_ID, np.int32)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            for k, start in zip(sel, offsets[:-1]):
                tokens[start:start + len(ids[k])] = ids[k]
            arrays[split] = {
                "tokens": tokens, "offsets": offsets,
                "doc_index": np.array([kept[k][0] for k in sel], np.int32),
                "doc_bytes": np.array([len(kept[k][2].encode()) for k in sel], np.int64)}
            counts[split] = {"documents": len(sel), "tokens": int(tokens.shape[0])}
        if counts["train"]["documents"] == 0:
            raise corpora.CorpusError(
                f"{self.path}: none of its {len(kept)} non-empty documents falls in the training "
                "split; a corpus needs more documents (about 3% go to validation)")
        meta = {"domain": self.domain, "corpus": str(self.path), "documents": len(docs),
                "dropped_documents": dropped, "splits": counts, "format": FORMAT_VERSION}
        self.entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=self.entry.name + ".tmp-", dir=self.entry.parent))
        try:
            for split, arrs in arrays.items():
                for name, a in arrs.items():
                    np.save(tmp / f"{split}_{name}.npy", a)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, self.entry)
            except OSError:
                if not (self.entry / "meta.json").exists():  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=64)
def _load_cached(domain, path_key, data_dir, vocab_path, cache) -> TokenizedCorpus:
    vocab = (vocab_lib.default_vocabulary() if vocab_path == str(vocab_lib.MODEL_PATH)
             else vocab_lib.Vocabulary(vocab_path))
    return TokenizedCorpus(domain, data_dir, vocab, cache)


def load(domain: str, data_dir=None, vocab: vocab_lib.Vocabulary | None = None) -> TokenizedCorpus:
    """TokenizedCorpus shared within the process (keyed by the file's identity and the cache)."""
    domain_id(domain)
    path = corpora.corpus_path(domain, data_dir)
    stat = (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None
    vocab_path = str(vocab.model_path if vocab else vocab_lib.MODEL_PATH)
    if stat is None:
        return TokenizedCorpus(domain, data_dir, vocab)  # raises the clear error
    return _load_cached(domain, (str(path), stat), str(data_dir) if data_dir else None,
                        vocab_path, str(cache_dir()))
