"""Per-document columns of a prepared domain: the values scorers write and selections read.

A scorer's columns live inside the prepared domain they score (``loam.data.shards``), local or
on an object store, in ``columns/``::

    columns/<column>.npz        values   float32 [records]: one value per document, at its global
                                         index (shard base + record number); NaN = unscored
                                doc_hash uint64 [records]: the scored documents' id hashes (0
                                         where none), checked against the shards when read
                                manifest the JSON below, so a column and its manifest never part
    columns/<scorer>.json       the manifest of the scorer's last run: scorer, parameters,
                                columns, source and tokenizer fingerprints, the scorer's
                                ``inputs()`` fingerprints, counts (written after its columns)
    columns/<scorer>.report.json  the scorer's summary of its columns, if it gives one

Each file is written whole or not at all (``prepare``'s atomic writes), and a domain's files only
once every value of the domain is in: a run that fails leaves the columns it would have replaced
as they were.

The bundled corpora ship precomputed columns (``loam/data/bundled/<name>.scores.npz``, indexed by
position in the corpus file, which is the global index of a bundled domain, with the corpus's
sha256). A bundled source reads them as a fallback for any column its store does not hold, so
curricula over the bundled domains work without a scoring run; a column written by a scorer takes
precedence.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loam.data import corpora, prepare, shards
from loam.data.shards import PreparedDomain

DIRECTORY = "columns"
COMMAND = "python -m loam.selection.score --scorer NAME [--config FILE] [--domains D]"
SHA_KEY = "__corpus_sha256__"  # the entry of a shipped scores file naming the corpus it scores
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class ColumnError(ValueError):
    """A column is missing, stale or malformed; the message says how to fix it."""


# ---------------------------------------------------------------------------------- where

def directory(prepared: PreparedDomain) -> str:
    """The domain's column directory: inside the prepared domain, where it was opened from (a
    bucket for a domain prepared on one, not its local mirror)."""
    return prepare._join(prepared.origin, DIRECTORY)


def _prepared(catalog_or_prepared, domain: str | None) -> PreparedDomain:
    if isinstance(catalog_or_prepared, PreparedDomain):
        return catalog_or_prepared
    if domain is None:
        raise ValueError("name the domain whose columns to read")
    return catalog_or_prepared.prepared(domain)


def _read_bytes(path: str) -> bytes | None:
    try:
        if shards.is_url(path):
            fs, inner = shards.filesystem(path)
            with fs.open(inner, "rb") as f:
                return f.read()
        return shards.local_path(path).read_bytes()
    except FileNotFoundError:
        return None


def _check_name(what: str, name: str) -> str:
    if not _NAME.match(name or ""):
        raise ColumnError(f"{what} name {name!r} is not usable as a file name; use letters, "
                          "digits, '_', '-' or '.'")
    return name


# ---------------------------------------------------------------------------------- documents

def doc_hashes(prepared: PreparedDomain) -> np.ndarray:
    """uint64 [records]: each document's id hash at its global index (0 for the records
    preparation dropped)."""
    out = np.zeros(int(prepared.manifest["records"]), np.uint64)
    for split in shards.SPLITS:
        for i in sorted(int(s["index"]) for s in prepared.manifest["shards"]):
            if prepared.shard_counts(i, split)["documents"] == 0:
                continue
            idx = np.asarray(prepared.shard_array(i, split, "doc_index")) + prepared.shard_base(i)
            out[idx] = prepared.shard_array(i, split, "doc_hash")
    return out


def doc_tokens(prepared: PreparedDomain) -> np.ndarray:
    """int64 [records]: each document's length in tokens (EOS included), 0 for dropped ones."""
    out = np.zeros(int(prepared.manifest["records"]), np.int64)
    for split in shards.SPLITS:
        for i in sorted(int(s["index"]) for s in prepared.manifest["shards"]):
            if prepared.shard_counts(i, split)["documents"] == 0:
                continue
            idx = np.asarray(prepared.shard_array(i, split, "doc_index")) + prepared.shard_base(i)
            out[idx] = np.diff(np.asarray(prepared.shard_array(i, split, "offsets")))
    return out


