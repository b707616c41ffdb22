"""DSIR: data selection with importance resampling (Xie et al. 2023), as a scorer.

Each document is a bag of hashed word n-grams: lower-cased word tokens (runs of word characters,
and runs of other non-space characters, as NLTK's WordPunctTokenizer splits them), their
unigrams and bigrams hashed by sha256 into ``num_buckets`` buckets (stable across processes
and machines). Two bag-of-n-grams models are fitted over those buckets: ``p_target`` from the
target documents (with ``smoothing`` pseudo-counts per bucket: add-one by default) and ``p_raw``
from the documents being scored. A document's importance weight is

    log w(x) = log p_target(x) - log p_raw(x) = sum over its n-grams g of
               log(p_target[b(g)] + 1e-8) - log(p_raw[b(g)] + 1e-8)

(the 1e-8 as in the authors' ``data-selection`` package; ``smoothing`` is the pseudo-count
their repository later added as ``target_laplace_smoothing``, default 0 there and absent from
the 1.0.3 release: ``smoothing=0`` is their estimator), written as the column ``dsir_logw``.
Resampling k documents without replacement with probabilities proportional to w is the Gumbel
top-k of the shared selection policies (``config.data.selection[domain] = {"score":
"dsir_logw", "policy": "gumbel", "temperature": 1.0, "fraction": ...}``); ``resample`` gives
the authors' draw for the benchmark.

The target (``target=``): ``DOMAIN`` (every document of a domain of the catalog),
``DOMAIN:validation`` or ``DOMAIN:train`` (one split of it), or a JSON-lines file (``.jsonl``,
``.jsonl.gz``) of target documents with a ``text`` field. ``raw=all`` fits ``p_raw`` on every
document scored in the run, ``raw=domain`` on each domain's own documents.

As Beam: one pass over the documents featurizes them and sums the two count vectors (a
CombinePerKey), then a Map scores every document with the log-ratio vector as a side input.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from loam import paths
from loam.data import catalog as catalog_lib
from loam.data import sources as sources_lib
from loam.selection.base import Scorer, ScorerError, register

EPS = 1e-8  # inside the logs, as the authors' package does
_WORD = re.compile(r"\w+|[^\w\s]+")
_ALL = "*"  # the key of the raw counts when raw=all


# --------------------------------------------------------------------------- features

def words(text: str) -> list[str]:
    """Lower-cased word tokens: runs of word characters and runs of punctuation."""
    return _WORD.findall(text.lower())


@functools.lru_cache(maxsize=1 << 20)
def bucket(ngram: str, num_buckets: int) -> int:
    """The hash bucket of an n-gram: sha256 of its UTF-8 bytes, as a big-endian integer, modulo
    num_buckets. Never Python's ``hash()``, which is salted per process."""
    return int.from_bytes(hashlib.sha256(ngram.encode("utf-8")).digest(), "big") % num_buckets


def features(text: str, num_buckets: int = 10_000, ngrams: int = 2) -> np.ndarray:
    """The buckets of every n-gram occurrence of a text (unigrams, then bigrams, ... up to
    ``ngrams``; n-grams are words joined by one space), one entry per occurrence."""
    w = words(text)
    grams = list(w)
    for n in range(2, ngrams + 1):
        grams += [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]
    return np.fromiter((bucket(g, num_buckets) for g in grams), np.int64, count=len(grams))


def counts(texts, num_buckets: int = 10_000, ngrams: int = 2) -> np.ndarray:
    """Summed bucket counts of many texts."""
    total = np.zeros(num_buckets, np.int64)
    for t in texts:
        total += np.bincount(features(t, num_buckets, ngrams), minlength=num_buckets)
    return total


def log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray,
              smoothing: float = 1.0) -> np.ndarray:
    """log p_target - log p_raw per bucket (float64)."""
    target = np.asarray(target_counts, np.float64) + smoothing
    raw = np.asarray(raw_counts, np.float64)
    if target.sum() <= 0:
        raise ScorerError("the DSIR target has no word n-grams (its documents are empty) and "
                          "smoothing=0; give a target with text, or smoothing > 0")
    p_target = target / target.sum()
    p_raw = raw / raw.sum() if raw.sum() > 0 else raw
    return np.log(p_target + EPS) - np.log(p_raw + EPS)


def log_weight(doc_features: np.ndarray, ratio: np.ndarray) -> float:
    """log w(x): the log-ratio summed over the document's n-gram occurrences."""
    return float(ratio[doc_features].sum()) if doc_features.size else 0.0


