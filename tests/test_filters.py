"""Heuristic filters: each rule just either side of its published threshold, the scorer as a Beam
transform over the bundled corpora, and the report's drop counts."""

import math
import string
from fractions import Fraction
from itertools import product

import numpy as np
import pytest

from loam.selection import filters
from loam.selection.base import Doc, ScorerError, make

from helpers import corpus_docs, run_scorer

# Distinct four-letter lower-case tokens: no n-gram of them ever repeats.
_FILLER = ["".join(t) for t in product(string.ascii_lowercase[:10], repeat=4)]


def filler(n, start=0):
    return _FILLER[start:start + n]


def flips(verdict, knobs):
    """The knob values at which a rule's verdict changes."""
    values = [verdict(k) for k in knobs]
    return [k for k, a, b in zip(knobs[1:], values, values[1:]) if a != b]


# ------------------------------------------------------------------------- Gopher quality

def quality(text, rule):
    return filters.gopher_quality(text)[rule]


def test_gopher_word_count():
    assert flips(lambda n: quality(" ".join(filler(n)), "gopher_word_count"),
                 range(45, 55)) == [50]
    # Punctuation-only tokens are not words.
    assert not quality(" ".join(filler(49)) + " - ...", "gopher_word_count")
    long = " ".join(filler(1000)) + " "
    assert quality(long * 100, "gopher_word_count")
    assert not quality(long * 100 + "extra", "gopher_word_count")


def test_gopher_mean_word_length():
    # 50 words of 3 letters (mean 3.0) pass; one of them shortened to 2 (mean 2.98) fails.
    short = ["abc"] * 50
    assert quality(" ".join(short), "gopher_mean_word_length")
    assert not quality(" ".join(short[:-1] + ["ab"]), "gopher_mean_word_length")
    long = ["abcdefghij"] * 50
    assert quality(" ".join(long), "gopher_mean_word_length")
    assert not quality(" ".join(long[:-1] + ["abcdefghijk"]), "gopher_mean_word_length")
    # Punctuation at a word's ends does not count towards its length.
    assert quality(" ".join(w + "." for w in long), "gopher_mean_word_length")


@pytest.mark.parametrize("rule,mark", [("gopher_hash_ratio", "#"),
                                       ("gopher_ellipsis_ratio", "..."),
                                       ("gopher_ellipsis_ratio", "…")])
def test_gopher_symbol_ratios(rule, mark):
    def doc(k):  # 100 words, k of them carrying the symbol: ratio k/100, limit 0.1
        words = filler(100)
        return " ".join(w + mark if i < k else w for i, w in enumerate(words))
    assert flips(lambda k: quality(doc(k), rule), range(5, 15)) == [11]


def test_gopher_bullet_and_ellipsis_lines():
    def lines(k, fmt):  # 10 lines, k of them marked
        return "\n".join(fmt(" ".join(filler(8, 8 * i))) if i < k else " ".join(filler(8, 8 * i))
                         for i in range(10))
    assert flips(lambda k: quality(lines(k, lambda l: "• " + l), "gopher_bullet_lines"),
                 range(11)) == [10]
    assert not quality(lines(10, lambda l: "- " + l), "gopher_bullet_lines")
    assert flips(lambda k: quality(lines(k, lambda l: l + " ..."), "gopher_ellipsis_lines"),
                 range(11)) == [4]


def test_gopher_alpha_words():
    def doc(k):  # 100 tokens, k without a letter (numbers): 80% alphabetic needed
        return " ".join(str(1000 + i) if i < k else w for i, w in enumerate(filler(100)))
    assert flips(lambda k: quality(doc(k), "gopher_alpha_words"), range(15, 25)) == [21]


def test_gopher_stop_words():
    words = filler(60)
    assert not quality(" ".join(words + ["the"] * 5), "gopher_stop_words")  # one distinct
    assert quality(" ".join(words + ["The", "of."]), "gopher_stop_words")
    assert not quality(" ".join(words + ["then", "often"]), "gopher_stop_words")


