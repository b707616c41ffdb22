"""Heuristic quality signals in the style of the Gopher, C4 and FineWeb filters.

Each signal is a per-document number; `goodness` maps it onto [0, 1] with the published
thresholds as the edges of a linear ramp, and `quality` is the mean goodness — one score in which
higher means "more like clean prose". Thresholds: Gopher (Rae et al. 2021, appendix A), C4 (Raffel
et al. 2020: lines ending in terminal punctuation), FineWeb (Penedo et al. 2024: duplicated lines).
"""

from __future__ import annotations

import re

import numpy as np

_WORD = re.compile(r"\S+")
_ALPHA = re.compile(r"[^\W\d_]")
_STOP_WORDS = frozenset("the be to of and that have with".split())
_TERMINAL = (".", "!", "?", '"', "'", "”", ":")

SIGNALS = ("alpha_words", "mean_word_length", "symbol_ratio", "duplicate_lines",
           "punctuated_lines", "stop_words")


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
    }


def _ramp(x, bad, good):
    """0 at `bad`, 1 at `good`, linear between (either direction)."""
    return float(np.clip((x - bad) / (good - bad), 0.0, 1.0))


def goodness(s: dict[str, float]) -> dict[str, float]:
    mwl = s["mean_word_length"]
    return {
        "alpha_words": _ramp(s["alpha_words"], 0.5, 0.8),
        "mean_word_length": min(_ramp(mwl, 1.0, 3.0), _ramp(mwl, 14.0, 10.0)),
        "symbol_ratio": _ramp(s["symbol_ratio"], 0.3, 0.1),
        "duplicate_lines": _ramp(s["duplicate_lines"], 0.5, 0.3),
        "punctuated_lines": _ramp(s["punctuated_lines"], 0.0, 0.8),
        "stop_words": _ramp(s["stop_words"], 0.0, 2.0),
    }


def score_documents(texts) -> dict[str, np.ndarray]:
    """Columns for a list of documents: every raw signal plus the combined `quality`."""
    cols = {k: [] for k in (*SIGNALS, "quality")}
    for text in texts:
        s = signals(text)
        g = goodness(s)
        for k in SIGNALS:
            cols[k].append(s[k])
        cols["quality"].append(float(np.mean(list(g.values()))))
    return {k: np.asarray(v, np.float32) for k, v in cols.items()}
