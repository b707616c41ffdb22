"""Prepared token shards: the on-disk format and its memory-mapped reader (numpy only).

A prepared domain (written by ``loam.data.prepare``) is a directory::

    manifest.json            written last: sources, tokenizer, counts, each shard's doc_index base
    shards/00000/            one per unit of the source (a file, a row range ...), in unit order
        shard.json           written last inside the shard: its counts; no shard.json, no shard
        train.tokens         every kept document's tokens then EOS (uint16, or uint32 for a
                             vocabulary of more than 65535 ids), little-endian, concatenated
        train.offsets        int64 [n+1]: document i is tokens[offsets[i]:offsets[i+1]]
        train.doc_index      int64 [n]: the document's record number within the unit
        train.doc_bytes      int64 [n]: UTF-8 bytes of its text (for bits per byte)
        train.doc_hash       uint64 [n]: first 8 bytes (little-endian) of sha256 of its id
        validation.*         the same for the validation split

A document's global index (its id in batches, score columns and selections) is its shard's
``base`` in the manifest (the records of all earlier units) plus its record number in the unit:
the position it would have if the units were read one after the other.

Arrays are memory-mapped, so opening a domain costs the manifest, and reading a block of it the
pages it touches. A prepared domain on an object store (``gs://...``) is copied once into a
local mirror (``$LOAM_CACHE_DIR/prepared-mirror``, keyed by its manifest), since a memory map
needs a local file.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import fsspec
import numpy as np

from loam.data.corpora import CorpusError

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
ARRAYS = ("tokens", "offsets", "doc_index", "doc_bytes", "doc_hash")
_FIXED_DTYPES = {"offsets": np.dtype("<i8"), "doc_index": np.dtype("<i8"),
                 "doc_bytes": np.dtype("<i8"), "doc_hash": np.dtype("<u8")}
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
# Memory maps kept open per domain (each holds a file descriptor).
_OPEN_ARRAYS = 256


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def array_dtype(name: str, tokens: str | np.dtype) -> np.dtype:
    return np.dtype(tokens).newbyteorder("<") if name == "tokens" else _FIXED_DTYPES[name]


def shard_name(index: int) -> str:
    return f"{index:05d}"


def cache_dir() -> Path:
    env = os.environ.get("LOAM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "loam"


def is_url(path) -> bool:
    """A path with a scheme (gs://, s3://, memory:// ...), other than file://."""
    text = os.fspath(path) if not isinstance(path, str) else path
    return "://" in text and not text.startswith("file://")


def local_path(path) -> Path:
    text = os.fspath(path) if not isinstance(path, str) else path
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL; a clear error if its package is missing."""

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise CorpusError(f"cannot open {url}: {e}; install the filesystem package of its "
                          "scheme (gcsfs for gs://, s3fs for s3://)") from None


def read_json(path) -> dict | None:
    """The JSON object at `path` (local or URL), or None if there is no file there."""
    try:
        if is_url(path):
            fs, inner = filesystem(str(path))
            with fs.open(inner, "rb") as f:
                data = f.read()
        else:
            data = local_path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        raise CorpusError(f"{path} is not valid JSON (a damaged preparation); delete "
                          f"{os.path.dirname(str(path))} and prepare again") from None


@dataclasses.dataclass(frozen=True)
class Split:
    """Documents of a split: the fields of ``loam.data.tokenized.Split``, plus their id hashes."""

    tokens: np.ndarray
    offsets: np.ndarray
    doc_index: np.ndarray
    doc_bytes: np.ndarray
    doc_hash: np.ndarray | None = None

    @property
    def num_documents(self) -> int:
        return int(self.doc_index.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class Block:
    """Whole documents ``start:end`` of one shard's split, read on access (a Split's fields).

    ``tokens`` is a view of the memory map; ``offsets`` (rebased to the block's tokens),
    ``doc_index`` (global) and the other columns are computed from it at each access, so a
    list of blocks over a corpus of any size holds only a few integers per block."""

    def __init__(self, domain: PreparedDomain, split: str, shard: int, start: int, end: int,
                 token_start: int, token_end: int):
        self.domain, self.split_name, self.shard = domain, split, shard
        self.start, self.end = start, end
        self._token_range = (token_start, token_end)

    def __repr__(self) -> str:
        return (f"Block({self.domain.domain}/{self.split_name} shard {self.shard} docs "
                f"{self.start}:{self.end}, {self.num_tokens} tokens)")

    def _array(self, name: str) -> np.ndarray:
        return self.domain.shard_array(self.shard, self.split_name, name)

    @property
    def num_documents(self) -> int:
        return self.end - self.start

    @property
    def num_tokens(self) -> int:
        return self._token_range[1] - self._token_range[0]

    @property
    def tokens(self) -> np.ndarray:
        return self._array("tokens")[self._token_range[0]:self._token_range[1]]

    @property
    def offsets(self) -> np.ndarray:
        return np.asarray(self._array("offsets")[self.start:self.end + 1]) - self._token_range[0]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self._array("offsets")[self.start:self.end + 1]))

    @property
    def doc_index(self) -> np.ndarray:
        base = self.domain.shard_base(self.shard)
        return np.asarray(self._array("doc_index")[self.start:self.end]) + base

    @property
    def doc_bytes(self) -> np.ndarray:
        return np.asarray(self._array("doc_bytes")[self.start:self.end])

    @property
    def doc_hash(self) -> np.ndarray:
        return np.asarray(self._array("doc_hash")[self.start:self.end])

    def load(self) -> Split:
        """The block as a Split (tokens still memory-mapped, the columns in memory)."""
        return Split(self.tokens, self.offsets, self.doc_index, self.doc_bytes, self.doc_hash)


class PreparedDomain:
    """A prepared domain (``open_prepared``): its manifest and memory-mapped shards."""

    def __init__(self, path: str | os.PathLike, manifest: dict, origin: str | None = None):
        self.path = Path(path)
        self.origin = origin or str(self.path)   # where it was opened from (a URL if mirrored)
        self.manifest = manifest
        self.domain: str = manifest["domain"]
        self.dtype = np.dtype(manifest["dtype"])
        self._shards = {int(s["index"]): s for s in manifest["shards"]}
        self._order = sorted(self._shards)
        self._lock = threading.Lock()
        self._open: collections.OrderedDict = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"PreparedDomain({self.domain!r}, {self.origin})"

    # ------------------------------------------------------------------ counts
    @property
    def source_fingerprint(self) -> str:
        return self.manifest["source_fingerprint"]

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.manifest["tokenizer_fingerprint"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    def _check_split(self, name: str) -> str:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return name

    def num_tokens(self, split: str = "train") -> int:
        return int(self.manifest["splits"][self._check_split(split)]["tokens"])

    def num_documents(self, split: str = "train") -> int:
        return int(self.manifest["splits"][self._check_split(split)]["documents"])

    @property
    def dropped_documents(self) -> int:
        return int(self.manifest["dropped_empty"])

    def shard_base(self, index: int) -> int:
        return int(self._shards[index]["base"])

    def shard_counts(self, index: int, split: str) -> dict:
        return self._shards[index]["splits"][split]

    # ------------------------------------------------------------------ arrays
    def shard_array(self, index: int, split: str, name: str) -> np.ndarray:
        """One array of one shard's split, memory-mapped (a bounded number are kept open)."""
        key = (index, split, name)
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        array = self._map(index, split, name)
        with self._lock:
            self._open[key] = array
            while len(self._open) > _OPEN_ARRAYS:
                self._open.popitem(last=False)
        return array

    def _map(self, index: int, split: str, name: str) -> np.ndarray:
        counts = self.shard_counts(index, self._check_split(split))
        n = int(counts["tokens"] if name == "tokens" else
                counts["documents"] + 1 if name == "offsets" else counts["documents"])
        dtype = array_dtype(name, self.dtype)
        path = self.path / "shards" / shard_name(index) / f"{split}.{name}"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorpusError(f"prepared domain {self.origin}: {path} is missing (a damaged "
                              f"preparation); delete {self.path} and prepare again") from None
        if size != n * dtype.itemsize:
            raise CorpusError(f"prepared domain {self.origin}: {path} holds {size} bytes, not the "
                              f"{n * dtype.itemsize} its manifest says; delete {self.path} and "
                              "prepare again")
        if n == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(n,))

    def split(self, name: str) -> Split:
        """The whole split: memory-mapped if the domain is one shard, else concatenated in
        memory (meant for validation splits and small domains; use `blocks` for the rest)."""
        name = self._check_split(name)
        parts = [i for i in self._order if self.shard_counts(i, name)["documents"] > 0]
        if len(parts) == 1 and self.shard_base(parts[0]) == 0:
            i = parts[0]
            return Split(*(self.shard_array(i, name, a) for a in ARRAYS))
        if not parts:
            return Split(np.zeros(0, self.dtype), np.zeros(1, np.int64),
                         np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint64))
        blocks = [Block(self, name, i, 0, self.shard_counts(i, name)["documents"], 0,
                        self.shard_counts(i, name)["tokens"]) for i in parts]
        lengths = np.concatenate([b.lengths for b in blocks])
        return Split(np.concatenate([b.tokens for b in blocks]),
                     np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                     np.concatenate([b.doc_index for b in blocks]),
                     np.concatenate([b.doc_bytes for b in blocks]),
                     np.concatenate([b.doc_hash for b in blocks]))

    def blocks(self, name: str, max_tokens: int) -> list[Block]:
        """The split as blocks of whole consecutive documents of one shard, in shard order, each
        of at most `max_tokens` tokens (a longer document is a block of its own)."""
        name = self._check_split(name)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        out: list[Block] = []
        for i in self._order:
            n = int(self.shard_counts(i, name)["documents"])
            if n == 0:
                continue
            offsets = np.asarray(self.shard_array(i, name, "offsets"))
            start = 0
            while start < n:
                limit = offsets[start] + max_tokens
                end = int(np.searchsorted(offsets, limit, side="right")) - 1
                end = min(max(end, start + 1), n)
                out.append(Block(self, name, i, start, end, int(offsets[start]),
                                 int(offsets[end])))
                start = end
        return out