# ---------------------------------------------------------------------- Gopher repetition

def repetition(text, rule):
    return filters.gopher_repetition(text)[rule]


@pytest.mark.parametrize("sep,kind", [("\n", "line"), ("\n\n", "para")])
def test_gopher_duplicate_fraction(sep, kind):
    def doc(k):  # 10 units, k of them copies of the first: at most 30% copies
        units = [" ".join(filler(5, 5 * i)) for i in range(10 - k)] + [" ".join(filler(5))] * k
        return sep.join(units)
    assert flips(lambda k: repetition(doc(k), f"gopher_dup_{kind}_frac"), range(8)) == [4]


@pytest.mark.parametrize("sep,kind", [("\n", "line"), ("\n\n", "para")])
def test_gopher_duplicate_character_fraction(sep, kind):
    # A unit of a characters, another of 100 - 2a, the first again: a/100 duplicated, limit 0.2.
    def doc(a):
        return sep.join(["x" * a, "y" * (100 - 2 * a), "x" * a])
    assert flips(lambda a: repetition(doc(a), f"gopher_dup_{kind}_char_frac"),
                 range(15, 25)) == [21]


@pytest.mark.parametrize("n", [2, 3, 4])
def test_gopher_top_ngram(n):
    """An n-gram of four-letter words twice among m distinct words: its share of the word
    characters is nk/(nk+m); the rule flips at the first m under the limit."""
    limit = Fraction(filters.TOP_NGRAM_MAX[n]).limit_denominator(100)
    gram = filler(n, 9000)

    def doc(m):
        rest = filler(m, 100)
        return " ".join(gram + rest[:m // 2] + gram + rest[m // 2:])
    knobs = list(range(5, 60))
    expected = [m for m in knobs[1:] if (Fraction(2 * n, 2 * n + m) > limit)
                != (Fraction(2 * n, 2 * n + m - 1) > limit)]
    assert len(expected) == 1
    assert flips(lambda m: repetition(doc(m), f"gopher_top_{n}gram"), knobs) == expected
    # Unrepeated n-grams never fail, however short the document.
    assert repetition(" ".join(filler(n)), f"gopher_top_{n}gram")


@pytest.mark.parametrize("n", range(5, 11))
def test_gopher_duplicated_ngrams(n):
    """An n-gram twice among m distinct words: both copies count, 2n/(2n+m) of the characters."""
    limit = Fraction(filters.DUP_NGRAM_MAX[n]).limit_denominator(100)
    gram = filler(n, 9000)

    def doc(m):
        rest = filler(m, 100)
        return " ".join(gram + rest[:m // 2] + gram + rest[m // 2:])
    knobs = list(range(30, 200))
    expected = [m for m in knobs[1:] if (Fraction(2 * n, 2 * n + m) > limit)
                != (Fraction(2 * n, 2 * n + m - 1) > limit)]
    assert len(expected) == 1
    assert flips(lambda m: repetition(doc(m), f"gopher_dup_{n}gram"), knobs) == expected
    # Overlapping repeats count each word once: one word 2n times in a row covers 2n words
    # (not n + 1 overlapping n-grams of n words each), so the rule flips at 2n/(2n + m).
    run = " ".join(["abcd"] * (2 * n))
    m = math.ceil(2 * n * (1 - limit) / limit)
    assert repetition(run + " " + " ".join(filler(m)), f"gopher_dup_{n}gram")
    assert not repetition(run + " " + " ".join(filler(m - 1)), f"gopher_dup_{n}gram")


# ------------------------------------------------------------------------------------ C4

def sentence(i, words=4):
    return " ".join(filler(words, words * i)).capitalize() + "."


def c4(text, rule, **kw):
    return filters.c4(text, **kw)[rule]


def test_c4_sentences():
    five = "\n".join(sentence(i) for i in range(5))
    four = "\n".join(sentence(i) for i in range(4))
    assert c4(five, "c4_sentences")
    assert not c4(four, "c4_sentences")
    # Lines that C4 drops do not count: no terminal punctuation, fewer than 3 words, an
    # ellipsis, "javascript", a cookie notice, a word over 1,000 characters.
    for dropped in ["Abcd efgh ijkl mnop", "Two words.", "Abcd efgh ijkl...",
                    "Please enable JavaScript to view this page.",
                    "This site uses cookies to work.", "Abcd efgh " + "x" * 1001 + "."]:
        assert not c4(four + "\n" + dropped, "c4_sentences"), dropped
    # Two sentences on one line count twice; a citation mark does not hide the full stop.
    assert c4(four.replace(".", ". Then more words.", 1), "c4_sentences")
    assert c4(four + "\nAbcd efgh ijkl.[1]", "c4_sentences")
    # FineWeb's setting keeps lines without terminal punctuation.
    assert c4(four + "\nAbcd efgh ijkl mnop", "c4_sentences", terminal_punct=False)


@pytest.mark.parametrize("rule,phrase", [("c4_lorem_ipsum", "Lorem ipsum dolor sit amet."),
                                         ("c4_curly_bracket", "Call it with {x: 1} here.")])
def test_c4_page_rules(rule, phrase):
    body = "\n".join(sentence(i) for i in range(6))
    assert c4(body, rule)
    assert not c4(body + "\n" + phrase, rule)
    # As in C4's code, only lines that pass the punctuation and length tests are looked at.
    assert c4(body + "\n" + phrase.rstrip("."), rule)


# ------------------------------------------------------------------------------- FineWeb

def fineweb(text, rule, **kw):
    return filters.fineweb(text, **kw)[rule]


def test_fineweb_punctuated_lines():
    def doc(k):  # 100 lines, k ending in a full stop: at least 12% needed
        return "\n".join(" ".join(filler(8, 8 * i)) + ("." if i < k else "") for i in range(100))
    assert flips(lambda k: fineweb(doc(k), "fineweb_punct_lines"), range(5, 20)) == [12]
    assert fineweb("\n".join("中文句子结束。" for _ in range(3)), "fineweb_punct_lines")


def test_fineweb_short_lines():
    def doc(k, width=30):  # 100 lines, k of `width` characters, the rest of 40
        return "\n".join((_FILLER[i] * 10)[:width if i < k else 40] for i in range(100))
    assert flips(lambda k: fineweb(doc(k), "fineweb_short_lines"), range(60, 75)) == [68]
    assert fineweb(doc(100, width=31), "fineweb_short_lines")  # 31 characters is not short


def test_fineweb_duplicated_line_characters():
    # Lines of a, 100 - 2a and a characters: a/100 of the characters (newlines aside) repeat.
    def doc(a, limit=0.1):
        return filters.fineweb("\n".join(["x" * a, "y" * (100 - 2 * a), "x" * a]),
                               dup_line_chars=limit)["fineweb_dup_line_chars"]
    assert flips(doc, range(5, 15)) == [11]
    assert flips(lambda a: doc(a, 0.01), range(0, 5)) == [2]


def test_fineweb_newline_ratio():
    def doc(k):  # 100 words on k + 1 lines: at most 0.3 newlines per word
        words = filler(100)
        cuts = [round(i * 100 / (k + 1)) for i in range(k + 2)]
        return "\n".join(" ".join(words[a:b]) for a, b in zip(cuts, cuts[1:]))
    assert flips(lambda k: fineweb(doc(k), "fineweb_newline_ratio"), range(25, 35)) == [31]
    assert not any(filters.fineweb("").values()) and not any(filters.fineweb("\n\n").values())


# -------------------------------------------------------------- the scorer, its errors

def test_rule_selection_and_errors():
    assert filters.resolve_rules("all") == filters.RULES
    assert filters.resolve_rules("fineweb,c4_sentences") == (
        "c4_sentences", *filters.FAMILIES["fineweb"])
    assert make("filters", {"rules": "c4"}).columns == (*filters.FAMILIES["c4"], "filters_pass")
    with pytest.raises(ScorerError, match="unknown rule 'gopher_nonsense'.*gopher_word_count"):
        make("filters", {"rules": "c4,gopher_nonsense"})
    with pytest.raises(ScorerError, match="no rules selected"):
        make("filters", {"rules": ""})
    with pytest.raises(ScorerError, match="c4_terminal_punct must be true or false"):
        make("filters", {"c4_terminal_punct": "maybe"})
    with pytest.raises(ScorerError, match=r"fineweb_dup_line_chars must be in \[0, 1\]"):
        make("filters", {"fineweb_dup_line_chars": 2})




def test_beam_scorer_on_the_corpora(tmp_path):
    docs = [d for domain in ("literature", "code", "reference") for d in corpus_docs(domain, 12)]
    scorer = make("filters", {})
    out = run_scorer(scorer, docs, tmp_path)
    assert sorted(out) == sorted((d.domain, d.index) for d in docs)
    for d in docs:
        cols = out[d.domain, d.index]
        assert set(cols) == set(scorer.columns)
        verdicts = scorer.passes(d.text)
        assert cols == {**{r: float(v) for r, v in verdicts.items()},
                        "filters_pass": float(all(verdicts.values()))}
    # The corpora differ the way the rules are meant to see: WordNet glosses are too short for
    # Gopher; Python source is not punctuated prose.
    assert not any(out["reference", i]["gopher_word_count"] for i in range(12))
    kjv = sum(out["literature", i]["fineweb_punct_lines"] for i in range(12))
    code = sum(out["code", i]["fineweb_punct_lines"] for i in range(12))
    assert kjv == 12 and code < 6


def test_report_counts_alone_and_in_order():
    """Two rules over four documents: one clean, one too short, one too short and broken into
    many lines, one only broken into lines."""
    prose = filler(60)
    texts = {
        "clean": " ".join(prose[:30]) + "\n" + " ".join(prose[30:]),
        "short": " ".join(prose[:40]),
        "both": "\n".join(" ".join(prose[i:i + 2]) for i in range(0, 40, 2)),
        "lines": "\n".join(" ".join(prose[i:i + 2]) for i in range(0, 60, 2)),
    }
    tokens = {"clean": 10, "short": 20, "both": 30, "lines": 40}
    scorer = make("filters", {"rules": "fineweb_newline_ratio,gopher_word_count"})
    assert scorer.columns == ("gopher_word_count", "fineweb_newline_ratio", "filters_pass")
    rows = [scorer.score(Doc("web", i, k, "train", t, tokens[k]))
            for i, (k, t) in enumerate(texts.items())]
    assert [r["filters_pass"] for r in rows] == [1, 0, 0, 0]
    columns = {c: np.array([r[c] for r in rows], np.float32) for c in scorer.columns}
    rep = scorer.report("web", columns, np.array(list(tokens.values())))
    assert rep["documents"] == 4 and rep["tokens"] == 100
    assert rep["order"] == ["gopher_word_count", "fineweb_newline_ratio"]
    words, lines = rep["rules"]["gopher_word_count"], rep["rules"]["fineweb_newline_ratio"]
    assert words["dropped_alone"] == {"documents": 2, "tokens": 50}       # short, both
    assert words["dropped_in_order"] == {"documents": 2, "tokens": 50}
    assert words["remaining"] == {"documents": 2, "tokens": 50}           # clean, lines
    assert lines["dropped_alone"] == {"documents": 2, "tokens": 70}       # both, lines
    assert lines["dropped_in_order"] == {"documents": 1, "tokens": 40}    # lines
    assert lines["remaining"] == rep["kept"] == {"documents": 1, "tokens": 10}
