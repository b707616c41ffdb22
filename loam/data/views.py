"""Document views: how one domain's training documents are drawn, and the selections they obey.

A view says how one domain's documents are drawn: shuffled (the default), ordered by a score
column, and/or restricted to a quantile range of a column (a curriculum stage's ``order`` and
``keep``), within the domain's selection (``config.data.selection``), if it has one. Columns are
read from the column store of the prepared domain (``loam.data.columns``; the bundled corpora's
shipped columns as a fallback), indexed by the document's global index (the ``doc_ids`` of a
batch). ``loam.selection`` writes them; this module only reads.

A selection (``config.data.selection[domain]``) keeps the documents a policy picks by a score:

    {"score": "quality",                 # a column, or {"col": weight, ...}: a weighted sum of
                                         #   the columns z-scored over the domain (Meta-rater)
     "policy": "top",                    # threshold | top | gumbel
     "fraction": 0.5,                    # top/gumbel: a fraction of the documents, or
     "tokens": 2_000_000,                #   a budget in tokens (threshold: at most this many of
                                         #   the passing ones, the best first)
     "threshold": 0.5,                   # threshold: keep score >= threshold
     "temperature": 0.1,                 # gumbel: top-k of score/temperature + Gumbel noise
     "seed": 0,                          # gumbel, repeat="sample": default the run's seed
     "repeat": "col",                    # optional: copies per document from a column:
     "repeat_mode": "round"}             #   round(w) copies, or "sample": w in expectation
                                         #   (budgets count each document once)

Every document of the selection goes through the stream once per epoch (a repeated one that
many times); a stage's ``keep``/``order`` ranks and orders within the selection. Everything is a
function of the config, the columns and the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from loam.data import catalog as catalog_lib
from loam.data import columns as columns_lib
from loam.data.columns import SHA_KEY, ColumnError, columns_path, corpus_sha256  # noqa: F401

POLICIES = ("threshold", "top", "gumbel")
SELECTION_KEYS = {"score", "policy", "fraction", "tokens", "threshold", "temperature", "seed",
                  "repeat", "repeat_mode"}
_SALT = 0x5E1EC7


class SelectionError(ValueError):
    """A selection in config.data.selection cannot be made; the message says how to fix it."""


def available(domain: str, directory=None, data_dir=None) -> list[str]:
    """Names of the columns a domain of the bundled catalog has."""
    return sorted(columns_lib.available(catalog_lib.default(data_dir), domain))


def load_column(domain: str, column: str, directory=None, corpus_dir=None,
                catalog: catalog_lib.Catalog | None = None) -> np.ndarray:
    """One value per document (at its global index) of a domain of ``catalog`` (default: the
    bundled one); ``directory``: shipped scores files of the bundled corpora other than their
    own. Raises ColumnError if missing or stale."""
    catalog = catalog or catalog_lib.default(corpus_dir)
    return columns_lib.load(catalog, domain, column, scores_dir=directory)


# ---------------------------------------------------------------------------------- selection

@dataclasses.dataclass(frozen=True)
class Selection:
    """One domain's selection: its config entry (canonical JSON, so it is hashable) and the
    seed it defaults to."""
    spec: str
    seed: int = 0

    @property
    def entry(self) -> dict:
        return json.loads(self.spec)

    def describe(self) -> str:
        e = self.entry
        score = e["score"] if isinstance(e["score"], str) else "+".join(
            f"{w:g}*z({c})" for c, w in e["score"].items())
        parts = [e["policy"], score] + [f"{k} {e[k]}" for k in
                                        ("threshold", "fraction", "tokens", "temperature")
                                        if k in e]
        if "repeat" in e:
            parts.append(f"repeat {e['repeat']} ({e.get('repeat_mode', 'round')})")
        return " ".join(str(p) for p in parts)


def parse_selection(domain: str, raw, seed: int = 0) -> Selection:
    """A domain's entry of ``config.data.selection``, checked: one clear error per mistake."""
    where = f"config.data.selection[{domain!r}]"
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    if not isinstance(raw, Mapping):
        raise SelectionError(f"{where} must be a dict like {{'score': 'quality', 'policy': 'top',"
                             f" 'fraction': 0.5}}, got {raw!r}")
    e = dict(raw)
    unknown = sorted(set(e) - SELECTION_KEYS)
    if unknown:
        raise SelectionError(f"{where}: unknown key(s) {unknown}; a selection has "
                             f"{sorted(SELECTION_KEYS)}")
    score: Any = e.get("score")
    if score is not None and hasattr(score, "to_dict"):
        score = score.to_dict()
    if isinstance(score, Mapping):
        if not score or not all(isinstance(w, (int, float)) for w in score.values()):
            raise SelectionError(f"{where}: 'score' as a dict maps column names to numeric "
                                 f"weights, got {score!r}")
        e["score"] = {str(c): float(w) for c, w in sorted(score.items())}
    elif not isinstance(score, str) or not score:
        raise SelectionError(f"{where} needs 'score': a column name or {{column: weight}}")
    policy = e.get("policy")
    if policy not in POLICIES:
        raise SelectionError(f"{where}: unknown policy {policy!r}; choose one of {POLICIES}")
    if policy == "threshold" and not isinstance(e.get("threshold"), (int, float)):
        raise SelectionError(f"{where}: policy 'threshold' needs a numeric 'threshold'")
    if policy in ("top", "gumbel") and ("fraction" in e) == ("tokens" in e):
        raise SelectionError(f"{where}: policy {policy!r} needs exactly one budget: 'fraction' "
                             "(of the documents) or 'tokens'")
    if "fraction" in e and not (isinstance(e["fraction"], (int, float))
                                and 0 < e["fraction"] <= 1):
        raise SelectionError(f"{where}: 'fraction' must be in (0, 1], got {e['fraction']!r}")
    if "tokens" in e and not (isinstance(e["tokens"], (int, float)) and e["tokens"] >= 1):
        raise SelectionError(f"{where}: 'tokens' must be a positive number, got {e['tokens']!r}")
    if policy == "gumbel" and not (isinstance(e.get("temperature"), (int, float))
                                   and e["temperature"] > 0):
        raise SelectionError(f"{where}: policy 'gumbel' needs 'temperature' > 0 (near 0: top-k; "
                             f"large: uniform), got {e.get('temperature')!r}")
    if e.get("repeat_mode", "round") not in ("round", "sample"):
        raise SelectionError(f"{where}: repeat_mode must be 'round' or 'sample', got "
                             f"{e['repeat_mode']!r}")
    if "repeat_mode" in e and "repeat" not in e:
        raise SelectionError(f"{where}: repeat_mode without 'repeat' (the column of weights)")
    return Selection(json.dumps(e, sort_keys=True), int(e.get("seed", seed)))