# ---------------------------------------------------------------------------------- write

def write(prepared: PreparedDomain, scorer: str, params: Mapping[str, Any],
          inputs: Mapping[str, str], values: Mapping[str, np.ndarray],
          report: Mapping | None = None) -> dict:
    """Writes a scorer's columns for one domain (each ``values[c]`` float32 [records], NaN where
    unscored), then its manifest and report. Returns the manifest."""
    _check_name("scorer", scorer)
    records = int(prepared.manifest["records"])
    hashes = doc_hashes(prepared)
    arrays = {}
    for name, v in values.items():
        _check_name("column", name)
        v = np.asarray(v, np.float32)
        if v.shape != (records,):
            raise ColumnError(f"column {name!r} of {prepared.domain!r} has shape {v.shape}; it "
                              f"needs one value per record of the domain ({records})")
        arrays[name] = v
    scored = {n: int(np.isfinite(v).sum()) for n, v in arrays.items()}
    manifest = {
        "scorer": scorer, "params": _jsonable(params), "columns": sorted(arrays),
        "domain": prepared.domain, "source": prepared.manifest.get("source"),
        "source_fingerprint": prepared.source_fingerprint,
        "tokenizer_fingerprint": prepared.tokenizer_fingerprint,
        "inputs": dict(inputs), "records": records,
        "documents": int((hashes != 0).sum()), "scored": scored,
        "mean": {n: float(np.nanmean(v)) if scored[n] else None for n, v in arrays.items()},
    }
    root = directory(prepared)
    for name, v in arrays.items():
        buf = io.BytesIO()
        np.savez(buf, values=v, doc_hash=np.where(np.isfinite(v), hashes, 0).astype(np.uint64),
                 manifest=np.array(json.dumps({**manifest, "column": name}, sort_keys=True)))
        prepare._write_atomic(prepare._join(root, f"{name}.npz"), buf.getvalue())
    prepare._write_atomic(prepare._join(root, f"{scorer}.json"), prepare._dumps(manifest))
    if report is not None:
        prepare._write_atomic(prepare._join(root, f"{scorer}.report.json"),
                              prepare._dumps(_jsonable(report)))
    return manifest


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


# ---------------------------------------------------------------------------------- read

def _stored(prepared: PreparedDomain, column: str):
    data = _read_bytes(prepare._join(directory(prepared), f"{column}.npz"))
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data)) as z:
            return z["values"], z["doc_hash"], json.loads(str(z["manifest"]))
    except (ValueError, KeyError, OSError) as e:
        raise ColumnError(f"{directory(prepared)}/{column}.npz is damaged ({e}); compute it "
                          f"again: {COMMAND}") from None


def available(catalog_or_prepared, domain: str | None = None) -> dict[str, str]:
    """The columns a domain has: {column: what wrote it} (a scorer name, or ``bundled`` for a
    shipped column of a bundled corpus)."""
    prepared = _prepared(catalog_or_prepared, domain)
    out = {c: "bundled" for c in _shipped_columns(prepared)}
    root = directory(prepared)
    if shards.is_url(root):
        fs, inner = shards.filesystem(root)
        names = [p.rsplit("/", 1)[-1] for p in fs.glob(inner + "/*.json")] if fs.exists(
            inner) else []
    else:
        d = shards.local_path(root)
        names = [p.name for p in d.glob("*.json")] if d.is_dir() else []
    for n in sorted(names):
        if n.endswith(".report.json"):
            continue
        m = json.loads(_read_bytes(prepare._join(root, n)) or b"{}")
        for c in m.get("columns", []):
            if prepare._exists(prepare._join(root, f"{c}.npz")):
                out[c] = m.get("scorer", n[:-5])
    return dict(sorted(out.items()))


def manifest(catalog_or_prepared, domain: str | None, column: str) -> dict | None:
    """The manifest a stored column was written with (None: not stored)."""
    got = _stored(_prepared(catalog_or_prepared, domain), column)
    return None if got is None else got[2]


