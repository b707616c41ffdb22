"""Packing: documents cut into chunks, chunks packed into rows of ``seq_len``, rows into batches.

A domain split is cut into chunks of at most ``objective.max_input_len(seq_len)`` tokens (never
dropped). A packing orders the chunks (a Philox permutation keyed on (seed, domain, epoch), a
view's order, or corpus order) and a first-fit packer over a small window of open rows packs the
objective's outputs into rows; it is a pure function of its arguments. Each chunk's corruption
seed is derived from (seed, domain, epoch, chunk index); examples are built only when their row
is materialised (``assemble``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from loam.data import objectives as obj_lib
from loam.data.shards import Split

PACK_WINDOW = 16  # open rows the packer may still fill
_BLOCK_KEY = 0xB10C  # separates the seed keys of blocks from those of whole domains


def first_fit(lengths: np.ndarray, capacity: int, window: int = PACK_WINDOW) -> np.ndarray:
    """Row of each item, packed in order: the first open row with room, else a new row. When
    more than ``window`` rows are open, the fullest one is closed. Rows are numbered in the
    order they were opened."""
    row_of = np.empty(len(lengths), np.int64)
    open_rows: list[list[int]] = []  # [row id, room]
    next_row = 0
    for i, n in enumerate(lengths.tolist()):
        for slot in open_rows:
            if slot[1] >= n:
                slot[1] -= n
                row_of[i] = slot[0]
                if slot[1] == 0:
                    open_rows.remove(slot)
                break
        else:
            if len(open_rows) == window:
                open_rows.remove(min(open_rows, key=lambda s: s[1]))
            row_of[i] = next_row
            if capacity - n > 0:
                open_rows.append([next_row, capacity - n])
            next_row += 1
    return row_of


@dataclasses.dataclass(frozen=True)
class Packing:
    """One pass over a domain's chunks, packed into rows."""
    order: np.ndarray       # chunk indices, row by row
    row_ptr: np.ndarray     # row r holds order[row_ptr[r]:row_ptr[r+1]]
    row_tokens: np.ndarray  # non-padding positions per row
    seeds: np.ndarray       # corruption seed of every chunk (by chunk index)

    @property
    def num_rows(self) -> int:
        return int(self.row_tokens.shape[0])


class DomainData:
    """A domain split (or one block of it) cut into chunks that the objective can turn into rows
    of seq_len. ``domain_id`` is the domain's position in the run's sources."""

    def __init__(self, name: str, split: Split, max_len: int, domain_id: int):
        self.name = name
        self.domain_id = int(domain_id)
        self.split = split
        self.tokens = split.tokens
        lengths = split.lengths
        per_doc = (lengths + max_len - 1) // max_len
        doc = np.repeat(np.arange(lengths.shape[0]), per_doc)
        first = np.cumsum(per_doc) - per_doc
        k = np.arange(doc.shape[0]) - first[doc]
        self.chunk_start = split.offsets[doc] + k * max_len
        self.chunk_len = np.minimum(max_len, lengths[doc] - k * max_len)
        self.chunk_doc = np.asarray(split.doc_index)[doc].astype(np.int32)
        self.num_chunks = int(doc.shape[0])

    def pack(self, objective, seq_len: int, seed: int, epoch: int, shuffle: bool = True,
             chunks: np.ndarray | None = None, block: int | None = None) -> Packing:
        """One pass over the chunks. ``block``: this data is block ``block`` of a domain cut
        into several (its shuffle and corruption seeds are then keyed on it too); None: the
        whole domain (or its only block)."""
        ids = np.arange(self.num_chunks)
        keys = (seed, self.domain_id, epoch) if block is None else (
            seed, self.domain_id, epoch, _BLOCK_KEY, block)
        seeds = obj_lib.derive_seeds(*keys, ids)
        out_len = objective.output_lens(self.chunk_len, seeds)
        if chunks is not None:
            order = chunks
        elif shuffle:
            key = int(obj_lib.derive_seeds(*keys))
            order = np.random.Generator(np.random.Philox(key=key)).permutation(self.num_chunks)
        else:
            order = ids
        row_of = first_fit(out_len[order], seq_len)
        by_row = np.argsort(row_of, kind="stable")
        counts = np.bincount(row_of, minlength=int(row_of.max(initial=-1)) + 1)
        row_ptr = np.concatenate([[0], np.cumsum(counts)])
        row_tokens = np.bincount(row_of, weights=out_len[order], minlength=counts.shape[0])
        return Packing(order[by_row], row_ptr, row_tokens.astype(np.int64), seeds)


