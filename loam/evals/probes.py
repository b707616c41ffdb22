"""A miniature probe suite built from the held-out documents of the run's own domains.

    {"kind": "probes"}                      # or {"kind": "probes", "items": 64, "choices": 4}

For each domain, items are drawn deterministically (a seeded generator over the validation
split, in corpus order) from passages the model never trained on: the context is a passage, and
the model must pick the line that follows it among lines of other held-out documents of the same
domain (which verse follows, which speech comes next, which line of code or documentation
follows). A one-line document (a WordNet entry, ``lemma (pos.): gloss``) gives "which gloss
defines this lemma". Small enough to run at every eval; ``chance`` is 1 / choices.
"""

from __future__ import annotations

import zlib

import numpy as np

from loam.data import catalog as catalog_lib
from loam.data import sources as sources_lib
from loam.evals import choices as choices_lib
from loam.evals.scoring import Scorer

OPTIONS = {"name", "items", "choices", "seed", "domains", "context_chars"}
MIN_LINE, MAX_LINE = 8, 160  # characters of a candidate line


def _pairs(text: str, context_chars: int) -> list[tuple[str, str]]:
    """(passage, what follows it) pairs of one document."""
    lines = [l.rstrip() for l in text.splitlines()]
    out = []
    for j in range(1, len(lines)):
        nxt = lines[j]
        if not MIN_LINE <= len(nxt.strip()) <= MAX_LINE or not lines[j - 1].strip():
            continue
        before = "\n".join(lines[:j])[-context_chars:]
        out.append((before, "\n" + nxt))
    if not out and len(lines) == 1 and ": " in lines[0]:  # "lemma (n.): gloss"
        head, _, gloss = lines[0].partition(": ")
        if MIN_LINE <= len(gloss) <= 2 * MAX_LINE:
            out.append((head + ":", " " + gloss))
    return out


def build_items(documents: list[tuple[str, str]], n_items: int, n_choices: int, seed: int,
                context_chars: int = 400) -> list[choices_lib.Item]:
    """Items from (doc_id, text) documents; distractors come from other documents."""
    by_doc = [_pairs(text, context_chars) for _, text in documents]
    docs = [i for i, pairs in enumerate(by_doc) if pairs]
    if len(docs) < 2:
        return []
    rng = np.random.default_rng(seed)
    items: list[choices_lib.Item] = []
    for _ in range(n_items * 4):  # a few draws may fail (too few distinct distractors)
        if len(items) == n_items:
            break
        d = docs[int(rng.integers(len(docs)))]
        context, gold = by_doc[d][int(rng.integers(len(by_doc[d])))]
        others: list[str] = []
        for _ in range(8 * n_choices):
            if len(others) == n_choices - 1:
                break
            e = docs[int(rng.integers(len(docs)))]
            if e == d:
                continue
            cand = by_doc[e][int(rng.integers(len(by_doc[e])))][1]
            if cand != gold and cand not in others:
                others.append(cand)
        if len(others) < n_choices - 1:
            continue
        at = int(rng.integers(n_choices))
        options = others[:at] + [gold] + others[at:]
        items.append(choices_lib.Item(tuple((context, o) for o in options), at))
    return items


class Probes:
    def __init__(self, name: str, config, domains: list[str], n_items: int, n_choices: int,
                 seed: int, context_chars: int):
        self.name, self.config, self.domains = name, config, domains
        self.n_items, self.n_choices, self.seed = n_items, n_choices, seed
        self.context_chars = context_chars
        self._items: dict[str, list[choices_lib.Item]] | None = None

    @property
    def items(self) -> dict[str, list[choices_lib.Item]]:
        if self._items is None:
            catalog = catalog_lib.for_config(self.config)
            self._items = {}
            for d in self.domains:
                docs = list(sources_lib.read_documents(catalog.source(d), "validation"))
                seed = self.seed * 1_000_003 + zlib.crc32(d.encode())
                self._items[d] = build_items(docs, self.n_items, self.n_choices, seed,
                                             self.context_chars)
        return self._items

    def run(self, scorer: Scorer) -> dict:
        per_domain = {d: choices_lib.accuracy(scorer, items)
                      for d, items in self.items.items() if items}
        out: dict = {k: float(np.mean([m[k] for m in per_domain.values()])) if per_domain
                     else 0.0 for k in ("acc", "acc_norm", "chance")}
        out["domains"] = per_domain
        return out


def make(spec: dict, config, where: str) -> Probes:
    choices_lib.check_options(spec, OPTIONS, where)
    domains = list(spec.get("domains") or catalog_lib.mixture_domains(config))
    catalog = catalog_lib.for_config(config)
    for d in domains:
        try:
            catalog.check(d)
        except ValueError as e:
            raise choices_lib.EvalConfigError(f"{where}: {e}") from None
    n_items, n_choices = int(spec.get("items", 32)), int(spec.get("choices", 4))
    if n_items < 1 or n_choices < 2:
        raise choices_lib.EvalConfigError(
            f"{where}: items={n_items} must be >= 1 and choices={n_choices} >= 2")
    return Probes(spec["name"], config, domains, n_items, n_choices, int(spec.get("seed", 0)),
                  int(spec.get("context_chars", 400)))
