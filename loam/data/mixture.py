"""The deterministic mixture stream: the object the trainer asks for batches.

The batch at step t is a pure function of (seed, config, t), computed by random access:

* Documents are split into chunks of at most ``objective.max_input_len(seq_len)`` tokens (never
  dropped). Per (domain, epoch) a Philox permutation keyed on (seed, domain, epoch) orders the
  chunks, and a first-fit packer over a small window of open rows packs the objective's outputs
  into rows of ``seq_len``. A packing is a pure function of (seed, domain, epoch) and is cached.
* Every batch row comes from one domain. How many rows each domain gets at step t follows the
  cumulative target ``B * sum_{s<=t} w(s)`` by largest remainder on the running deficit, so the
  realised shares track the schedule exactly over time. This needs no data, only integers: the
  data position is the per-domain count of rows consumed before t.
* Each chunk's corruption seed is derived from (seed, domain, epoch, chunk index); examples are
  built only when their row is materialised.
"""

from __future__ import annotations

import collections
import hashlib
import dataclasses
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from loam.data import corpora
from loam.data import objectives as obj_lib
from loam.data import tokenized

PACK_WINDOW = 16  # open rows the packer may still fill
_EVAL_EPOCH = 2**32 - 1  # epoch key of eval packings: disjoint from training epochs


# ----------------------------------------------------------------------------- domains


def resolve_domain(name: str) -> str:
    """A domain name, or a task name containing exactly one domain name as a word
    (e.g. ``loam_code`` or ``loam.code.span_corruption``)."""
    if name in corpora.DOMAIN_NAMES:
        return name
    words = set(str(name).replace(".", "_").replace(":", "_").replace("-", "_").split("_"))
    hits = [d for d in corpora.DOMAIN_NAMES if d in words]
    if len(hits) != 1:
        raise ValueError(f"unknown task or domain {name!r}; use a domain name "
                         f"({', '.join(corpora.DOMAIN_NAMES)}) or a task named after one")
    return hits[0]


# ----------------------------------------------------------------------------- weight recipes


def _as_array(sizes) -> tuple[list | None, np.ndarray]:
    if isinstance(sizes, Mapping):
        names = list(sizes)
        arr = np.array([float(sizes[k]) for k in names])
    else:
        names, arr = None, np.asarray(sizes, np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("no domains given; list at least one domain with its size")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"domain sizes must be finite and non-negative, got {arr}")
    return names, arr


def _like(names, arr):
    w = arr / arr.sum()
    return dict(zip(names, map(float, w))) if names is not None else w


def proportional(sizes):
    """Weights proportional to domain sizes (a dict in, a dict out; an array in, an array out)."""
    names, s = _as_array(sizes)
    if s.sum() <= 0:
        raise ValueError("all domain sizes are zero; proportional weights need some data")
    return _like(names, s)


def temperature(sizes, T: float):
    """Weights proportional to size^(1/T): T=1 is proportional, large T tends to uniform."""
    if not T > 0:
        raise ValueError(f"temperature must be positive, got {T}")
    names, s = _as_array(sizes)
    if s.sum() <= 0:
        raise ValueError("all domain sizes are zero; temperature weights need some data")
    return _like(names, np.where(s > 0, s / s.max(), 0.0) ** (1.0 / T))


def uniform(domains):
    """Equal weights; ``domains`` is a count or a list of names (then a dict is returned)."""
    if isinstance(domains, int):
        if domains < 1:
            raise ValueError("uniform weights need at least one domain")
        return np.full(domains, 1.0 / domains)
    domains = list(domains)
    if not domains:
        raise ValueError("uniform weights need at least one domain")
    return {d: 1.0 / len(domains) for d in domains}


def unimax(sizes, budget_tokens: float, max_epochs: float):
    """UniMax (Chung et al., 2023): spread the token budget uniformly over domains, but never
    more than ``max_epochs`` passes over any domain; what a capped domain cannot use is shared
    among the rest (smallest domains are settled first)."""
    if not budget_tokens > 0 or not max_epochs > 0:
        raise ValueError(f"unimax needs a positive budget and max_epochs, got {budget_tokens}, "
                         f"{max_epochs}")
    names, s = _as_array(sizes)
    alloc = np.zeros_like(s)
    remaining = float(budget_tokens)
    order = np.argsort(s, kind="stable")
    for k, i in enumerate(order):
        share = remaining / (len(s) - k)
        alloc[i] = min(share, s[i] * max_epochs)
        remaining -= alloc[i]
    if alloc.sum() <= 0:
        raise ValueError("unimax gave every domain zero tokens; the domains hold no data")
    return _like(names, alloc)


