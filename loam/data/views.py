"""Document views and the per-document score columns they read.

A view says how one domain's documents are drawn: shuffled (the default), ordered by a score
column, and/or restricted to a quantile range of a column. Columns live next to a corpus in
`{directory}/{domain}.scores.npz`: one float32 array per column, indexed by the document's position
in the corpus file (the `doc_ids` of a batch), and the sha256 of the corpus they score, so that a
rebuilt corpus cannot silently pair with stale scores. `loam.selection` writes them; this module
only reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from loam.data import corpora

SHA_KEY = "__corpus_sha256__"  # the entry of a columns file naming the corpus it scores
_FIX = ("compute it with `python -m loam.selection.score --scorer heuristic` (or "
        "`--scorer model --workdir RUN --column NAME`)")


class ColumnError(ValueError):
    """A score column is missing, stale or malformed; the message says how to fix it."""


def columns_path(domain: str, directory=None) -> Path:
    return Path(directory or corpora.data_dir()) / f"{domain}.scores.npz"


def corpus_sha256(domain: str, corpus_dir=None) -> str:
    return hashlib.sha256(corpora.corpus_path(domain, corpus_dir).read_bytes()).hexdigest()


def available(domain: str, directory=None) -> list[str]:
    """Names of the columns stored for ``domain``."""
    path = columns_path(domain, directory)
    if not path.exists():
        return []
    with np.load(path) as z:
        return sorted(k for k in z.files if k != SHA_KEY)


def load_column(domain: str, column: str, directory=None, corpus_dir=None) -> np.ndarray:
    """One score per document of the corpus file; raises ColumnError if missing or stale."""
    path = columns_path(domain, directory)
    if not path.exists():
        raise ColumnError(f"domain {domain!r} has no score columns ({path} is missing); {_FIX}")
    with np.load(path) as z:
        names = [k for k in z.files if k != SHA_KEY]
        if column not in names:
            raise ColumnError(f"score column {column!r} does not exist for domain {domain!r} "
                              f"(available: {sorted(names)}); {_FIX}")
        if str(z[SHA_KEY]) != corpus_sha256(domain, corpus_dir):
            raise ColumnError(f"{path} scores a different version of the {domain!r} corpus; "
                              f"recompute it: {_FIX}")
        return z[column]


@dataclasses.dataclass(frozen=True)
class View:
    """How one domain's documents are drawn. Hashable: rows consumed are counted per view."""
    order_column: str | None = None
    ascending: bool = True
    keep_column: str | None = None
    keep_range: tuple[float, float] = (0.0, 1.0)

    @property
    def is_default(self) -> bool:
        return self.order_column is None and self.keep_column is None

    def describe(self) -> str:
        parts = []
        if self.order_column:
            parts.append(f"order {self.order_column} {'asc' if self.ascending else 'desc'}")
        if self.keep_column:
            parts.append(f"keep {self.keep_column} in {list(self.keep_range)}")
        return ", ".join(parts) or "shuffled"


DEFAULT_VIEW = View()


def select_chunks(view: View, domain: str, chunk_doc: np.ndarray, doc_index: np.ndarray,
                  scores_dir=None, corpus_dir=None) -> np.ndarray:
    """Indices of the chunks a view draws from: those of the kept documents (keep: the
    documents of the split whose column rank lies in the range), sorted by the order column
    (unscored last) or else in index order (the stream shuffles them per epoch).
    ``chunk_doc`` is each chunk's document (corpus position), ``doc_index`` the split's
    documents."""
    ids = np.arange(chunk_doc.shape[0])
    if view.keep_column:
        col = load_column(domain, view.keep_column, scores_dir, corpus_dir)
        docs = np.asarray(doc_index)
        score = col[docs]
        finite = np.isfinite(score)
        order = np.argsort(score[finite], kind="stable")
        r = np.empty(order.shape[0])
        r[order] = np.arange(order.shape[0]) / max(order.shape[0] - 1, 1)
        rank = np.full(docs.shape[0], -1.0)
        rank[finite] = r
        lo, hi = view.keep_range
        kept = docs[finite & (rank >= lo) & (rank <= hi)]
        ids = ids[np.isin(chunk_doc, kept)]
        if ids.size == 0:
            raise ValueError(f"keeping {view.keep_column} quantiles {list(view.keep_range)} of "
                             f"domain {domain!r} keeps no documents; widen the range")
    if view.order_column:
        col = load_column(domain, view.order_column, scores_dir, corpus_dir)
        score = col[chunk_doc[ids]].astype(np.float64)
        score = np.where(np.isfinite(score), score, np.inf)  # unscored last
        ids = ids[np.argsort(score if view.ascending else -score, kind="stable")]
    return ids
