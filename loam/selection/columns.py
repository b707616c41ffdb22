"""Writes score columns in the format of the bundled corpora's shipped ``*.scores.npz``.

The column store of prepared domains (``loam.data.columns``) is where scorers write; this format
is what ships with the bundled corpora (read as their fallback) and what
``python -m loam.selection.score --out DIR`` exports.

`{directory}/{domain}.scores.npz` holds one float32 array per column, indexed by the document's
position in the corpus file (the `doc_ids` of a batch), and the sha256 of the corpus it scores, so
that a rebuilt corpus cannot silently pair with stale scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from loam.data.columns import SHA_KEY, ColumnError, columns_path, corpus_sha256


def write_columns(domain: str, columns: dict[str, np.ndarray], directory=None,
                  corpus_dir=None) -> Path:
    """Adds or replaces columns (atomically); other columns of the domain are kept."""
    path = columns_path(domain, directory)
    sha = corpus_sha256(domain, corpus_dir)
    existing = {}
    if path.exists():
        with np.load(path) as z:
            if str(z[SHA_KEY]) == sha:
                existing = {k: z[k] for k in z.files if k != SHA_KEY}
    lengths = {len(v) for v in columns.values()} | {len(v) for v in existing.values()}
    if len(lengths) > 1:
        raise ColumnError(f"columns for {domain!r} have different lengths {sorted(lengths)}; "
                          "every column needs one value per document of the corpus")
    existing.update({k: np.asarray(v, np.float32) for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays: dict[str, Any] = {**existing, SHA_KEY: np.array(sha)}
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path