def importance_weights(raw_texts, target_texts, num_buckets: int = 10_000, ngrams: int = 2,
                       smoothing: float = 1.0) -> np.ndarray:
    """log w of every raw text, in memory (what the Beam scorer computes, for small sets)."""
    feats = [features(t, num_buckets, ngrams) for t in raw_texts]
    raw = np.zeros(num_buckets, np.int64)
    for f in feats:
        raw += np.bincount(f, minlength=num_buckets)
    ratio = log_ratio(counts(target_texts, num_buckets, ngrams), raw, smoothing)
    return np.array([log_weight(f, ratio) for f in feats])


def resample(logw, k: int, seed: int = 0, top_k: bool = False) -> np.ndarray:
    """Indices (ascending) of k documents drawn without replacement with probabilities
    proportional to exp(logw): the Gumbel top-k trick (top_k=True: the k largest weights).
    The noise is ``np.random.RandomState(seed).gumbel(size=n)``: the draw the authors' package
    makes after ``np.random.seed(seed)`` when no document is filtered out."""
    logw = np.asarray(logw, np.float64)
    if logw.ndim != 1:
        raise ValueError(f"logw must be one weight per document, got shape {logw.shape}")
    if np.isnan(logw).any():
        bad = np.flatnonzero(np.isnan(logw))[:5].tolist()
        raise ValueError(f"logw has NaN at {bad}...: rescore those documents before resampling")
    if not 0 <= k <= logw.shape[0]:
        raise ValueError(f"cannot draw k={k} of {logw.shape[0]} documents")
    keys = logw if top_k else logw + np.random.RandomState(seed).gumbel(size=logw.shape[0])
    return np.sort(np.argsort(-keys, kind="stable")[:k])


# --------------------------------------------------------------------------- target sets

_TOKEN_FIELDS = ("tokens", "input_ids", "ids", "token_ids")


def _is_file(spec: str) -> bool:
    return spec.endswith((".jsonl", ".jsonl.gz", ".json", ".gz")) or "/" in spec


def read_target_file(path: str, text_field: str = "text") -> Iterator[str]:
    """The texts of a JSON-lines file of target documents (gzip'd if it ends in .gz)."""

    if not paths.exists(path):
        raise ScorerError(f"target file {path} does not exist; give a JSON-lines file with a "
                          f"{text_field!r} field per line, or a domain name (DOMAIN or "
                          "DOMAIN:validation)")
    with paths.open(path, "rb") as raw:
        data: Any = gzip.GzipFile(fileobj=raw) if str(path).endswith(".gz") else raw
        f = io.TextIOWrapper(data, encoding="utf-8")
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ScorerError(f"{path}:{lineno}: not JSON; each line of a target file is an "
                                  f"object with a {text_field!r} field") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                if isinstance(record, dict) and any(k in record for k in _TOKEN_FIELDS):
                    raise ScorerError(
                        f"{path}:{lineno}: the target is token ids (another tokenizer's), not "
                        f"text; target documents must be text in a {text_field!r} field: "
                        "decode the ids with the tokenizer that made them")
                raise ScorerError(f"{path}:{lineno}: no string field {text_field!r}; each line "
                                  f"of a target file is an object with a {text_field!r} field")
            yield text


@dataclasses.dataclass(frozen=True)
class Target:
    """A target set, resolved against a catalog: picklable, so Beam workers read it too."""
    spec: str
    source: Any = None   # the domain's loam.data.sources.Source, or None for a file
    split: str | None = None

    @classmethod
    def parse(cls, spec: str, catalog=None) -> Target:
        if not spec:
            raise ScorerError("no target: give target=DOMAIN, target=DOMAIN:validation or "
                              "target=FILE.jsonl (JSON lines with a 'text' field)")
        if _is_file(spec):
            return cls(spec)
        name, _, split = spec.partition(":")
        if split and split not in ("train", "validation"):
            raise ScorerError(f"target {spec!r}: the split after ':' must be train or "
                              "validation (DOMAIN, DOMAIN:train or DOMAIN:validation)")
        if catalog is None:
            catalog = catalog_lib.default()
        try:
            source = catalog.source(name)
        except ValueError as e:  # CorpusError: unknown domain, with the catalog's own hint
            raise ScorerError(f"target {spec!r}: {e}; or give a JSON-lines file of target "
                              "documents") from None
        return cls(spec, source, split or None)

    def texts(self) -> Iterator[str]:
        if self.source is None:
            yield from read_target_file(self.spec)
            return
        for _, text in sources_lib.read_documents(self.source, self.split):
            yield text

    def fingerprint(self) -> tuple[int, str]:
        """(documents, sha256 of their texts); ScorerError if there are none."""
        h = hashlib.sha256()
        n = 0
        for text in self.texts():
            data = text.encode("utf-8")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
            n += 1
        if n == 0:
            raise ScorerError(f"the target {self.spec!r} has no documents; give a target set "
                              "with at least one document")
        return n, h.hexdigest()


