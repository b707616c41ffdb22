"""Heuristic quality signals in the style of the Gopher, C4 and FineWeb filters.

Each signal is a per-document number; `goodness` maps it onto [0, 1] with a logistic centred on
the published threshold, and `quality` is the mean goodness: one score in which higher means
"more like clean prose". Thresholds: Gopher (Rae et al. 2021, appendix A), C4 (Raffel
et al. 2020: lines ending in terminal punctuation), FineWeb (Penedo et al. 2024: duplicated lines).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_STOP_WORDS = frozenset("the be to of and that have with".split())
_TERMINAL = (".", "!", "?", '"', "'", "”", ":")

SIGNALS = ("alpha_words", "mean_word_length", "symbol_ratio", "duplicate_lines",
           "punctuated_lines", "stop_words", "words")


def signals(text: str) -> dict[str, float]:
    words = _WORD.findall(text)
    n_words = max(len(words), 1)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    n_lines = max(len(lines), 1)
    symbols = text.count("#") + text.count("...") + text.count("…")
    return {
        # Gopher: >= 80% of words contain an alphabetic character.
        "alpha_words": sum(1 for w in words if _ALPHA.search(w)) / n_words,
        # Gopher: mean word length between 3 and 10 characters.
        "mean_word_length": sum(len(w) for w in words) / n_words,
        # Gopher: hash and ellipsis symbols per word <= 0.1.
        "symbol_ratio": symbols / n_words,
        # FineWeb / Gopher: fraction of lines that duplicate an earlier line.
        "duplicate_lines": (n_lines - len(set(lines))) / n_lines,
        # C4: lines ending in terminal punctuation.
        "punctuated_lines": sum(1 for l in lines if l.endswith(_TERMINAL)) / n_lines,
        # Gopher: at least two of the English stop words.
        "stop_words": float(sum(1 for w in words if w.lower() in _STOP_WORDS)),
        "words": float(len(words)),
    }


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(x, -50, 50))))


def goodness(s: dict[str, float]) -> dict[str, float]:
    """Each signal through a logistic centred on its published threshold: 0.5 at the threshold,
    near 1 well on the good side. Smooth rather than a hard cut, so documents that all pass a
    filter are still ranked (what an ordered curriculum needs)."""
    mwl = s["mean_word_length"]
    n_words = max(s["words"], 1.0)
    return {
        "alpha_words": _sigmoid((s["alpha_words"] - 0.8) / 0.05),
        "mean_word_length": _sigmoid((mwl - 3.0) / 0.5) * _sigmoid((10.0 - mwl) / 0.5),
        "symbol_ratio": _sigmoid((0.1 - s["symbol_ratio"]) / 0.03),
        "duplicate_lines": _sigmoid((0.3 - s["duplicate_lines"]) / 0.1),
        "punctuated_lines": _sigmoid((s["punctuated_lines"] - 0.5) / 0.15),
        # Gopher asks for >= 2 stop words; as a rate, English prose has ~0.1-0.2 per word.
        "stop_words": _sigmoid((s["stop_words"] / n_words - 0.05) / 0.03),
    }


def score_documents(texts: Iterable[str]) -> dict[str, np.ndarray]:
    """Columns for a list of documents: every raw signal plus the combined `quality`."""
    cols: dict[str, list[float]] = {k: [] for k in (*SIGNALS, "quality")}
    for text in texts:
        s = signals(text)
        g = goodness(s)
        for k in SIGNALS:
            cols[k].append(s[k])
        cols["quality"].append(float(np.mean(list(g.values()))))
    return {k: np.asarray(v, np.float32) for k, v in cols.items()}
