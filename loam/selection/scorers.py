"""The built-in scorers, registered by name for ``python -m loam.selection.score --scorer NAME``.

* ``heuristic``: Gopher/C4/FineWeb-style text signals and their combined ``quality`` in [0, 1]
  (``loam.selection.heuristics``).
* ``random``: a uniform [0, 1) number from a hash of the document id (a reproducible random
  subset: keep a range of it).
* ``model``: the mean per-token loss (nats) of a loam checkpoint on each document, into a column
  of your naming (``loam.selection.perplexity``, beside ``perplexity`` and its terciles).

Scorers defined in other modules register themselves when imported: the block at the end of this
file imports them, so ``base.make`` finds every scorer.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from loam.selection import heuristics
from loam.selection.base import Doc, PerDocument, register


@register
@dataclasses.dataclass
class Heuristic(PerDocument):
    name = "heuristic"
    columns = (*heuristics.SIGNALS, "quality")

    def score(self, doc: Doc) -> dict[str, float]:
        s = heuristics.signals(doc.text)
        out = {k: float(s[k]) for k in heuristics.SIGNALS}
        out["quality"] = float(np.mean(list(heuristics.goodness(s).values())))
        return out

    def report(self, domain, columns, tokens):
        """How ``quality`` spreads over the domain: its deciles, and the documents and tokens
        above 0.5 (the point where the mean signal sits at its published threshold)."""
        q = np.asarray(columns["quality"], np.float64)
        ok = np.isfinite(q)
        good = ok & (q >= 0.5)
        return {"documents": int(ok.sum()), "tokens": int(np.asarray(tokens)[ok].sum()),
                "quality_deciles": [round(float(x), 4) for x in
                                    np.quantile(q[ok], np.linspace(0, 1, 11))] if ok.any()
                else [],
                "quality_above_half": {"documents": int(good.sum()),
                                       "tokens": int(np.asarray(tokens)[good].sum())}}


def id_uniform(doc_id: str) -> float:
    """A uniform [0, 1) number from a document id (float32-exact: the column's own value)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "little")
    return float(np.float32(h / 2**64))


@register
@dataclasses.dataclass
class Random(PerDocument):
    name = "random"
    columns = ("random",)

    def score(self, doc: Doc) -> dict[str, float]:
        return {"random": id_uniform(doc.doc_id)}


# Scorers defined in their own modules (they register themselves on import): one line each,
# in alphabetical order.
import loam.selection.color_filter  # noqa: E402,F401
import loam.selection.dedup  # noqa: E402,F401
import loam.selection.dsir  # noqa: E402,F401
import loam.selection.filters  # noqa: E402,F401
import loam.selection.perplexity  # noqa: E402,F401
import loam.selection.ratings  # noqa: E402,F401
import loam.selection.zipfit  # noqa: E402,F401