def _check_manifest(manifest: dict | None, where: str) -> dict:
    if manifest is None:
        raise CorpusError(f"{where} is not a prepared domain (no {MANIFEST}: missing, or its "
                          "preparation did not finish); prepare it with `python -m "
                          "loam.data.prepare --config FILE`")
    if manifest.get("format") != FORMAT_VERSION:
        raise CorpusError(f"{where} was prepared in format {manifest.get('format')}, this loam "
                          f"reads format {FORMAT_VERSION}; prepare it again with `python -m "
                          "loam.data.prepare --config FILE`")
    return manifest


def open_prepared(path) -> PreparedDomain:
    """The prepared domain at `path` (a directory holding manifest.json, or the manifest
    itself). CorpusError if it is missing, unfinished or of another format. A URL is mirrored
    to a local directory first (see the module docstring)."""
    text = os.fspath(path) if not isinstance(path, str) else path
    if text.rstrip("/").endswith(MANIFEST):
        text = text.rstrip("/")[:-len(MANIFEST)].rstrip("/")
    if is_url(text):
        manifest = _check_manifest(read_json(f"{text.rstrip('/')}/{MANIFEST}"), text)
        return PreparedDomain(_mirror(text, manifest), manifest, origin=text)
    local = local_path(text)
    manifest = _check_manifest(read_json(local / MANIFEST), str(local))
    return PreparedDomain(local, manifest)


def _mirror(url: str, manifest: dict) -> Path:
    """A local copy of the prepared domain at `url` (made once; complete iff it has a
    manifest, which is copied last)."""
    blob = json.dumps(manifest, sort_keys=True).encode()
    name = url.rstrip("/").rsplit("/", 1)[-1]
    dest = cache_dir() / "prepared-mirror" / f"{name}-{hashlib.sha256(blob).hexdigest()[:16]}"
    if (dest / MANIFEST).exists():
        return dest
    fs, inner = filesystem(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        for shard in manifest["shards"]:
            sub = f"shards/{shard_name(int(shard['index']))}"
            (tmp / sub).mkdir(parents=True)
            names = [f"{split}.{a}" for split in SPLITS for a in ARRAYS] + [SHARD_META]
            for name in names:
                fs.get(f"{inner.rstrip('/')}/{sub}/{name}", str(tmp / sub / name))
        fs.get(f"{inner.rstrip('/')}/{MANIFEST}", str(tmp / MANIFEST))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / MANIFEST).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
