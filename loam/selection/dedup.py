"""Deduplication as a Beam scorer: exact (hash of normalised text) or near (MinHash LSH).

    python -m loam.selection.score --scorer dedup                        # MinHash, per domain
    python -m loam.selection.score --scorer dedup --param method=exact --param scope=global

Normalisation (both methods): Unicode NFKC, lower case, every punctuation character (Unicode
category P*) replaced by a space, runs of white space collapsed to one space, ends stripped.
So "Hello,  World!" and "hello world" are the same text; symbols (+ $ #) and digits stay.

* ``exact``: documents whose normalised texts have the same SHA-256 are one cluster.
* ``minhash`` (Broder 1997; LSH banding as in FineWeb): the shingles of a document are the
  distinct word ``ngram``-grams of its normalised text (a text of fewer words is one shingle; a
  text with no word has none and is never a duplicate). A shingle is hashed to 32 bits (a
  polynomial of the words' BLAKE2b hashes, its top 32 bits), then by ``bands * rows``
  functions h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 (multiply-add-shift, Dietzfelbinger 1996:
  a 2-independent family for 32-bit keys), a_i odd and b_i 64-bit, drawn from numpy's PCG64
  seeded with ``seed``; the signature is the minimum of each. Two documents are candidates
  when any of the ``bands`` bands of ``rows`` consecutive minima agree; for Jaccard similarity
  s that happens with probability
  1 - (1 - s^rows)^bands (14 x 8, FineWeb's: 0.92 at s = 0.8, 0.52 at 0.7, 0.05 at 0.5).
  Candidates are not verified against their true similarity, as in FineWeb.

As Beam transforms: band keys -> GroupByKey -> star edges (each bucket's smallest member to each
other member) -> Distinct -> connected components. The components are found by one worker, by
union-find over the edge list (the edges are the duplicate pairs only, not the documents; FineWeb
clusters its duplicate pairs on one worker too): each component's root is its smallest key
(domain, index), so the result does not depend on the order edges arrive in, nor on the number
of workers. The component of each document is joined back to the documents by CoGroupByKey.

Scope ``domain`` (default) looks for duplicates within each domain, ``global`` across all the
domains scored together. Columns:

* ``dup_cluster``: the index (within its domain) of the cluster's smallest member by
  (domain, index); a singleton's is its own index. Scope ``global`` adds
  ``dup_cluster_domain``: that member's domain, as its position among the sorted names of the
  domains scored together. (Columns are float32: indices are exact below 2^24 documents.)
* ``dup_cluster_size``: documents in the cluster (1 for a unique document).
* ``dup_keep``: 1 for exactly one document per cluster, its smallest (domain, index); else 0.
* ``dup_repeat``: FineWeb-2's rehydration weight for a survivor (0 for the others): the
  kept document stands for its cluster and is repeated by the cluster's size (FineWeb-2's
  table, ``repeat=fineweb2``: size 1 -> 1, 2 -> 2, 3-4 -> 3, 5-99 -> 5, 100-999 -> 8,
  1000 or more -> 1, large clusters being taken as boilerplate); ``repeat=none`` gives 1, and
  ``repeat="1:1,2:2,5:4"`` any table of (smallest size: weight).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from loam.selection.base import Doc, Scorer, ScorerError, register

FINEWEB2_REPEAT = {1: 1, 2: 2, 3: 3, 5: 5, 100: 8, 1000: 1}
COLUMNS: tuple[str, ...] = ("dup_cluster", "dup_cluster_size", "dup_keep", "dup_repeat")
_SPACE = re.compile(r"\s+")
_POLY = np.uint64(0x100000001B3)  # odd multiplier of the shingle polynomial
_CHUNK = 4096                     # shingles hashed at once (bounds memory for long documents)


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation to spaces, white space collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return _SPACE.sub(" ", text).strip()


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def shingle_hashes(text: str, ngram: int) -> np.ndarray:
    """The distinct 32-bit hashes of the word n-grams of the normalised text (uint64)."""
    words = normalise(text).split()
    if not words:
        return np.zeros(0, np.uint64)
    cache: dict[str, int] = {}
    for w in words:
        if w not in cache:
            cache[w] = _word_hash(w)
    ids = np.array([cache[w] for w in words], np.uint64)
    n = min(ngram, len(ids))
    h = np.zeros(len(ids) - n + 1, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _POLY + ids[j:len(ids) - n + 1 + j]
    return np.unique(h >> np.uint64(32))


def shingles(text: str, ngram: int) -> set[tuple[str, ...]]:
    """The word n-grams themselves (for measuring true Jaccard similarity)."""
    words = normalise(text).split()
    n = min(ngram, len(words))
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)} if words else set()


def jaccard(a: str, b: str, ngram: int = 5) -> float:
    sa, sb = shingles(a, ngram), shingles(b, ngram)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0


def detection_probability(s: float, bands: int, rows: int) -> float:
    """The chance that two documents of Jaccard similarity s share a band."""
    return 1.0 - (1.0 - s ** rows) ** bands


def lsh_threshold(bands: int, rows: int) -> float:
    """The similarity at which the detection curve is steepest, about (1/bands)^(1/rows)."""
    return (1.0 / bands) ** (1.0 / rows)


class MinHasher:
    """``num_perm`` hash functions from a seed; the same on every worker."""

    def __init__(self, num_perm: int, seed: int):
        rng = np.random.Generator(np.random.PCG64(seed))
        self.a = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 1 << 63, num_perm, dtype=np.uint64) * np.uint64(2)
        self.b |= rng.integers(0, 2, num_perm, dtype=np.uint64)

    def signature(self, hashes: np.ndarray) -> np.ndarray | None:
        """The minimum of each function over a document's 32-bit shingle hashes (uint64)."""
        if hashes.size == 0:
            return None
        sig = np.full(self.a.shape, np.iinfo(np.uint64).max, np.uint64)
        with np.errstate(over="ignore"):
            for lo in range(0, hashes.size, _CHUNK):
                x = hashes[lo:lo + _CHUNK, None]
                sig = np.minimum(sig, ((x * self.a + self.b) >> np.uint64(32)).min(axis=0))
        return sig


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[tuple[int, bytes]]:
    return [(i, hashlib.blake2b(sig[i * rows:(i + 1) * rows].tobytes(), digest_size=16).digest())
            for i in range(bands)]