def selections_from_config(config) -> dict[str, Selection]:
    """``config.data.selection`` per domain, checked (domains not in the mixture refused)."""
    raw = config.data.get("selection") or {}
    if hasattr(raw, "to_dict"):
        raw = raw.to_dict()
    domains = catalog_lib.mixture_domains(config)
    unknown = sorted(set(raw) - set(domains))
    if unknown:
        raise SelectionError(f"config.data.selection names unknown domain(s) {unknown}; the "
                             f"mixture's domains are {domains}")
    return {d: parse_selection(d, raw[d], int(config.seed)) for d in raw}


def _rng(seed: int, domain: str, what: int) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(f"{domain}".encode()).digest()[:4], "little")
    return np.random.Generator(np.random.Philox(key=[int(seed) & (2**64 - 1),
                                                     (h << 24) ^ what ^ _SALT]))


def _needs_scores(values: np.ndarray, column: str, domain: str, why: str) -> None:
    bad = int((~np.isfinite(values)).sum())
    if bad:
        raise SelectionError(
            f"{bad} of {values.shape[0]} training documents of domain {domain!r} have no value "
            f"in column {column!r} (NaN), and {why} needs one for each; score every document "
            f"(python -m loam.selection.score ...) or choose another column")


def selection_score(sel: Selection, domain: str, docs: np.ndarray,
                    column: Callable[[str], np.ndarray]) -> np.ndarray:
    """The selection's score of each document of ``docs`` (global indices): the column, or the
    weighted sum of the z-scored columns."""
    e = sel.entry
    spec = {e["score"]: None} if isinstance(e["score"], str) else e["score"]
    total = np.zeros(docs.shape[0])
    for c, w in spec.items():
        v = np.asarray(column(c), np.float64)[docs]
        _needs_scores(v, c, domain, f"policy {e['policy']!r}")
        if w is None:
            return v
        sd = v.std()
        total += w * ((v - v.mean()) / sd if sd > 0 else np.zeros_like(v))
    return total