def validate_weights(weights, domains: Sequence[str]) -> np.ndarray:
    """Weights (a dict name->weight or one number per domain) as a normalised array in the order
    of ``domains``. Raises ValueError naming the problem and the fix."""
    domains = list(domains)
    if not domains:
        raise ValueError("the mixture has no domains; list at least one domain")
    if hasattr(weights, "to_dict"):
        weights = weights.to_dict()
    if isinstance(weights, Mapping):
        if not weights:
            raise ValueError("mixture weights are empty; give a weight for at least one of "
                             f"{domains}")
        unknown = [k for k in weights if k not in domains]
        if unknown:
            raise ValueError(f"mixture weights name {unknown}, which are not in the mixture's "
                             f"domains {domains}; fix the names or add those domains")
        w = np.array([float(weights.get(d, 0.0)) for d in domains])
    else:
        try:
            w = np.asarray(weights, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise ValueError(f"mixture weights {weights!r} are not numbers; give a dict "
                             "domain->weight or one number per domain") from None
        if w.size == 0:
            raise ValueError(f"mixture weights are empty; give one weight per domain {domains}")
        if w.size != len(domains):
            raise ValueError(f"got {w.size} mixture weights for {len(domains)} domains "
                             f"{domains}; give one weight per domain or a dict")
    total = float(w.sum())
    if total > 0 and math.isfinite(total) and float(w.min()) >= 0:  # the common, valid case
        return w / total
    if np.any(np.isnan(w)) or np.any(np.isinf(w)):
        raise ValueError(f"mixture weights contain NaN or infinity ({w.tolist()}); give finite "
                         "weights")
    if np.any(w < 0):
        raise ValueError(f"mixture weights must be non-negative, got {w.tolist()}; use 0 to "
                         "leave a domain out")
    if w.sum() <= 0:
        raise ValueError(f"mixture weights are all zero for {domains}; give at least one "
                         "domain a positive weight")
    return w / w.sum()


# ----------------------------------------------------------------------------- schedules


class MixtureSchedule:
    """Mixture weights as a function of the training step (a normalised array per step)."""

    def __init__(self, domains: Sequence[str]):
        self.domains = list(domains)

    def weights_at(self, step: int) -> np.ndarray:
        raise NotImplementedError


class ConstantSchedule(MixtureSchedule):
    def __init__(self, weights, domains: Sequence[str]):
        super().__init__(domains)
        self.weights = validate_weights(weights, domains)

    def weights_at(self, step):
        return self.weights

    def __repr__(self):
        return f"constant({dict(zip(self.domains, np.round(self.weights, 4).tolist()))})"


class CallableSchedule(MixtureSchedule):
    """Any ``step -> weights`` mapping; each answer is validated."""

    def __init__(self, fn: Callable[[int], object], domains: Sequence[str]):
        super().__init__(domains)
        self.fn = fn

    def weights_at(self, step):
        try:
            return validate_weights(self.fn(step), self.domains)
        except ValueError as e:
            raise ValueError(f"mixture schedule at step {step}: {e}") from None


def constant(weights, domains: Sequence[str] | None = None) -> ConstantSchedule:
    if domains is None:
        if not isinstance(weights, Mapping):
            raise ValueError("constant(weights) needs the domain names: pass a dict or domains=")
        domains = list(weights)
    return ConstantSchedule(weights, domains)


def as_schedule(x, domains: Sequence[str]) -> MixtureSchedule:
    """A schedule object (anything with ``weights_at``), a callable, or constant weights."""
    if hasattr(x, "weights_at"):
        return x
    if callable(x):
        return CallableSchedule(x, domains)
    return ConstantSchedule(x, domains)


def domain_sizes(domains: Sequence[str], data_dir=None) -> np.ndarray:
    """Training tokens of each domain (tokenizing on first use)."""
    return np.array([tokenized.load(resolve_domain(d), data_dir).train.num_tokens
                     for d in domains], np.float64)


def schedule_from_config(config) -> MixtureSchedule:
    """``config.data.weights``: per-domain weights (dict or list), or a recipe string
    "uniform", "proportional", "temperature:T" or "unimax:MAX_EPOCHS" (budget: the run's
    tokens, steps * batch_size * seq_len)."""
    data = config.data
    domains = list(data.domains)
    w = data.weights
    data_dir = data.get("dir") or None
    if isinstance(w, str):
        name, _, arg = w.partition(":")
        if name == "uniform":
            return ConstantSchedule(uniform(len(domains)), domains)
        if name in ("proportional", "temperature", "unimax"):
            sizes = domain_sizes(domains, data_dir)
            try:
                if name == "proportional":
                    weights = proportional(sizes)
                elif name == "temperature":
                    weights = temperature(sizes, float(arg or 1.0))
                else:
                    budget = config.steps * data.batch_size * data.seq_len
                    weights = unimax(sizes, budget, float(arg or 4.0))
            except ValueError as e:
                raise ValueError(f"config.data.weights={w!r}: {e}") from None
            return ConstantSchedule(weights, domains)
        raise ValueError(f"config.data.weights={w!r} is not a recipe; use 'uniform', "
                         "'proportional', 'temperature:T', 'unimax:MAX_EPOCHS', a dict or a list")
    return as_schedule(w, domains)


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


# ----------------------------------------------------------------------------- packing


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


class _DomainData:
    """A domain split cut into chunks that the objective can turn into rows of seq_len."""

    def __init__(self, name: str, split: tokenized.Split, max_len: int):
        self.name = name
        self.domain_id = tokenized.domain_id(name)
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
             chunks: np.ndarray | None = None) -> Packing:
        ids = np.arange(self.num_chunks)
        seeds = obj_lib.derive_seeds(seed, self.domain_id, epoch, ids)
        out_len = objective.output_lens(self.chunk_len, seeds)
        if chunks is not None:
            order = chunks
        elif shuffle:
            key = int(obj_lib.derive_seeds(seed, self.domain_id, epoch))
            order = np.random.Generator(np.random.Philox(key=key)).permutation(self.num_chunks)
        else:
            order = ids
        row_of = first_fit(out_len[order], seq_len)
        by_row = np.argsort(row_of, kind="stable")
        counts = np.bincount(row_of, minlength=int(row_of.max(initial=-1)) + 1)
        row_ptr = np.concatenate([[0], np.cumsum(counts)])
        row_tokens = np.bincount(row_of, weights=out_len[order], minlength=counts.shape[0])
        return Packing(order[by_row], row_ptr, row_tokens.astype(np.int64), seeds)