def parse_repeat(spec: str) -> dict[int, int]:
    """A rehydration table: "fineweb2", "none" or "SIZE:WEIGHT,..." (sizes from 1 up)."""
    if spec == "fineweb2":
        return dict(FINEWEB2_REPEAT)
    if spec == "none":
        return {1: 1}
    try:
        table = {int(k): int(v) for k, v in (item.split(":") for item in spec.split(","))}
    except ValueError:
        table = {}
    if 1 not in table or any(k < 1 or v < 0 for k, v in table.items()):
        raise ScorerError(f"dedup: repeat={spec!r} is not a rehydration table; use 'fineweb2', "
                          "'none' or 'SIZE:WEIGHT,...' with sizes >= 1 starting at 1 and "
                          "weights >= 0 (e.g. '1:1,2:2,3:3,5:5,100:8,1000:1')")
    return table


def repeat_weight(size: int, table: Mapping[int, int]) -> int:
    """The weight of the first table entry at or below ``size``."""
    limits = sorted(table)
    return table[limits[bisect.bisect_right(limits, size) - 1]]


def star_edges(members: Iterable[tuple[str, int]]) -> list[tuple[tuple[str, int], tuple]]:
    """A bucket's members joined to its smallest: enough edges to connect them."""
    ordered = sorted(set(members))
    return [(ordered[0], m) for m in ordered[1:]]


def components(edges: Iterable[tuple[tuple, tuple]]) -> list[tuple[tuple, tuple[tuple, int]]]:
    """Union-find over an edge list: (member, (root, size)) for every member of a component
    with two or more members; the root is the component's smallest key."""
    parent: dict = {}

    def find(x):
        root = x
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            if rv < ru:
                ru, rv = rv, ru
            parent[rv] = ru  # the smaller key stays the root
    roots = {x: find(x) for x in parent}
    sizes: dict = {}
    for r in roots.values():
        sizes[r] = sizes.get(r, 0) + 1
    return [(x, (r, sizes[r])) for x, r in sorted(roots.items())]


