"""Fixed batches outside the training stream: validation batches for eval, and every document of
a split in corpus order for scoring documents with a model (``loam.selection.score``)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from loam.data import catalog as catalog_lib
from loam.data import objectives as obj_lib
from loam.data.packing import DomainData, RowSpec, assemble
from loam.data.shards import Split

_EVAL_EPOCH = 2**32 - 1  # epoch key of these packings: disjoint from training epochs


def _batches(dd: DomainData, objective, seq_len: int, batch_size: int, seed: int,
             chunks: np.ndarray | None) -> Iterator[dict[str, np.ndarray]]:
    """Chunks (default: all, in corpus order) packed into rows and rows into batches of
    ``batch_size``; the last batch is padded with empty rows."""
    p = dd.pack(objective, seq_len, seed, _EVAL_EPOCH, shuffle=False, chunks=chunks)
    specs: list[RowSpec | None] = [(dd, p.order[p.row_ptr[r]:p.row_ptr[r + 1]], p.seeds)
                                   for r in range(p.num_rows)]
    specs += [None] * (-len(specs) % batch_size)
    for i in range(0, len(specs), batch_size):
        yield assemble(specs[i:i + batch_size], objective, seq_len, dd.domain_id)


def eval_batches(domain: str, objective, seq_len: int, batch_size: int, max_tokens: int,
                 seed: int = 0, data_dir=None, catalog: catalog_lib.Catalog | None = None
                 ) -> tuple[list[dict[str, np.ndarray]], int]:
    """Fixed packed batches of a domain's validation split and the UTF-8 bytes of the text they
    cover (for bits per byte). Whole documents are taken in corpus order while their tokens
    (EOS included) fit in ``max_tokens`` (at least one document); the last batch is padded with
    empty rows so every batch has ``batch_size`` rows."""
    catalog = catalog or catalog_lib.default(data_dir)
    name = catalog.check(domain)
    objective = obj_lib.get_objective(objective, catalog.tokenizer)
    split = catalog.split(name, "validation")
    if split.num_documents == 0:
        raise ValueError(f"domain {name!r} has no validation documents; its corpus is too small "
                         "for the 3% held-out split — add documents")
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"need max_tokens >= 1 and batch_size >= 1, got {max_tokens}, "
                         f"{batch_size}")
    n_docs = max(1, int(np.searchsorted(split.offsets[1:], max_tokens, side="right")))
    dd = DomainData(name, split, objective.max_input_len(seq_len), catalog.domain_id(name))
    chunks = np.flatnonzero(np.isin(dd.chunk_doc, np.asarray(split.doc_index[:n_docs])))
    batches = list(_batches(dd, objective, seq_len, batch_size, seed, chunks))
    return batches, int(np.asarray(split.doc_bytes[:n_docs]).sum())


def document_batches(domain: str, split: Split | str, objective, seq_len: int,
                     batch_size: int, seed: int = 0, data_dir=None,
                     catalog: catalog_lib.Catalog | None = None
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Every document of a split (a ``tokenized.Split`` or "train" / "validation"), whole (long
    documents as several chunks, none truncated or dropped), packed in corpus order into batches
    of ``batch_size`` rows. ``doc_ids`` gives each token's document — its position in the corpus
    file, as in training batches and score columns — and -1 on padding."""
    catalog = catalog or catalog_lib.default(data_dir)
    name = catalog.check(domain)
    objective = obj_lib.get_objective(objective, catalog.tokenizer)
    data = catalog.split(name, split) if isinstance(split, str) else split
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    if data.num_documents == 0:
        return iter(())
    dd = DomainData(name, data, objective.max_input_len(seq_len), catalog.domain_id(name))
    return _batches(dd, objective, seq_len, batch_size, seed, None)
