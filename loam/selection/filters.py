"""Heuristic quality filters with their published thresholds: one 0/1 column per rule.

    python -m loam.selection.score --scorer filters [--param rules=gopher_quality,c4]

Every rule is a column named after it (1 = the document passes, 0 = it fails) and
``filters_pass`` is 1 when the document passes every selected rule. The rules, in the fixed
order in which the report drops documents (FineWeb's pipeline order: Gopher repetition, Gopher
quality, C4, FineWeb):

Gopher repetition (Rae et al. 2021, table A1). Lines are the non-blank lines, paragraphs the
non-blank blocks between blank lines, both stripped; a duplicate is a second or later copy;
character fractions are over the characters of all lines (paragraphs). For n-grams, words are
the whitespace-separated tokens and fractions are over the characters of all words:
  gopher_dup_para_frac <= 0.30, gopher_dup_para_char_frac <= 0.20,
  gopher_dup_line_frac <= 0.30, gopher_dup_line_char_frac <= 0.20,
  gopher_top_{2,3,4}gram <= 0.20, 0.18, 0.16: the characters of the most frequent n-gram times
    its count (when it occurs more than once);
  gopher_dup_{5..10}gram <= 0.15, 0.14, 0.13, 0.12, 0.11, 0.10: the characters of the words
    covered by any occurrence of an n-gram that occurs more than once, each word counted once
    (the paper's "not to count characters that occur in overlapping n-grams more than once").
    datatrove counts only the second and later occurrences, which is up to twice as lenient.

Gopher quality (Rae et al. 2021, appendix A). A word is a whitespace-separated token with at
least one letter or digit, its length measured without the punctuation at its ends:
  gopher_word_count 50..100,000 words; gopher_mean_word_length 3..10 characters;
  gopher_hash_ratio and gopher_ellipsis_ratio: "#" and "..."/"…" per word <= 0.1 each;
  gopher_bullet_lines: <= 90% of non-blank lines start with a bullet (• ‣ ◦ ▪ - *);
  gopher_ellipsis_lines: <= 30% of non-blank lines end with "..." or "…";
  gopher_alpha_words: >= 80% of the whitespace-separated tokens contain a letter;
  gopher_stop_words: >= 2 different words of {the, be, to, of, and, that, have, with}
    (lower-cased, punctuation at the ends stripped).

C4 (Raffel et al. 2020, section 2.2, as the reference code that built C4 applies it, and as
datatrove's C4QualityFilter does): each line is stripped and Wikipedia-style citation marks
("[1]", "[edit]", "[citation needed]") removed; a line is kept only if no word is longer than
1,000 characters, it ends in terminal punctuation (. ? ! " ') but not "...", it has >= 3 words,
and it does not mention "javascript" or a cookie/terms-of-use/privacy-policy phrase. Then:
  c4_lorem_ipsum: no kept-line candidate contains "lorem ipsum";
  c4_curly_bracket: no kept-line candidate contains "{";
    (as in that code, these two look at the lines that passed the punctuation and length tests;
    the paper's wording is "any page", which is stricter);
  c4_sentences: the kept lines hold >= 5 sentences. Sentences are counted in each kept line
    by a splitter at . ! ? (with closing quotes/brackets) followed by white space; datatrove
    counts them with NLTK's punkt model, C4's code with its own punkt-based splitter.
  ``c4_terminal_punct=False`` skips the terminal-punctuation line test (FineWeb's setting).

FineWeb (Penedo et al. 2024; datatrove's FineWebQualityFilter). Lines are the
non-blank lines (right-stripped):
  fineweb_punct_lines: >= 0.12 of lines end in terminal punctuation (. ! ? and their
    full-width and other-script forms);
  fineweb_short_lines: <= 0.67 of lines are at most 30 characters long;
  fineweb_dup_line_chars: the characters of duplicate lines (second and later copies) over the
    characters of the text without newlines <= 0.1 (the paper's value; datatrove's default is
    0.01, FineWeb-2 set it back to 0.1: ``fineweb_dup_line_chars=0.01`` for datatrove's);
  fineweb_newline_ratio: newlines per word <= 0.3.

The thresholds are the papers' and datatrove's defaults alike, except FineWeb's duplicated-line
characters (above). What is counted differs from datatrove where it splits words with NLTK
(punctuation marks become tokens of their own, which count as non-alphabetic words there and
lower its mean word length); here words are white-space tokens, as the Gopher paper describes.
datatrove also counts blank lines in the bullet and ellipsis fractions, divides the line and
paragraph character fractions by the whole text's length, and needs stop words in lower case.

The report (``{scorer}.report.json``) gives, per domain, the documents and tokens each rule
drops on its own and, applying the rules one after another in the order above, the documents
and tokens each rule drops among those the earlier rules kept, and what remains after it.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from loam.selection.base import Doc, PerDocument, ScorerError, register

STOP_WORDS = frozenset("the be to of and that have with".split())
BULLETS = ("•", "‣", "◦", "▪", "-", "*")
C4_END = (".", "?", "!", '"', "'")
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
             "use cookies")
# Sentence-final marks of common scripts (Latin, full-width CJK, Arabic, Devanagari, Ethiopic).
TERMINAL = (".", "!", "?", "。", "！", "？", "．", "｡", "؟", "۔", "।", "॥", "።", "‼", "⁇", "⁈", "⁉")

_ALNUM = re.compile(r"[^\W_]")
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")

# Rule families in report order, each with its rules in order.
FAMILIES: dict[str, tuple[str, ...]] = {
    "gopher_repetition": (
        "gopher_dup_para_frac", "gopher_dup_para_char_frac", "gopher_dup_line_frac",
        "gopher_dup_line_char_frac", "gopher_top_2gram", "gopher_top_3gram", "gopher_top_4gram",
        *(f"gopher_dup_{n}gram" for n in range(5, 11))),
    "gopher_quality": (
        "gopher_word_count", "gopher_mean_word_length", "gopher_hash_ratio",
        "gopher_ellipsis_ratio", "gopher_bullet_lines", "gopher_ellipsis_lines",
        "gopher_alpha_words", "gopher_stop_words"),
    "c4": ("c4_lorem_ipsum", "c4_curly_bracket", "c4_sentences"),
    "fineweb": ("fineweb_punct_lines", "fineweb_short_lines", "fineweb_dup_line_chars",
                "fineweb_newline_ratio"),
}
RULES: tuple[str, ...] = tuple(r for rules in FAMILIES.values() for r in rules)

TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of second-or-later copies, their characters)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        else:
            seen.add(item)
    return count, chars


def _top_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the most frequent n-gram times its count (0 if no n-gram repeats)."""
    if len(words) < n:
        return 0
    counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = max(counts.items(), key=lambda kv: (kv[1], sum(map(len, kv[0]))))
    return sum(map(len, gram)) * count if count > 1 else 0