def _positive_int(value: Any, what: str, hint: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ScorerError(f"dedup: {what} must be a whole number >= 1, not {value!r}; {hint}")
    return number


@register
@dataclasses.dataclass
class Dedup(Scorer):
    """Clusters of exact or near duplicates, one survivor each, and rehydration weights."""
    name = "dedup"
    columns = COLUMNS
    method: str = "minhash"    # "minhash" or "exact"
    scope: str = "domain"      # "domain" or "global"
    ngram: int = 5             # words per shingle
    bands: int = 14
    rows: int = 8
    num_perm: int = 0          # hash functions; 0 means bands * rows, else it must equal that
    seed: int = 1
    repeat: str = "fineweb2"   # rehydration table (see the module's docstring)

    def __post_init__(self):
        if self.scope == "global":
            self.columns = (*type(self).columns, "dup_cluster_domain")
        if self.method not in ("minhash", "exact"):
            raise ScorerError(f"dedup: unknown method {self.method!r}; use method=minhash "
                              "(near duplicates) or method=exact")
        if self.scope not in ("domain", "global"):
            raise ScorerError(f"dedup: unknown scope {self.scope!r}; use scope=domain "
                              "(duplicates within each domain) or scope=global (across domains)")
        self.ngram = _positive_int(self.ngram, "ngram (words per shingle)",
                                   "FineWeb uses ngram=5")
        self.bands = _positive_int(self.bands, "bands", "FineWeb uses bands=14, rows=8")
        self.rows = _positive_int(self.rows, "rows", "FineWeb uses bands=14, rows=8")
        try:
            self.num_perm = int(self.num_perm)
            self.seed = int(self.seed)
        except (TypeError, ValueError):
            raise ScorerError(f"dedup: num_perm and seed must be whole numbers, not "
                              f"{self.num_perm!r} and {self.seed!r}") from None
        if self.num_perm and self.num_perm != self.bands * self.rows:
            raise ScorerError(
                f"dedup: num_perm={self.num_perm} hash functions cannot make {self.bands} bands "
                f"of {self.rows} rows ({self.bands * self.rows} functions); set num_perm="
                f"{self.bands * self.rows}, or omit it, or change bands and rows to match")
        if self.seed < 0:
            raise ScorerError(f"dedup: seed must be >= 0, not {self.seed}")
        self._table = parse_repeat(str(self.repeat))

    # ------------------------------------------------------------------ the pieces, per document

    def bucket_keys(self, doc: Doc, hasher: MinHasher | None = None) -> list[tuple]:
        """The keys under which a document meets its duplicates."""
        scope = doc.domain if self.scope == "domain" else ""
        if self.method == "exact":
            digest = hashlib.sha256(normalise(doc.text).encode()).digest()
            return [(scope, -1, digest)]
        hasher = hasher or MinHasher(self.bands * self.rows, self.seed)
        sig = hasher.signature(shingle_hashes(doc.text, self.ngram))
        if sig is None:
            return []
        return [(scope, band, key) for band, key in band_keys(sig, self.bands, self.rows)]

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        scorer = self

        class _Buckets(beam.DoFn):
            def setup(self):
                self.hasher = (MinHasher(scorer.bands * scorer.rows, scorer.seed)
                               if scorer.method == "minhash" else None)

            def process(self, d):
                for key in scorer.bucket_keys(d, self.hasher):
                    yield key, (d.domain, d.index)

        clusters = (
            docs
            | "DedupBuckets" >> beam.ParDo(_Buckets())
            | "DedupGroupBuckets" >> beam.GroupByKey()
            | "DedupStarEdges" >> beam.FlatMap(lambda kv: star_edges(kv[1]))
            | "DedupDistinctEdges" >> beam.Distinct()
            | "DedupOneKey" >> beam.Map(lambda e: (None, e))
            | "DedupAllEdges" >> beam.GroupByKey()
            | "DedupComponents" >> beam.FlatMap(lambda kv: components(kv[1])))
        keyed = docs | "DedupKeyDocs" >> beam.Map(lambda d: ((d.domain, d.index), None))
        joined = ({"doc": keyed, "cluster": clusters}
                  | "DedupJoin" >> beam.CoGroupByKey())
        if self.scope == "global":
            ranks = beam.pvalue.AsList(docs | "DedupDomains" >> beam.Map(lambda d: d.domain)
                                       | "DedupDistinctDomains" >> beam.Distinct())
        else:
            ranks = beam.pvalue.AsList(docs | "DedupNoDomains" >> beam.FlatMap(lambda d: []))
        return joined | "DedupColumns" >> beam.FlatMap(
            lambda kv, domains: self._columns(kv, domains), ranks)

    def _columns(self, kv, domains):
        key, groups = kv
        if not list(groups["doc"]):
            return []
        found = list(groups["cluster"])
        root, size = found[0] if found else (key, 1)
        keep = root == key
        cols = {
            "dup_cluster": float(root[1]),
            "dup_cluster_size": float(size),
            "dup_keep": float(keep),
            "dup_repeat": float(repeat_weight(size, self._table) if keep else 0),
        }
        if self.scope == "global":
            cols["dup_cluster_domain"] = float(bisect.bisect_left(sorted(domains), root[0]))
        return [(key[0], key[1], cols)]

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict:
        tokens = np.asarray(tokens, np.int64)
        keep = np.asarray(columns["dup_keep"]) > 0.5
        size = np.asarray(columns["dup_cluster_size"])
        repeat = np.asarray(columns["dup_repeat"], np.float64)
        in_cluster = size > 1
        return {
            "domain": domain, "method": self.method, "scope": self.scope,
            **({"ngram": self.ngram, "bands": self.bands, "rows": self.rows,
                "lsh_threshold": round(lsh_threshold(self.bands, self.rows), 4)}
               if self.method == "minhash" else {}),
            "documents": len(tokens), "tokens": int(tokens.sum()),
            "in_clusters": {"documents": int(in_cluster.sum()),
                            "tokens": int(tokens[in_cluster].sum())},
            "clusters_kept_here": int((keep & in_cluster).sum()),
            "removed": {"documents": int((~keep).sum()), "tokens": int(tokens[~keep].sum())},
            "kept": {"documents": int(keep.sum()), "tokens": int(tokens[keep].sum())},
            "rehydrated": {"documents": float(repeat.sum()),
                           "tokens": float((repeat * tokens).sum())},
        }