def select_documents(sel: Selection, domain: str, docs: np.ndarray, lengths: np.ndarray,
                     column: Callable[[str], np.ndarray]) -> np.ndarray:
    """Copies of each document of ``docs`` (global indices of the split, ``lengths`` their
    tokens) the selection takes: 0 (not selected), 1, or more when it repeats documents."""
    e = sel.entry
    n = docs.shape[0]
    score = selection_score(sel, domain, docs, column)
    where = f"the selection of domain {domain!r} ({sel.describe()})"
    budget = e.get("tokens")
    if e["policy"] == "threshold":
        passing = score >= e["threshold"]
        if not passing.any():
            raise SelectionError(f"{where}: no document scores >= {e['threshold']}; lower the "
                                 "threshold")
        key = np.where(passing, score, -np.inf)
        available_tokens = int(lengths[passing].sum())
        if budget is None:
            chosen = passing
        else:
            chosen = _by_tokens(key, lengths, budget, available_tokens, where,
                                "of the documents that pass the threshold")
    else:
        key = score
        if e["policy"] == "gumbel":
            u = _rng(sel.seed, domain, 1).random(n)
            gumbel = -np.log(-np.log(np.clip(u, 1e-300, 1.0 - 1e-16)))
            key = score / float(e["temperature"]) + gumbel
        if budget is None:
            k = max(1, int(round(float(e["fraction"]) * n)))
            chosen = np.zeros(n, bool)
            chosen[np.argsort(-key, kind="stable")[:k]] = True
        else:
            chosen = _by_tokens(key, lengths, budget, int(lengths.sum()), where,
                                "of all the domain's training documents")
    copies = chosen.astype(np.int64)
    if "repeat" in e:
        w = np.asarray(column(e["repeat"]), np.float64)[docs]
        _needs_scores(w[chosen], e["repeat"], domain, "'repeat'")
        w = np.where(chosen, w, 0.0)
        if (w < 0).any():
            raise SelectionError(f"{where}: column {e['repeat']!r} has negative repeat weights; "
                                 "repeats are counts >= 0")
        if e.get("repeat_mode", "round") == "round":
            copies = np.floor(w + 0.5).astype(np.int64)
        else:  # systematic sampling: floor or ceil of w copies, w in expectation
            c = np.floor(np.cumsum(w) + _rng(sel.seed, domain, 2).random())
            copies = np.diff(np.concatenate([[0.0], c])).astype(np.int64)
        if copies.sum() == 0:
            raise SelectionError(f"{where}: every selected document gets 0 repeats from column "
                                 f"{e['repeat']!r}")
    return copies


def _by_tokens(key, lengths, budget, available_tokens, where, what) -> np.ndarray:
    if budget > available_tokens:
        raise SelectionError(f"{where}: the budget of {int(budget):,} tokens is larger than the "
                             f"{available_tokens:,} tokens {what}; lower 'tokens'")
    order = np.argsort(-key, kind="stable")
    within = np.cumsum(lengths[order]) <= budget
    within[0] = True
    chosen = np.zeros(key.shape[0], bool)
    chosen[order[within]] = True
    return chosen


def selection_summary(sel: Selection, domain: str, docs, lengths, copies) -> dict:
    """Selected documents, their tokens (with repeats) and their share of the domain's."""
    total = int(lengths.sum())
    tokens = int((lengths * copies).sum())
    return {"domain": domain, "policy": sel.describe(), "documents": int((copies > 0).sum()),
            "of_documents": int(docs.shape[0]), "copies": int(copies.sum()), "tokens": tokens,
            "of_tokens": total, "share": tokens / total if total else 0.0}


