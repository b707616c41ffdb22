"""The deterministic mixture stream: the object the trainer asks for batches.

The batch at step t is a pure function of (seed, config, t) — and, for an adaptive weight source,
of the losses of earlier steps, which the weights log records — computed by random access:

* Every batch row comes from one domain. How many rows each domain gets at step t follows the
  cumulative target ``B * sum_{s<=t} w(s)`` by largest remainder on the running deficit, so the
  realised shares track the weights exactly over time. This needs no data, only integers: the
  data position is the per-domain count of rows consumed before t.
* The weights w(s) come from the stream's weights log (``loam.data.weights``).
* A domain's rows are read from packed epochs (``loam.data.packing``) of its current view
  (``loam.data.views``): shuffled, or ordered / filtered by a score column.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from loam.data import catalog as catalog_lib
from loam.data import objectives as obj_lib
from loam.data import views
from loam.data import weights as weights_lib
from loam.data.packing import DomainData, Packing, assemble

# Tokens per block: a domain's training split is shuffled and packed a block of whole documents
# at a time (the bundled domains are one block each).
BLOCK_TOKENS = 1 << 24
_BLOCKS_SALT = 0xB0C5  # seed key of the per-epoch order of a domain's blocks


def allocate_rows(deficit: Sequence[float], rows: int) -> list[int]:
    """Integer rows per domain (summing to ``rows``) that best close the running deficit:
    floors of the positive deficits, then the largest remainders (ties to the lower index).
    Plain Python on a handful of numbers: it runs once per step, sequentially from step 0."""
    n = [int(math.floor(max(d, 0.0) + 1e-9)) for d in deficit]
    total = sum(n)
    if total > rows:  # some domain is over-served after a schedule change: one row at a time
        n = [0] * len(n)
        for _ in range(rows):
            gaps = [d - k for d, k in zip(deficit, n)]
            n[gaps.index(max(gaps))] += 1
        return n
    order = sorted(range(len(n)), key=lambda i: -(deficit[i] - n[i]))  # stable
    for i in order[:rows - total]:
        n[i] += 1
    return n


class MixtureStream:
    """Packed batches of a weighted mixture of domains, by random access on the step.

    ``weights``: a ``WeightSource`` or anything ``weights.as_source`` takes (a dict, one number
    per domain, a ``step -> weights`` function).
    """

    def __init__(self, domains: Sequence[str], objective, weights, seq_len: int,
                 batch_size: int, seed: int, data_dir=None, process_index: int = 0,
                 process_count: int = 1, pack_cache: int = 3, scores_dir=None,
                 catalog: catalog_lib.Catalog | None = None, block_tokens: int = BLOCK_TOKENS,
                 selection: Mapping[str, views.Selection] | None = None):
        self.names = list(domains)
        if not self.names:
            raise ValueError("the mixture has no domains; list at least one task or domain")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"domains {self.names} list a name twice; list each once")
        self.catalog = catalog or catalog_lib.default(data_dir)
        self.domain_names = [self.catalog.check(d) for d in self.names]
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} "
                             "processes; make the global batch a multiple of the process count")
        self.objective = obj_lib.get_objective(objective, self.catalog.tokenizer)
        self.source = weights_lib.as_source(weights, self.names)
        self.log = weights_lib.WeightsLog(self.source, self.names)
        # The source's index of each stream domain (None: the source does not name it).
        self._source_k = [self.source.domains.index(n) if n in self.source.domains else None
                          for n in self.names]
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.data_dir, self.scores_dir = data_dir, scores_dir or data_dir
        self.max_input_len = self.objective.max_input_len(self.seq_len)
        self.domain_ids = np.array([self.catalog.domain_id(d) for d in self.domain_names],
                                   np.int32)
        # Each domain's training split as memory-mapped blocks of whole documents: packing,
        # shuffling and memory work a block at a time, so they do not grow with the corpus.
        self._blocks = [self.catalog.blocks(d, "train", block_tokens) for d in self.domain_names]
        self._block_data: collections.OrderedDict = collections.OrderedDict()
        self.num_tokens = [int(self.catalog.num_tokens(d, "train")) for d in self.domain_names]
        self.fingerprints = self.catalog.fingerprints(self.domain_names)
        if getattr(self.source, "validate_at_start", True):
            self.weights_at(0)  # validate now, not at the first batch
        self._reset_allocation()
        # Per domain and view: the segments (epoch, block) consumed so far in order, with their
        # rows and tokens (small); packings (LRU).
        self._segments: dict = {}
        self._seg_rows: dict = {}
        self._seg_tokens: dict = {}
        self._view_base: dict = {}
        # Per domain: its selection (config.data.selection), which every view of it obeys.
        unknown = sorted(set(selection or {}) - set(self.names))
        if unknown:
            raise views.SelectionError(f"config.data.selection names domain(s) {unknown} the "
                                       f"mixture does not train on ({self.names})")
        self._selection = [(selection or {}).get(n) for n in self.names]
        for k in range(len(self.names)):  # columns and quantile ranges are checked now, not mid-run
            for v in self._sources(k):
                if v is not None:
                    self._view_chunks(k, v, 0)
        self.column_fingerprints = self._column_fingerprints()
        self.selection_summaries = [self._selection_summary(k) for k in range(len(self.names))
                                    if self._selection[k] is not None]
        if process_index == 0:
            for s in self.selection_summaries:
                print(views.describe_summary(s), flush=True)
        self._packings: collections.OrderedDict = collections.OrderedDict()
        self._pack_cache = max(1, pack_cache) * len(self.names)

    def domain_data(self, k: int, block: int | None = None) -> DomainData:
        """Domain k's chunks: of one block, or of the whole split (None; what views use)."""
        blocks = self._blocks[k]
        if block is None and len(blocks) == 1:
            block = 0
        key = (k, block)
        if key in self._block_data:
            self._block_data.move_to_end(key)
            return self._block_data[key]
        split = (self.catalog.split(self.domain_names[k], "train") if block is None
                 else blocks[block])
        dd = DomainData(self.domain_names[k], split, self.max_input_len, int(self.domain_ids[k]))
        self._block_data[key] = dd
        if len(self._block_data) > 2 * len(self.names) + 2:
            self._block_data.popitem(last=False)
        return dd

    @property
    def data(self) -> list[DomainData]:
        """Every domain's whole training split as one DomainData (loads each domain's chunk
        table: for inspection and tests, not used by batches of a multi-block domain)."""
        return [self.domain_data(k) for k in range(len(self.names))]

    # -- weights and the data position (integers only, no data touched)

    def weights_at(self, step: int) -> np.ndarray:
        """The weights of ``step`` in the order of ``names`` (normalised; from the log)."""
        return self.log.at(step)

    def weights_log(self, upto: int) -> np.ndarray:
        """The weights of steps [0, upto), shape [upto, len(names)]."""
        return self.log.rows(upto)

    def observe(self, step: int, loss_sums, tokens) -> None:
        """Per-domain training loss sums and token counts of ``step`` (in the order of
        ``names``), for an adaptive weight source; see ``weights.FEEDBACK_DELAY``."""
        self.log.observe(step, loss_sums, tokens)

    def _reset_allocation(self) -> None:
        # Memoised allocation: _consumed[t] = rows per domain consumed before step t.
        self._consumed = np.zeros((1024, len(self.names)), np.int64)
        self._num_alloc = 1
        self._target = [0.0] * len(self.names)  # B * sum of weights over the allocated steps

    def rows_consumed(self, step: int) -> np.ndarray:
        """Rows each domain has contributed before ``step`` (global batch)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        if step >= self._num_alloc:
            self._extend_allocation(step)
        return self._consumed[step].copy()

    def _extend_allocation(self, step: int) -> None:
        if step >= self._consumed.shape[0]:
            grown = np.zeros((max(2 * self._consumed.shape[0], step + 1), len(self.names)),
                             np.int64)
            grown[:self._num_alloc] = self._consumed[:self._num_alloc]
            self._consumed = grown
        constant = self.log.constant.tolist() if self.log.constant is not None else None
        cons = self._consumed[self._num_alloc - 1].tolist()
        target, B = self._target, self.batch_size
        for s in range(self._num_alloc - 1, step):
            w = constant if constant is not None else self.log.at(s).tolist()
            target = [t + B * x for t, x in zip(target, w)]
            n = allocate_rows([t - c for t, c in zip(target, cons)], B)
            cons = [c + k for c, k in zip(cons, n)]
            self._consumed[s + 1] = cons
        self._target, self._num_alloc = target, step + 1

    def rows_at(self, step: int) -> np.ndarray:
        return self.rows_consumed(step + 1) - self.rows_consumed(step)

    def state_dict(self, step: int) -> dict:
        """The data position at ``step`` (JSON-able). With an adaptive weight source it also
        holds the weights log, the source's state and the observations not yet handed to it."""
        return {"step": int(step), "rows_consumed": self.rows_consumed(step).tolist(),
                "domains": list(self.names), "seed": self.seed, "batch_size": self.batch_size,
                "fingerprints": dict(self.fingerprints), **self.log.state_dict(step),
                **({"columns": dict(self.column_fingerprints)} if self.column_fingerprints
                   else {})}

    def check_state(self, state: Mapping) -> None:
        """Raises ValueError if a saved data position disagrees with this stream's config. With
        an adaptive source the rows consumed are checked by ``load_state``, once the saved log
        is in place."""
        saved = state.get("fingerprints") or {}
        changed = [d for d in self.names if d in saved and saved[d] != self.fingerprints[d]]
        if changed:
            raise ValueError(
                f"the data of domain(s) {changed} changed since step {state['step']} was saved "
                "(their source files, source options or tokenizer differ from the run's): "
                "resuming would train on other documents than the run's. Restore the original "
                "files (with their modification times, as `cp -p` does), or train into a new "
                "workdir")
        saved_columns = state.get("columns") or {}
        changed = [d for d, fp in saved_columns.items()
                   if self.column_fingerprints.get(d, fp) != fp]
        if changed:
            raise ValueError(
                f"the score columns that select or order the documents of domain(s) {changed} "
                f"changed since step {state['step']} was saved (they were scored again): "
                "resuming would train on other documents than the run's. Restore the columns "
                "the run used, or train into a new workdir")
        mine = {"domains": list(self.names), "seed": self.seed, "batch_size": self.batch_size}
        if not self.log.adaptive or self.log.length >= int(state["step"]):
            mine["rows_consumed"] = self.rows_consumed(int(state["step"])).tolist()
        self._compare(state, mine)

    def _compare(self, state: Mapping, mine: dict) -> None:
        step = int(state["step"])
        for key, value in mine.items():
            if key in state and list(np.atleast_1d(state[key])) != list(np.atleast_1d(value)):
                raise ValueError(
                    f"the checkpoint's data position at step {step} has {key}={state[key]}, but "
                    f"this config gives {value}: the domains, weights schedule, batch size "
                    "or seed changed since it was saved. Restore the original config to resume "
                    "exactly, or train into a new workdir")

    def load_state(self, state: Mapping) -> None:
        """Checks a saved data position and restores the weights log and source state it holds."""
        self.check_state(state)
        if self.log.adaptive:
            self.log.load_state_dict(state)
            self._reset_allocation()
            self._compare(state, {"rows_consumed": self.rows_consumed(int(state["step"]))})

    # -- packings (one source per domain and view: a view orders or filters the documents)

    def _with_selection(self, k: int, v):
        """View v (None: the default) of domain k within the domain's selection."""
        sel = self._selection[k]
        return v if sel is None else dataclasses.replace(v or views.DEFAULT_VIEW, selection=sel)

    def _column_fingerprints(self) -> dict[str, str]:
        """Per domain whose views read score columns: a hash of their values, saved with the
        data position (columns scored again would draw other documents)."""
        out = {}
        for k, name in enumerate(self.names):
            cols = sorted({c for v in self._sources(k) if v is not None
                           for c in views.columns_read(v)})
            if not cols:
                continue
            h = hashlib.sha256()
            for c in cols:
                values = views.load_column(self.domain_names[k], c, self.scores_dir,
                                           catalog=self.catalog)
                h.update(c.encode() + b"\0" + np.ascontiguousarray(values).tobytes())
            out[name] = h.hexdigest()[:16]
        return out

    def _selection_summary(self, k: int) -> dict:
        sel = self._selection[k]
        assert sel is not None
        split = self.domain_data(k).split
        docs, lengths = np.asarray(split.doc_index), np.asarray(split.lengths)
        copies = views.select_documents(
            sel, self.domain_names[k], docs, lengths,
            lambda c: views.load_column(self.domain_names[k], c, self.scores_dir,
                                        catalog=self.catalog))
        return views.selection_summary(sel, self.names[k], docs, lengths, copies)

    def _view(self, step: int, k: int):
        j = self._source_k[k]
        v = None if j is None else self.source.view_at(step, j)
        return self._with_selection(k, None if v is None or v.is_default else v)

    def _intervals(self, k: int):
        j = self._source_k[k]
        intervals = None if j is None else self.source.view_intervals(j)
        if intervals is None or self._selection[k] is None:
            return intervals
        return [(a, b, self._with_selection(k, None if v.is_default else v))
                for a, b, v in intervals]

    def _source_rows_before(self, step: int, k: int, v) -> int:
        """Rows that domain k's view `v` contributed before ``step``."""
        intervals = self._intervals(k)
        if intervals is None:
            return int(self.rows_consumed(step)[k])
        total = 0
        for a, b, view in intervals:
            view = None if view.is_default else view
            if view != v or a >= step:
                continue
            end = step if b is None else min(b, step)
            total += int(self.rows_consumed(end)[k] - self.rows_consumed(a)[k])
        return total

    def _sources(self, k: int) -> list:
        intervals = self._intervals(k)
        if intervals is None:
            return [self._with_selection(k, None)]
        return list(dict.fromkeys(None if v.is_default else v for _, _, v in intervals))

    def _view_chunks(self, k: int, v, epoch: int) -> np.ndarray:
        """Chunk order of one epoch of a view: sorted by its column, or a seeded shuffle of the
        kept chunks. A view reads the domain's whole split (its chunk table is in memory)."""
        dd = self.domain_data(k)
        base = self._view_base.get((k, v))
        if base is None:
            base = self._view_base[(k, v)] = views.select_chunks(
                v, dd.name, dd.chunk_doc, dd.split.doc_index, self.scores_dir, self.data_dir,
                catalog=self.catalog, lengths=dd.split.lengths)
        if v.order_column:
            return base  # the same order every epoch
        salt = int.from_bytes(hashlib.sha256(v.describe().encode()).digest()[:4], "little")
        key = int(obj_lib.derive_seeds(self.seed, dd.domain_id, epoch, salt))
        return base[np.random.Generator(np.random.Philox(key=key)).permutation(base.shape[0])]

    def _block_order(self, k: int, epoch: int) -> np.ndarray:
        n = len(self._blocks[k])
        if n == 1:
            return np.zeros(1, np.int64)
        key = int(obj_lib.derive_seeds(self.seed, int(self.domain_ids[k]), epoch, _BLOCKS_SALT))
        return np.random.Generator(np.random.Philox(key=key)).permutation(n)

    def _segment(self, k: int, i: int, v=None) -> tuple[int, int | None]:
        """The i-th packed segment domain k's view v is read from: (epoch, block). The default
        view goes through every block of an epoch (in a seeded order) before the next epoch; a
        view reads its whole split once per epoch (block None)."""
        if v is not None:
            return i, None
        n = len(self._blocks[k])
        epoch, pos = divmod(i, n)
        return epoch, (None if n == 1 else int(self._block_order(k, epoch)[pos]))

    def packing(self, k: int, epoch: int, v=None, block: int | None = None) -> Packing:
        key = (k, v, epoch, block)
        if key in self._packings:
            self._packings.move_to_end(key)
            return self._packings[key]
        chunks = None if v is None else self._view_chunks(k, v, epoch)
        p = self.domain_data(k, block).pack(self.objective, self.seq_len, self.seed, epoch,
                                            chunks=chunks, block=block)
        self._packings[key] = p
        if len(self._packings) > self._pack_cache:
            self._packings.popitem(last=False)
        return p

    def _ensure_segments(self, k: int, rows: int, v=None) -> None:
        """Pack segments of domain k's view v until they hold at least ``rows`` rows."""
        segs = self._segments.setdefault((k, v), [])
        sr = self._seg_rows.setdefault((k, v), [])
        st = self._seg_tokens.setdefault((k, v), [])
        total = sum(sr)
        while total < rows:
            seg = self._segment(k, len(segs), v)
            p = self.packing(k, seg[0], v, seg[1])
            segs.append(seg)
            sr.append(p.num_rows)
            st.append(int(p.row_tokens.sum()))
            total += p.num_rows

    def _locate(self, k: int, row: int, v=None) -> tuple[int, tuple[int, int | None], int]:
        """(segment number, (epoch, block), row within it) of a row index of domain k's view v."""
        self._ensure_segments(k, row + 1, v)
        sr = self._seg_rows[(k, v)]
        ends = np.cumsum(sr)
        i = int(np.searchsorted(ends, row, side="right"))
        return i, self._segments[(k, v)][i], row - int(ends[i] - sr[i])

    # -- batches

    def _row_specs(self, step: int, lo: int, hi: int):
        counts = self.rows_at(step)
        starts = np.cumsum(counts) - counts
        specs = []
        for i in range(lo, hi):
            k = int(np.searchsorted(starts + counts, i, side="right"))
            v = self._view(step, k)
            before = self._source_rows_before(step, k, v)
            _, (epoch, block), r = self._locate(k, int(before + i - starts[k]), v)
            p = self.packing(k, epoch, v, block)
            specs.append((self.domain_data(k, block), p.order[p.row_ptr[r]:p.row_ptr[r + 1]],
                          p.seeds))
        return specs

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at ``step``: rows [p*B/P, (p+1)*B/P)."""
        local = self.batch_size // self.process_count
        lo = self.process_index * local
        return assemble(self._row_specs(int(step), lo, lo + local), self.objective, self.seq_len)

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        return assemble(self._row_specs(int(step), 0, self.batch_size), self.objective,
                        self.seq_len)

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1

    # -- accounting

    def stats(self, step: int) -> dict:
        """Per-domain consumption before ``step`` (global batch, in the order of ``domains``):
        rows, tokens (non-padding positions), epochs (tokens over the domain's training tokens)
        and the padding fraction."""
        rows = self.rows_consumed(step)
        tokens = np.zeros(len(self.names), np.int64)
        for k in range(len(self.names)):
            for v in self._sources(k):
                n = self._source_rows_before(step, k, v)
                if n == 0:
                    continue
                i, (epoch, block), r = self._locate(k, n - 1, v)
                p = self.packing(k, epoch, v, block)
                tokens[k] += (sum(self._seg_tokens[(k, v)][:i])
                              + int(p.row_tokens[:r + 1].sum()))
        epochs = tokens / np.array([max(n, 1) for n in self.num_tokens])
        total = int(rows.sum()) * self.seq_len
        return {"domains": list(self.names), "rows": rows.tolist(), "tokens": tokens.tolist(),
                "epochs": epochs.tolist(),
                "padding_fraction": float(1.0 - tokens.sum() / total) if total else 0.0}

    def epoch_stats(self, k: int = 0, epoch: int = 0) -> dict:
        """Rows, tokens and padding fraction of one packed epoch of domain k."""
        packs = [self.packing(k, epoch, None, None if len(self._blocks[k]) == 1 else b)
                 for b in range(len(self._blocks[k]))]
        rows = sum(p.num_rows for p in packs)
        tokens = sum(int(p.row_tokens.sum()) for p in packs)
        return {"rows": rows, "tokens": tokens,
                "padding_fraction": float(1.0 - tokens / (rows * self.seq_len))}