def load(catalog_or_prepared, domain: str | None, column: str,
         inputs: Mapping[str, Mapping[str, str]] | None = None, scores_dir=None) -> np.ndarray:
    """float32 [records]: the column's value of every document at its global index (NaN where
    unscored). ColumnError, naming the command that computes it, if it is missing or stale: the
    domain's source or tokenizer changed since it was written, or (``inputs``: the current
    ``inputs()`` fingerprints per scorer name) what the scorer read besides the documents."""
    prepared = _prepared(catalog_or_prepared, domain)
    name = domain or prepared.domain
    got = _stored(prepared, column)
    if got is None:
        shipped = _shipped(prepared, column, scores_dir)
        if shipped is not None:
            return shipped
        have = sorted(available(prepared))
        raise ColumnError(f"score column {column!r} does not exist for domain {name!r} "
                          f"(available: {have}); compute it with {COMMAND}")
    values, hashes, m = got
    fix = f"compute it again: python -m loam.selection.score --scorer {m.get('scorer')}"
    for key in ("source_fingerprint", "tokenizer_fingerprint"):
        if m.get(key) != getattr(prepared, key):
            raise ColumnError(f"score column {column!r} of domain {name!r} is stale: it scores "
                              f"another version of the domain (its {key.split('_')[0]} changed "
                              f"since it was written); {fix}")
    current = (inputs or {}).get(m.get("scorer", ""))
    if current is not None and dict(current) != m.get("inputs", {}):
        raise ColumnError(f"score column {column!r} of domain {name!r} is stale: the inputs of "
                          f"scorer {m.get('scorer')!r} changed since it was written (recorded "
                          f"{m.get('inputs')}, now {dict(current)}); {fix}")
    mine = doc_hashes(prepared)
    if values.shape != mine.shape or np.any((hashes != 0) & (hashes != mine)):
        raise ColumnError(f"score column {column!r} of domain {name!r} does not match the "
                          f"domain's documents (their ids differ); {fix}")
    return values


# ---------------------------------------------------------------------------------- shipped

def columns_path(domain: str, directory=None) -> Path:
    """A shipped (or legacy) scores file: ``{directory}/{domain}.scores.npz``."""
    return Path(directory or corpora.data_dir()) / f"{domain}.scores.npz"


def corpus_sha256(domain: str, corpus_dir=None) -> str:
    return hashlib.sha256(corpora.corpus_path(domain, corpus_dir).read_bytes()).hexdigest()


def _bundled(prepared: PreparedDomain) -> tuple[str, str | None] | None:
    """(corpus name, data dir) of a bundled source's prepared domain, else None."""
    spec = prepared.manifest.get("source_spec") or {}
    source = str(spec.get("source") or prepared.manifest.get("source") or "")
    if not source.startswith("bundled:"):
        return None
    return source.split(":", 1)[1], spec.get("data_dir")


def _shipped_columns(prepared: PreparedDomain, scores_dir=None) -> list[str]:
    b = _bundled(prepared)
    if b is None:
        return []
    path = columns_path(b[0], scores_dir or b[1])
    if not path.exists():
        return []
    with np.load(path) as z:
        return sorted(k for k in z.files if k != SHA_KEY)


def _shipped(prepared: PreparedDomain, column: str, scores_dir=None) -> np.ndarray | None:
    b = _bundled(prepared)
    if b is None:
        return None
    name, data_dir = b
    path = columns_path(name, scores_dir or data_dir)
    if not path.exists():
        return None
    with np.load(path) as z:
        if column not in z.files:
            return None
        if str(z[SHA_KEY]) != corpus_sha256(name, data_dir):
            raise ColumnError(f"{path} scores a different version of the {name!r} corpus; "
                              f"compute the column again: {COMMAND}")
        values = np.asarray(z[column], np.float32)
    records = int(prepared.manifest["records"])
    if values.shape != (records,):
        raise ColumnError(f"{path} has {values.shape[0]} values for column {column!r}, the "
                          f"{name!r} corpus {records} documents; compute it again: {COMMAND}")
    return values