RowSpec = tuple["DomainData", np.ndarray, np.ndarray]  # (domain data, chunk ids, chunk seeds)


def assemble(rows: Sequence[RowSpec | None], objective, seq_len: int,
             default_domain: int = 0) -> dict[str, np.ndarray]:
    """Packed batch features from rows given as (domain data, chunk indices, chunk seeds);
    None is an all-padding row. Per-example work is slicing; per-token work is vectorised."""
    B, L = len(rows), seq_len
    causal = isinstance(objective, obj_lib.CausalLM)
    toks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    lens: list[int] = []
    prefixes: list[int] = []
    ex_rows: list[int] = []
    ex_doc: list[int] = []
    row_domain = np.full(B, default_domain, np.int32)
    for r, spec in enumerate(rows):
        if spec is None:
            continue
        dd, chunk_ids, seeds = spec
        row_domain[r] = dd.domain_id
        for c in chunk_ids.tolist():
            start, n = int(dd.chunk_start[c]), int(dd.chunk_len[c])
            piece = np.asarray(dd.tokens[start:start + n])
            if causal:
                toks.append(piece)
                lens.append(n)
                prefixes.append(0)
            else:
                ex = objective.apply(piece, int(seeds[c]))
                toks.append(ex["tokens"])
                masks.append(ex["loss_mask"])
                lens.append(ex["tokens"].shape[0])
                prefixes.append(ex["prefix_len"])
            ex_rows.append(r)
            ex_doc.append(dd.chunk_doc[c])
    out = {
        "inputs": np.zeros((B, L), np.int32), "targets": np.zeros((B, L), np.int32),
        "loss_weights": np.zeros((B, L), np.float32), "segment_ids": np.zeros((B, L), np.int32),
        "positions": np.zeros((B, L), np.int32), "prefix": np.zeros((B, L), np.int32),
        "domain_ids": np.repeat(row_domain[:, None], L, axis=1),
        "doc_ids": np.full((B, L), -1, np.int32),
    }
    if not toks:
        return out
    ex_len = np.asarray(lens, np.int64)
    ex_row = np.asarray(ex_rows, np.int64)
    ex_prefix = np.asarray(prefixes, np.int64)
    tok = np.concatenate(toks).astype(np.int32)
    seg_start = np.cumsum(ex_len) - ex_len
    pos = np.arange(tok.shape[0]) - np.repeat(seg_start, ex_len)
    # Offset of each example inside its row, and its segment number (1, 2, ...).
    new_row = np.concatenate([[True], ex_row[1:] != ex_row[:-1]])
    row_first = np.maximum.accumulate(np.where(new_row, np.arange(ex_row.shape[0]), 0))
    offset = seg_start - seg_start[row_first]
    segment = np.arange(ex_row.shape[0]) - row_first + 1
    if np.any(offset + ex_len > L):
        raise AssertionError("packed example overflows its row; objective output_lens is wrong")
    rr = np.repeat(ex_row, ex_len)
    cc = np.repeat(offset, ex_len) + pos
    inputs = np.empty_like(tok)
    inputs[1:] = tok[:-1]
    inputs[pos == 0] = 0
    out["targets"][rr, cc] = tok
    out["inputs"][rr, cc] = inputs
    out["loss_weights"][rr, cc] = 1.0 if causal else np.concatenate(masks)
    out["segment_ids"][rr, cc] = np.repeat(segment, ex_len)
    out["positions"][rr, cc] = pos
    prefix_len = np.repeat(ex_prefix, ex_len)
    out["prefix"][rr, cc] = ((prefix_len > 0) & (pos <= prefix_len)).astype(np.int32)
    out["doc_ids"][rr, cc] = np.repeat(np.asarray(ex_doc, np.int32), ex_len)
    return out
