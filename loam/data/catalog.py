"""A run's domains: its sources in config order, its tokenizer, and their prepared token shards.

The catalog is what the stream, the held-out sets, the recipes and the evaluator ask for data;
none of them knows where text came from. Domain ids are positions in ``config.data.sources``
(the model's per-domain loss vectors have one entry per source), so two runs with the same
sources agree on every id. Each domain is prepared once (``loam.data.prepare``): a small source
in-process on first use, a large one by the Beam pipeline, whose command the error names.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from loam.data import corpora, prepare
from loam.data import sources as sources_lib
from loam.data import vocab as vocab_lib
from loam.data.shards import PreparedDomain


def _prepared_root(prepared_dir=None) -> str:
    """Where prepared domains live: the config's data.prepared_dir, else $LOAM_CACHE_DIR/prepared,
    else ~/.cache/loam/prepared (read when a catalog is made: part of its cache key)."""
    if prepared_dir:
        return str(prepared_dir)
    env = os.environ.get("LOAM_CACHE_DIR")
    return str(Path(env) / "prepared" if env else Path.home() / ".cache" / "loam" / "prepared")


class Catalog:
    """The ordered sources of a run, their tokenizer and (lazily) their prepared domains."""

    def __init__(self, sources: Mapping[str, sources_lib.Source], tokenizer: str = "bundled",
                 prepared_dir=None):
        if not sources:
            raise corpora.CorpusError("config.data.sources is empty; name at least one source, "
                                      "e.g. {'web': 'jsonl:/data/web/*.jsonl.gz'}")
        self.sources = dict(sources)
        self.names: list[str] = list(self.sources)
        self.tokenizer_spec = tokenizer or "bundled"
        self.root = _prepared_root(prepared_dir)
        self._prepared: dict[str, PreparedDomain] = {}

    @functools.cached_property
    def tokenizer(self) -> vocab_lib.Tokenizer:
        return vocab_lib.get_tokenizer(self.tokenizer_spec)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def __len__(self) -> int:
        return len(self.names)

    def check(self, name: str) -> str:
        """``name`` if it is one of the sources, else one clear error with the fix."""
        if name in self.sources:
            return name
        hint = difflib.get_close_matches(str(name), self.names, n=1)
        fix = f"; did you mean {hint[0]!r}?" if hint else ""
        if "." in str(name):  # a seqio task name given where a domain goes
            fix += (f". To train on the seqio task {name!r}, add it as a source under a domain "
                    f"name of your choice: config.data.sources = {{'mydomain': 'seqio:{name}'}}")
        raise corpora.CorpusError(
            f"unknown domain {name!r}: the run's domains are the keys of config.data.sources "
            f"({', '.join(self.names)}){fix}")

    def domain_id(self, name: str) -> int:
        return self.names.index(self.check(name))

    def source(self, name: str) -> sources_lib.Source:
        return self.sources[self.check(name)]

    def prepared(self, name: str) -> PreparedDomain:
        """The domain's prepared shards (prepared in-process now if the source is small)."""
        name = self.check(name)
        if name not in self._prepared:
            self._prepared[name] = prepare.ensure_prepared(
                self.sources[name], self.tokenizer, self.root)
        return self._prepared[name]

    def split(self, name: str, split: str):
        return self.prepared(name).split(split)

    def blocks(self, name: str, split: str, max_tokens: int):
        return self.prepared(name).blocks(split, max_tokens)

    def num_tokens(self, name: str, split: str = "train") -> int:
        return int(self.prepared(name).num_tokens(split))

    def fingerprints(self, names: Sequence[str] | None = None) -> dict[str, str]:
        """What the data of each domain is made of (its source's files and options, and the
        tokenizer): saved with a run's data position, so a resume over changed data is refused."""
        out = {}
        for n in names or self.names:
            p = self.prepared(n)
            out[n] = f"{p.source_fingerprint[:16]}/{p.tokenizer_fingerprint[:16]}"
        return out

    def describe(self) -> dict[str, str]:
        return {n: s.describe() for n, s in self.sources.items()}


@functools.lru_cache(maxsize=16)
def _cached(sources: tuple[sources_lib.Source, ...], tokenizer: str, prepared_dir: str | None,
            data_dir_env: str | None) -> Catalog:
    del data_dir_env  # part of the key only: bundled sources read $LOAM_DATA_DIR
    return Catalog({s.domain: s for s in sources}, tokenizer, prepared_dir)


def default_specs() -> dict[str, str]:
    """The five bundled domains, in their fixed order: what a config without sources means."""
    return {name: f"bundled:{name}" for name in corpora.DOMAIN_NAMES}


def for_config(config) -> Catalog:
    """The catalog of a run config (shared within the process). Domain ids follow the order in
    which ``config.data.sources`` was written."""
    data = config.data
    parsed = sources_lib.from_config(config)
    return _cached(tuple(parsed.values()), data.get("tokenizer") or "bundled",
                   _prepared_root(data.get("prepared_dir") or None),
                   os.environ.get("LOAM_DATA_DIR"))


def default(data_dir=None) -> Catalog:
    """The bundled five (read from ``data_dir``, $LOAM_DATA_DIR or the bundled slices)."""
    parsed = {n: sources_lib.parse(n, {"source": spec, "data_dir": str(data_dir)} if data_dir
                                   else spec) for n, spec in default_specs().items()}
    return _cached(tuple(parsed.values()), "bundled", _prepared_root(None),
                   os.environ.get("LOAM_DATA_DIR"))


def mixture_domains(config) -> list[str]:
    """The domains a run trains on, in order: ``config.data.domains``, or every source when it
    is empty."""
    listed = list(config.data.get("domains") or [])
    return listed or list(sources_lib.from_config(config))
