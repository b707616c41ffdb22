"""ZIP-FIT (Entezari et al. 2024): alignment to a target set by gzip compression, as a scorer.

The normalised compression distance of two texts is

    NCD(x, y) = (C(xy) - min(C(x), C(y))) / max(C(x), C(y))

with C the length of the gzip'd UTF-8 bytes (``gzip.compress`` at ``level``, mtime 0) and xy the
document followed by the target example, as the authors concatenate them. A document's
alignment is the paper's ZIP-FIT score averaged over the target examples,

    zipfit_align(x) = 1 - mean over targets y of NCD(x, y),

higher = closer to the target; selecting the top k by it is the paper's selection (the shared
top-fraction policy). The target is a domain, a domain's split or a JSON-lines file, as for DSIR
(``loam.selection.dsir.Target``); at most ``max_targets`` of its examples are used, the same ones
on every run (those whose texts have the smallest sha256). ``max_bytes`` > 0 cuts every text to
its first bytes before compressing (gzip's window is 32 KiB: far beyond it a long document adds
cost, not signal). The authors' package defaults to gzip level 0 (stored, i.e. uncompressed);
level 9, gzip's own default, is used here.

Cost: one compression per (document, target example) pair.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from loam.selection.base import ScorerError, register
from loam.selection.dsir import TargetScorer


def compressed_size(data: bytes, level: int = 9) -> int:
    return len(gzip.compress(data, compresslevel=level, mtime=0))


def ncd(x: bytes, y: bytes, level: int = 9, cx: int | None = None, cy: int | None = None
        ) -> float:
    """Normalised compression distance of x and y (their sizes cx, cy if already known)."""
    cx = compressed_size(x, level) if cx is None else cx
    cy = compressed_size(y, level) if cy is None else cy
    return (compressed_size(x + y, level) - min(cx, cy)) / max(cx, cy)


def _cut(text: str, max_bytes: int) -> bytes:
    data = text.encode("utf-8")
    return data[:max_bytes] if max_bytes > 0 else data


def _text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def prepare_targets(texts, max_targets: int, max_bytes: int = 0, level: int = 9
                    ) -> list[tuple[bytes, int]]:
    """(bytes, compressed size) of the target examples used: at most max_targets, chosen by the
    smallest sha256 of their text (independent of the order they are read in)."""
    keyed = sorted((_text_key(t), t) for t in texts)
    out = []
    for _, t in keyed[:max_targets]:
        data = _cut(t, max_bytes)
        out.append((data, compressed_size(data, level)))
    return out


def alignment(text: str, targets: list[tuple[bytes, int]], max_bytes: int = 0,
              level: int = 9) -> float:
    """1 - mean NCD of a document to the prepared target examples."""
    x = _cut(text, max_bytes)
    cx = compressed_size(x, level)
    return 1.0 - float(np.mean([ncd(x, y, level, cx, cy) for y, cy in targets]))


@register
@dataclasses.dataclass
class ZipFit(TargetScorer):
    """Column ``zipfit_align``: 1 - mean gzip NCD to the target examples."""

    name = "zipfit"
    columns = ("zipfit_align",)

    target: str = ""
    max_targets: int = 64
    max_bytes: int = 0
    level: int = 9

    def check(self, catalog) -> None:
        if self.max_targets < 1:
            raise ScorerError(f"zipfit max_targets must be >= 1, got {self.max_targets}")
        if not 0 <= self.level <= 9:
            raise ScorerError(f"zipfit level is gzip's compression level 0-9, got {self.level}")
        if self.max_bytes < 0:
            raise ScorerError(f"zipfit max_bytes must be >= 0 (0: whole texts), got "
                              f"{self.max_bytes}")
        super().check(catalog)

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        k, cut, level = self.max_targets, self.max_bytes, self.level
        targets = (docs.pipeline
                   | "ZipfitTarget" >> beam.Create([self.resolve()])
                   | "ZipfitTargetTexts" >> beam.FlatMap(lambda t: t.texts())
                   | "ZipfitTargetSample" >> beam.combiners.Top.Smallest(k, key=_text_key)
                   | "ZipfitPrepare" >> beam.Map(lambda ts: prepare_targets(ts, k, cut, level)))
        return docs | "ZipfitScore" >> beam.Map(
            lambda d, ts: (d.domain, d.index, {"zipfit_align": alignment(d.text, ts, cut, level)}),
            ts=beam.pvalue.AsSingleton(targets))

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict | None:
        a = np.asarray(columns["zipfit_align"], np.float64)
        a = a[np.isfinite(a)]
        if not a.size:
            return None
        q = np.percentile(a, [10, 50, 90])
        return {"documents": int(a.size), "mean": float(a.mean()), "p10": float(q[0]),
                "median": float(q[1]), "p90": float(q[2])}
