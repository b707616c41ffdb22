"""Per-document score columns stored next to a corpus.

`{directory}/{domain}.scores.npz` holds one float32 array per column, indexed by the document's
position in the corpus file (the `doc_ids` of a batch), and the sha256 of the corpus it scores, so
that a rebuilt corpus cannot silently pair with stale scores.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from loam.data import corpora

_SHA_KEY = "__corpus_sha256__"


class ColumnError(ValueError):
    """A score column is missing, stale or malformed; the message says how to fix it."""


def columns_path(domain: str, directory=None) -> Path:
    return Path(directory or corpora.data_dir()) / f"{domain}.scores.npz"


def _corpus_sha(domain: str, corpus_dir=None) -> str:
    return hashlib.sha256(corpora.corpus_path(domain, corpus_dir).read_bytes()).hexdigest()


def available(domain: str, directory=None) -> list[str]:
    path = columns_path(domain, directory)
    if not path.exists():
        return []
    with np.load(path) as z:
        return sorted(k for k in z.files if k != _SHA_KEY)


def write_columns(domain: str, columns: dict[str, np.ndarray], directory=None,
                  corpus_dir=None) -> Path:
    """Adds or replaces columns (atomically); other columns of the domain are kept."""
    path = columns_path(domain, directory)
    sha = _corpus_sha(domain, corpus_dir)
    existing = {}
    if path.exists():
        with np.load(path) as z:
            if str(z[_SHA_KEY]) == sha:
                existing = {k: z[k] for k in z.files if k != _SHA_KEY}
    lengths = {len(v) for v in columns.values()} | {len(v) for v in existing.values()}
    if len(lengths) > 1:
        raise ColumnError(f"columns for {domain!r} have different lengths {sorted(lengths)}; "
                          "every column needs one value per document of the corpus")
    existing.update({k: np.asarray(v, np.float32) for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **existing, **{_SHA_KEY: np.array(sha)})
    os.replace(tmp, path)
    return path


def load_column(domain: str, column: str, directory=None, corpus_dir=None) -> np.ndarray:
    path = columns_path(domain, directory)
    fix = (f"compute it with `python -m loam.selection.score --scorer heuristic` (or "
           f"`--scorer model --workdir RUN --column NAME`)")
    if not path.exists():
        raise ColumnError(f"domain {domain!r} has no score columns ({path} is missing); {fix}")
    with np.load(path) as z:
        names = [k for k in z.files if k != _SHA_KEY]
        if column not in names:
            raise ColumnError(f"score column {column!r} does not exist for domain {domain!r} "
                              f"(available: {sorted(names)}); {fix}")
        if str(z[_SHA_KEY]) != _corpus_sha(domain, corpus_dir):
            raise ColumnError(f"{path} scores a different version of the {domain!r} corpus; "
                              f"recompute it: {fix}")
        return z[column]