def describe_summary(s: dict) -> str:
    rep = f", {s['copies']} with repeats" if s["copies"] != s["documents"] else ""
    return (f"selection {s['domain']}: {s['documents']} of {s['of_documents']} documents{rep}, "
            f"{s['tokens']:,} tokens ({100 * s['share']:.1f}% of the domain's "
            f"{s['of_tokens']:,}) [{s['policy']}]")


# ---------------------------------------------------------------------------------- views

@dataclasses.dataclass(frozen=True)
class View:
    """How one domain's documents are drawn. Hashable: rows consumed are counted per view."""
    order_column: str | None = None
    ascending: bool = True
    keep_column: str | None = None
    keep_range: tuple[float, float] = (0.0, 1.0)
    selection: Selection | None = None

    @property
    def is_default(self) -> bool:
        return (self.order_column is None and self.keep_column is None
                and self.selection is None)

    def describe(self) -> str:
        parts = []
        if self.selection is not None:
            parts.append(f"select {self.selection.describe()}")
        if self.order_column:
            parts.append(f"order {self.order_column} {'asc' if self.ascending else 'desc'}")
        if self.keep_column:
            parts.append(f"keep {self.keep_column} in {list(self.keep_range)}")
        return ", ".join(parts) or "shuffled"


DEFAULT_VIEW = View()


def columns_read(view: View) -> list[str]:
    """The score columns a view reads (its selection's, its order's and its keep's)."""
    out = []
    if view.selection is not None:
        e = view.selection.entry
        out += [e["score"]] if isinstance(e["score"], str) else list(e["score"])
        out += [e["repeat"]] if "repeat" in e else []
    out += [c for c in (view.order_column, view.keep_column) if c]
    return out


def select_chunks(view: View, domain: str, chunk_doc: np.ndarray, doc_index: np.ndarray,
                  scores_dir=None, corpus_dir=None, catalog: catalog_lib.Catalog | None = None,
                  lengths: np.ndarray | None = None) -> np.ndarray:
    """Indices of the chunks a view draws from (a chunk repeated as often as the selection
    repeats its document): those of the selected documents, of them the kept ones (keep: the
    documents whose column rank lies in the range), sorted by the order column (unscored
    last) or else in index order (the stream shuffles them per epoch). ``chunk_doc`` is each
    chunk's document (global index), ``doc_index`` the split's documents, ``lengths`` their
    tokens (what a token budget counts)."""
    catalog = catalog or catalog_lib.default(corpus_dir)
    cache: dict[str, np.ndarray] = {}

    def column(name: str) -> np.ndarray:
        if name not in cache:
            cache[name] = columns_lib.load(catalog, domain, name, scores_dir=scores_dir)
        return cache[name]

    ids = np.arange(chunk_doc.shape[0])
    docs = np.asarray(doc_index)
    if view.selection is not None:
        if lengths is None:
            raise ValueError("a selection needs the documents' lengths")
        copies = select_documents(view.selection, domain, docs, np.asarray(lengths), column)
        per_doc = np.zeros(int(max(docs.max(initial=0), chunk_doc.max(initial=0))) + 1,
                           np.int64)
        per_doc[docs] = copies
        docs = docs[copies > 0]
        ids = np.repeat(ids, per_doc[chunk_doc])
    if view.keep_column:
        col = column(view.keep_column)
        score = col[docs]
        finite = np.isfinite(score)
        order = np.argsort(score[finite], kind="stable")
        r = np.empty(order.shape[0])
        r[order] = np.arange(order.shape[0]) / max(order.shape[0] - 1, 1)
        rank = np.full(docs.shape[0], -1.0)
        rank[finite] = r
        lo, hi = view.keep_range
        kept = docs[finite & (rank >= lo) & (rank <= hi)]
        ids = ids[np.isin(chunk_doc[ids], kept)]
        if ids.size == 0:
            raise ValueError(f"keeping {view.keep_column} quantiles {list(view.keep_range)} of "
                             f"domain {domain!r} keeps no documents; widen the range")
    if view.order_column:
        col = column(view.order_column)
        score = col[chunk_doc[ids]].astype(np.float64)
        score = np.where(np.isfinite(score), score, np.inf)  # unscored last
        ids = ids[np.argsort(score if view.ascending else -score, kind="stable")]
    return ids