def _assemble(rows: list[tuple[_DomainData, np.ndarray, np.ndarray] | None], objective,
              seq_len: int, default_domain: int = 0) -> dict[str, np.ndarray]:
    """Packed batch features from rows given as (domain data, chunk indices, chunk seeds);
    None is an all-padding row. Per-example work is slicing; per-token work is vectorised."""
    B, L = len(rows), seq_len
    causal = isinstance(objective, obj_lib.CausalLM)
    toks, masks, ex_len, ex_prefix, ex_row, ex_doc = [], [], [], [], [], []
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
                ex_len.append(n)
                ex_prefix.append(0)
            else:
                ex = objective.apply(piece, int(seeds[c]))
                toks.append(ex["tokens"])
                masks.append(ex["loss_mask"])
                ex_len.append(ex["tokens"].shape[0])
                ex_prefix.append(ex["prefix_len"])
            ex_row.append(r)
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
    ex_len = np.asarray(ex_len, np.int64)
    ex_row = np.asarray(ex_row, np.int64)
    ex_prefix = np.asarray(ex_prefix, np.int64)
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


# ----------------------------------------------------------------------------- the stream


class MixtureStream:
    """Packed batches of a weighted mixture of domains, by random access on the step."""

    def __init__(self, domains: Sequence[str], objective, weights_schedule, seq_len: int,
                 batch_size: int, seed: int, data_dir=None, process_index: int = 0,
                 process_count: int = 1, pack_cache: int = 3, scores_dir=None):
        self.names = list(domains)
        if not self.names:
            raise ValueError("the mixture has no domains; list at least one task or domain")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"domains {self.names} list a name twice; list each once")
        self.domain_names = [resolve_domain(d) for d in self.names]
        if len(set(self.domain_names)) != len(self.domain_names):
            raise ValueError(f"tasks {self.names} name the same domain twice; list each once")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} outside [0, {process_count})")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {process_count} "
                             "processes; make the global batch a multiple of the process count")
        self.objective = obj_lib.get_objective(objective)
        self.schedule = as_schedule(weights_schedule, self.names)
        named = getattr(self.schedule, "domains", None)
        if named is not None and list(named) != self.names:  # same weights, the stream's order
            inner = self.schedule
            self.schedule = CallableSchedule(
                lambda t: dict(zip(inner.domains, inner.weights_at(t))), self.names)
        self.seq_len, self.batch_size, self.seed = int(seq_len), int(batch_size), int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.data_dir, self.scores_dir = data_dir, scores_dir or data_dir
        self.max_input_len = self.objective.max_input_len(self.seq_len)
        self.data = [_DomainData(d, tokenized.load(d, data_dir).train, self.max_input_len)
                     for d in self.domain_names]
        self.domain_ids = np.array([dd.domain_id for dd in self.data], np.int32)
        self.weights_at(0)  # validate now, not at the first batch
        # Memoised allocation: _consumed[t] = rows per domain consumed before step t.
        D = len(self.data)
        self._consumed = np.zeros((1024, D), np.int64)
        self._num_alloc = 1
        self._target = [0.0] * D  # B * sum of weights over the allocated steps
        # Per domain: rows and tokens of each packed epoch so far (small), packings (LRU).
        self._epoch_rows: dict = {}
        self._epoch_tokens: dict = {}
        self._view_base: dict = {}
        for k in range(D):  # score columns and quantile ranges are checked now, not mid-run
            for v in self._sources(k):
                if v is not None:
                    self._view_chunks(k, v, 0)
        self._packings: collections.OrderedDict = collections.OrderedDict()
        self._pack_cache = max(1, pack_cache) * D

    # -- weights and the data position (integers only, no data touched)

    def weights_at(self, step: int) -> np.ndarray:
        w = self.schedule.weights_at(int(step))
        if isinstance(self.schedule, (ConstantSchedule, CallableSchedule)):
            return w  # validated by the schedule
        return validate_weights(w, self.names)

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
            grown = np.zeros((max(2 * self._consumed.shape[0], step + 1), len(self.data)),
                             np.int64)
            grown[:self._num_alloc] = self._consumed[:self._num_alloc]
            self._consumed = grown
        constant = isinstance(self.schedule, ConstantSchedule)
        weights = self.schedule.weights.tolist() if constant else None
        cons = self._consumed[self._num_alloc - 1].tolist()
        target, B = self._target, self.batch_size
        for s in range(self._num_alloc - 1, step):
            w = weights if constant else self.weights_at(s).tolist()
            target = [t + B * x for t, x in zip(target, w)]
            n = allocate_rows([t - c for t, c in zip(target, cons)], B)
            cons = [c + k for c, k in zip(cons, n)]
            self._consumed[s + 1] = cons
        self._target, self._num_alloc = target, step + 1

    def rows_at(self, step: int) -> np.ndarray:
        return self.rows_consumed(step + 1) - self.rows_consumed(step)

    def state_dict(self, step: int) -> dict:
        return {"step": int(step), "rows_consumed": self.rows_consumed(step).tolist(),
                "domains": list(self.names), "seed": self.seed, "batch_size": self.batch_size}

    def check_state(self, state: Mapping) -> None:
        """Raises ValueError if a saved data position disagrees with this stream's config."""
        step = int(state["step"])
        mine = self.state_dict(step)
        for key in ("domains", "seed", "batch_size", "rows_consumed"):
            if key in state and list(np.atleast_1d(state[key])) != list(np.atleast_1d(mine[key])):
                raise ValueError(
                    f"the checkpoint's data position at step {step} has {key}={state[key]}, but "
                    f"this config gives {mine[key]}: the domains, weights schedule, batch size "
                    "or seed changed since it was saved. Restore the original config to resume "
                    "exactly, or train into a new workdir")

    # -- packings (one source per domain and view: a view orders or filters the documents)

    def _view(self, step: int, k: int):
        view_at = getattr(self.schedule, "view_at", None)
        v = view_at(step, k) if view_at else None
        return None if v is None or v.is_default else v

    def _source_rows_before(self, step: int, k: int, v) -> int:
        """Rows that domain k's source `v` contributed before ``step``."""
        intervals = getattr(self.schedule, "view_intervals", None)
        if intervals is None:
            return int(self.rows_consumed(step)[k])
        total = 0
        for a, b, view in intervals(k):
            view = None if view.is_default else view
            if view != v or a >= step:
                continue
            end = step if b is None else min(b, step)
            total += int(self.rows_consumed(end)[k] - self.rows_consumed(a)[k])
        return total

    def _sources(self, k: int) -> list:
        intervals = getattr(self.schedule, "view_intervals", None)
        if intervals is None:
            return [None]
        return list(dict.fromkeys(None if v.is_default else v for _, _, v in intervals(k)))

    def _view_chunks(self, k: int, v, epoch: int) -> np.ndarray:
        """Chunk order of one epoch of a view: sorted by its column, or a seeded shuffle of the
        kept chunks."""
        from loam.selection import columns as columns_lib

        dd = self.data[k]
        base = self._view_base.get((k, v))
        if base is None:
            ids = np.arange(dd.num_chunks)
            if v.keep_column:
                col = columns_lib.load_column(dd.name, v.keep_column, self.scores_dir,
                                              self.data_dir)
                docs = np.asarray(dd.split.doc_index)
                score = col[docs]
                finite = np.isfinite(score)
                rank = np.empty(docs.shape[0])
                order = np.argsort(score[finite], kind="stable")
                r = np.empty(order.shape[0])
                r[order] = np.arange(order.shape[0]) / max(order.shape[0] - 1, 1)
                rank[:] = -1.0
                rank[finite] = r
                lo, hi = v.keep_range
                kept = docs[finite & (rank >= lo) & (rank <= hi)]
                ids = ids[np.isin(dd.chunk_doc, kept)]
                if ids.size == 0:
                    raise ValueError(
                        f"keeping {v.keep_column} quantiles {list(v.keep_range)} of domain "
                        f"{dd.name!r} keeps no documents; widen the range")
            if v.order_column:
                col = columns_lib.load_column(dd.name, v.order_column, self.scores_dir,
                                              self.data_dir)
                score = col[dd.chunk_doc[ids]].astype(np.float64)
                score = np.where(np.isfinite(score), score, np.inf)  # unscored last
                ids = ids[np.argsort(score if v.ascending else -score, kind="stable")]
            base = self._view_base[(k, v)] = ids
        if v.order_column:
            return base  # the same order every epoch
        salt = int.from_bytes(hashlib.sha256(v.describe().encode()).digest()[:4], "little")
        key = int(obj_lib.derive_seeds(self.seed, dd.domain_id, epoch, salt))
        return base[np.random.Generator(np.random.Philox(key=key)).permutation(base.shape[0])]

    def packing(self, k: int, epoch: int, v=None) -> Packing:
        key = (k, v, epoch)
        if key in self._packings:
            self._packings.move_to_end(key)
            return self._packings[key]
        chunks = None if v is None else self._view_chunks(k, v, epoch)
        p = self.data[k].pack(self.objective, self.seq_len, self.seed, epoch, chunks=chunks)
        self._packings[key] = p
        if len(self._packings) > self._pack_cache:
            self._packings.popitem(last=False)
        return p

    def _ensure_epochs(self, k: int, rows: int, v=None) -> None:
        """Pack epochs of domain k's source v until they hold at least ``rows`` rows."""
        er = self._epoch_rows.setdefault((k, v), [])
        et = self._epoch_tokens.setdefault((k, v), [])
        while sum(er) < rows:
            p = self.packing(k, len(er), v)
            er.append(p.num_rows)
            et.append(int(p.row_tokens.sum()))

    def _locate(self, k: int, row: int, v=None) -> tuple[int, int]:
        """(epoch, row within the epoch) of a row index of domain k's source v."""
        self._ensure_epochs(k, row + 1, v)
        er = self._epoch_rows[(k, v)]
        ends = np.cumsum(er)
        epoch = int(np.searchsorted(ends, row, side="right"))
        return epoch, row - int(ends[epoch] - er[epoch])

    # -- batches

    def _row_specs(self, step: int, lo: int, hi: int):
        counts = self.rows_at(step)
        starts = np.cumsum(counts) - counts
        specs = []
        for i in range(lo, hi):
            k = int(np.searchsorted(starts + counts, i, side="right"))
            v = self._view(step, k)
            before = self._source_rows_before(step, k, v)
            epoch, r = self._locate(k, int(before + i - starts[k]), v)
            p = self.packing(k, epoch, v)
            specs.append((self.data[k], p.order[p.row_ptr[r]:p.row_ptr[r + 1]], p.seeds))
        return specs

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch at ``step``: rows [p*B/P, (p+1)*B/P)."""
        local = self.batch_size // self.process_count
        lo = self.process_index * local
        return _assemble(self._row_specs(int(step), lo, lo + local), self.objective,
                         self.seq_len)

    def global_batch(self, step: int) -> dict[str, np.ndarray]:
        return _assemble(self._row_specs(int(step), 0, self.batch_size), self.objective,
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
        tokens = np.zeros(len(self.data), np.int64)
        for k in range(len(self.data)):
            for v in self._sources(k):
                n = self._source_rows_before(step, k, v)
                if n == 0:
                    continue
                epoch, r = self._locate(k, n - 1, v)
                p = self.packing(k, epoch, v)
                tokens[k] += (sum(self._epoch_tokens[(k, v)][:epoch])
                              + int(p.row_tokens[:r + 1].sum()))
        epochs = tokens / np.array([max(dd.split.num_tokens, 1) for dd in self.data])
        total = int(rows.sum()) * self.seq_len
        return {"domains": list(self.names), "rows": rows.tolist(), "tokens": tokens.tolist(),
                "epochs": epochs.tolist(),
                "padding_fraction": float(1.0 - tokens.sum() / total) if total else 0.0}

    def epoch_stats(self, k: int = 0, epoch: int = 0) -> dict:
        """Rows, tokens and padding fraction of one packed epoch of domain k."""
        p = self.packing(k, epoch)
        return {"rows": p.num_rows, "tokens": int(p.row_tokens.sum()),
                "padding_fraction": float(1.0 - p.row_tokens.sum() / (p.num_rows * self.seq_len))}


# ----------------------------------------------------------------------------- evaluation


def eval_batches(domain: str, objective, seq_len: int, batch_size: int, max_tokens: int,
                 seed: int = 0, data_dir=None) -> tuple[list[dict[str, np.ndarray]], int]:
    """Fixed packed batches of a domain's validation split and the UTF-8 bytes of the text they
    cover (for bits per byte). Whole documents are taken in corpus order while their tokens
    (EOS included) fit in ``max_tokens`` (at least one document); the last batch is padded with
    empty rows so every batch has ``batch_size`` rows."""
    name = resolve_domain(domain)
    objective = obj_lib.get_objective(objective)
    split = tokenized.load(name, data_dir).validation
    if split.num_documents == 0:
        raise ValueError(f"domain {name!r} has no validation documents; its corpus is too small "
                         "for the 3% held-out split — add documents")
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"need max_tokens >= 1 and batch_size >= 1, got {max_tokens}, "
                         f"{batch_size}")
    n_docs = max(1, int(np.searchsorted(split.offsets[1:], max_tokens, side="right")))
    dd = _DomainData(name, split, objective.max_input_len(seq_len))
    chunks = np.flatnonzero(np.isin(dd.chunk_doc, np.asarray(split.doc_index[:n_docs])))
    p = dd.pack(objective, seq_len, seed, _EVAL_EPOCH, chunks=chunks)
    specs = [(dd, p.order[p.row_ptr[r]:p.row_ptr[r + 1]], p.seeds) for r in range(p.num_rows)]
    specs += [None] * (-len(specs) % batch_size)
    batches = [_assemble(specs[i:i + batch_size], objective, seq_len, dd.domain_id)
               for i in range(0, len(specs), batch_size)]
    return batches, int(np.asarray(split.doc_bytes[:n_docs]).sum())


__all__ = [
    "MixtureStream", "MixtureSchedule", "ConstantSchedule", "CallableSchedule", "Packing",
    "as_schedule", "allocate_rows", "constant", "domain_sizes", "eval_batches", "first_fit",
    "proportional", "resolve_domain", "schedule_from_config", "temperature", "uniform", "unimax",
    "validate_weights",
]