def _dup_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the words covered by an occurrence of an n-gram that occurs twice or more,
    each word counted once."""
    if len(words) < n:
        return 0
    starts: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(words) - n + 1):
        starts.setdefault(tuple(words[i:i + n]), []).append(i)
    covered = np.zeros(len(words), bool)
    for positions in starts.values():
        if len(positions) > 1:
            for i in positions:
                covered[i:i + n] = True
    return int(sum(len(w) for w, c in zip(words, covered) if c))


def gopher_repetition(text: str) -> dict[str, bool]:
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    tokens = text.split()
    out = {}
    for name, items in (("para", paragraphs), ("line", lines)):
        n_dup, dup_chars = _duplicates(items)
        out[f"gopher_dup_{name}_frac"] = n_dup <= 0.30 * max(len(items), 1)
        out[f"gopher_dup_{name}_char_frac"] = dup_chars <= 0.20 * max(sum(map(len, items)), 1)
    word_chars = max(sum(map(len, tokens)), 1)
    for n, limit in TOP_NGRAM_MAX.items():
        out[f"gopher_top_{n}gram"] = _top_ngram_chars(tokens, n) <= limit * word_chars
    for n, limit in DUP_NGRAM_MAX.items():
        out[f"gopher_dup_{n}gram"] = _dup_ngram_chars(tokens, n) <= limit * word_chars
    return out


def gopher_quality(text: str) -> dict[str, bool]:
    tokens = text.split()
    words = [_EDGE_PUNCT.sub("", t) for t in tokens if _ALNUM.search(t)]
    n_words = len(words)
    per_word = max(n_words, 1)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    n_lines = max(len(lines), 1)
    mean_len = sum(map(len, words)) / per_word
    return {
        "gopher_word_count": 50 <= n_words <= 100_000,
        "gopher_mean_word_length": 3 <= mean_len <= 10,
        "gopher_hash_ratio": text.count("#") <= 0.1 * per_word,
        "gopher_ellipsis_ratio": text.count("...") + text.count("…") <= 0.1 * per_word,
        "gopher_bullet_lines": sum(l.startswith(BULLETS) for l in lines) <= 0.9 * n_lines,
        "gopher_ellipsis_lines": sum(l.endswith(("...", "…")) for l in lines) <= 0.3 * n_lines,
        "gopher_alpha_words": (sum(1 for t in tokens if any(c.isalpha() for c in t))
                               >= 0.8 * max(len(tokens), 1)),
        "gopher_stop_words": len(STOP_WORDS.intersection(w.lower() for w in words)) >= 2,
    }


def count_sentences(line: str) -> int:
    """Sentences in a line: pieces between sentence-final punctuation followed by white space
    that contain a letter or digit."""
    return sum(1 for piece in _SENTENCE_END.split(line) if _ALNUM.search(piece))


def c4(text: str, terminal_punct: bool = True) -> dict[str, bool]:
    sentences = 0
    lorem = curly = False
    for raw in text.splitlines():
        line = raw.strip()
        words = line.split()
        if any(len(w) > 1000 for w in words):
            continue
        line = _CITATION.sub("", line)
        if terminal_punct and (not line.endswith(C4_END) or line.endswith("...")):
            continue
        if len(words) < 3:
            continue
        lower = line.lower()
        lorem = lorem or "lorem ipsum" in lower
        curly = curly or "{" in line
        if "javascript" in lower or any(p in lower for p in C4_POLICY):
            continue
        sentences += count_sentences(line)
    return {"c4_lorem_ipsum": not lorem, "c4_curly_bracket": not curly,
            "c4_sentences": sentences >= 5}


def fineweb(text: str, dup_line_chars: float = 0.1) -> dict[str, bool]:
    lines = [l.rstrip() for l in text.split("\n") if l.strip()]
    if not lines:
        return dict.fromkeys(FAMILIES["fineweb"], False)
    n_lines = len(lines)
    n_words = sum(1 for t in text.split() if _ALNUM.search(t))
    chars = max(len(text) - text.count("\n"), 1)
    return {
        "fineweb_punct_lines": sum(l.endswith(TERMINAL) for l in lines) >= 0.12 * n_lines,
        "fineweb_short_lines": sum(len(l) <= 30 for l in lines) <= 0.67 * n_lines,
        "fineweb_dup_line_chars": _duplicates(lines)[1] <= dup_line_chars * chars,
        "fineweb_newline_ratio": text.count("\n") <= 0.3 * max(n_words, 1),
    }


def resolve_rules(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Rule names (in report order) from "all", rule names and family names."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)
             if s.strip()]
    if not names:
        raise ScorerError("filters: no rules selected; pass --param rules=all or a comma-"
                          f"separated list of families {sorted(FAMILIES)} or rules")
    chosen: set[str] = set()
    for name in names:
        if name == "all":
            chosen.update(RULES)
        elif name in FAMILIES:
            chosen.update(FAMILIES[name])
        elif name in RULES:
            chosen.add(name)
        else:
            raise ScorerError(f"filters: unknown rule {name!r}; use 'all', a family "
                              f"({', '.join(FAMILIES)}) or one of the rules: {', '.join(RULES)}")
    return tuple(r for r in RULES if r in chosen)


def _as_bool(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise ScorerError(f"filters: {what} must be true or false, not {value!r}")


@register
@dataclasses.dataclass
class Filters(PerDocument):
    """Gopher, C4 and FineWeb rules, one 0/1 column each, and ``filters_pass``."""
    name = "filters"
    columns = (*RULES, "filters_pass")
    rules: str = "all"                  # "all", families and rule names, comma-separated
    c4_terminal_punct: bool = True      # False: FineWeb's C4 setting (no punctuation line test)
    fineweb_dup_line_chars: float = 0.1

    def __post_init__(self):
        self._rules = resolve_rules(self.rules)
        self.c4_terminal_punct = _as_bool(self.c4_terminal_punct, "c4_terminal_punct")
        try:
            self.fineweb_dup_line_chars = float(self.fineweb_dup_line_chars)
        except (TypeError, ValueError):
            raise ScorerError("filters: fineweb_dup_line_chars must be a number in [0, 1], not "
                              f"{self.fineweb_dup_line_chars!r}") from None
        if not 0 <= self.fineweb_dup_line_chars <= 1:
            raise ScorerError("filters: fineweb_dup_line_chars must be in [0, 1], not "
                              f"{self.fineweb_dup_line_chars}")
        self.columns = (*self._rules, "filters_pass")

    def passes(self, text: str) -> dict[str, bool]:
        """Each selected rule's verdict on a text (True = passes)."""
        families = {f for f, rules in FAMILIES.items() if set(rules) & set(self._rules)}
        out: dict[str, bool] = {}
        if "gopher_repetition" in families:
            out.update(gopher_repetition(text))
        if "gopher_quality" in families:
            out.update(gopher_quality(text))
        if "c4" in families:
            out.update(c4(text, self.c4_terminal_punct))
        if "fineweb" in families:
            out.update(fineweb(text, self.fineweb_dup_line_chars))
        return {r: bool(out[r]) for r in self._rules}

    def score(self, doc: Doc) -> dict[str, float]:
        verdicts = self.passes(doc.text)
        cols = {r: float(v) for r, v in verdicts.items()}
        cols["filters_pass"] = float(all(verdicts.values()))
        return cols

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict:
        tokens = np.asarray(tokens, np.int64)
        alive = np.ones(len(tokens), bool)
        rules = {}
        for rule in self._rules:
            fails = np.asarray(columns[rule]) < 0.5
            dropped = fails & alive
            alive &= ~fails
            rules[rule] = {
                "dropped_alone": {"documents": int(fails.sum()),
                                  "tokens": int(tokens[fails].sum())},
                "dropped_in_order": {"documents": int(dropped.sum()),
                                     "tokens": int(tokens[dropped].sum())},
                "remaining": {"documents": int(alive.sum()), "tokens": int(tokens[alive].sum())},
            }
        return {"domain": domain, "documents": len(tokens), "tokens": int(tokens.sum()),
                "order": list(self._rules), "rules": rules,
                "kept": {"documents": int(alive.sum()), "tokens": int(tokens[alive].sum())}}