class TargetScorer(Scorer):
    """A scorer measured against a target set (the ``target`` parameter)."""

    target: str = ""

    def check(self, catalog) -> None:
        self._catalog = catalog
        self._fingerprint = self.resolve().fingerprint()

    def resolve(self) -> Target:
        return Target.parse(self.target, getattr(self, "_catalog", None))

    def inputs(self) -> dict[str, str]:
        fp = getattr(self, "_fingerprint", None) or self.resolve().fingerprint()
        self._fingerprint = fp
        return {"target": f"{self.target} ({fp[0]} documents, sha256 {fp[1]})"}


# --------------------------------------------------------------------------- the scorer

class _SumCounts:
    """A CombineFn body: bucket ids -> summed counts (int64, exact in any order)."""

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets

    def create_accumulator(self):
        return np.zeros(self.num_buckets, np.int64)

    def add_input(self, acc, ids):
        acc += np.bincount(ids, minlength=self.num_buckets)
        return acc

    def merge_accumulators(self, accs):
        accs = list(accs)
        total = accs[0]
        for a in accs[1:]:
            total = total + a
        return total

    def extract_output(self, acc):
        return acc


def _combine_fn(num_buckets: int):
    import apache_beam as beam  # noqa: PLC0415

    class SumCounts(_SumCounts, beam.CombineFn):
        pass

    return SumCounts(num_buckets)


@register
@dataclasses.dataclass
class DSIR(TargetScorer):
    """Column ``dsir_logw``: log p_target(x) - log p_raw(x) under hashed n-gram models."""

    name = "dsir"
    columns = ("dsir_logw",)

    target: str = ""
    num_buckets: int = 10_000
    ngrams: int = 2
    smoothing: float = 1.0
    raw: str = "all"

    def check(self, catalog) -> None:
        if self.num_buckets < 1 or self.ngrams < 1:
            raise ScorerError(f"dsir needs num_buckets >= 1 and ngrams >= 1, got "
                              f"{self.num_buckets} and {self.ngrams}")
        if self.smoothing < 0:
            raise ScorerError(f"dsir smoothing is a pseudo-count >= 0, got {self.smoothing}")
        if self.raw not in ("all", "domain"):
            raise ScorerError(f"dsir raw={self.raw!r}: use raw=all (one raw distribution over "
                              "every scored document) or raw=domain (one per domain)")
        super().check(catalog)

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        nb, n, smoothing, per_domain = self.num_buckets, self.ngrams, self.smoothing, \
            self.raw == "domain"
        target = self.resolve()
        feats = docs | "DsirFeatures" >> beam.Map(
            lambda d: (d.domain, d.index, features(d.text, nb, n)))
        raw = (feats
               | "DsirRawKey" >> beam.Map(lambda f: (f[0] if per_domain else _ALL, f[2]))
               | "DsirRawCounts" >> beam.CombinePerKey(_combine_fn(nb)))
        target_counts = (docs.pipeline
                         | "DsirTarget" >> beam.Create([target])
                         | "DsirTargetTexts" >> beam.FlatMap(lambda t: t.texts())
                         | "DsirTargetFeatures" >> beam.Map(lambda t: features(t, nb, n))
                         | "DsirTargetCounts" >> beam.CombineGlobally(_combine_fn(nb)))
        ratios = raw | "DsirLogRatio" >> beam.Map(
            lambda kv, t: (kv[0], log_ratio(t, kv[1], smoothing)),
            t=beam.pvalue.AsSingleton(target_counts))
        return feats | "DsirScore" >> beam.Map(
            lambda f, r: (f[0], f[1],
                          {"dsir_logw": log_weight(f[2], r[f[0] if per_domain else _ALL])}),
            r=beam.pvalue.AsDict(ratios))

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict | None:
        logw = np.asarray(columns["dsir_logw"], np.float64)
        logw = logw[np.isfinite(logw)]
        if not logw.size:
            return None
        q = np.percentile(logw, [10, 50, 90])
        return {"documents": int(logw.size), "mean": float(logw.mean()),
                "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}

