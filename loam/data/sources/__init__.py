"""Data sources: where a domain's documents come from.

``config.data.sources`` maps a domain name to a source, in order (domain ids follow that order).
A source is written ``kind:target`` or as a mapping ``{"source": "kind:target", **options}``::

    c.data.sources = {
        "web": "jsonl:/data/web/*.jsonl.zst",
        "papers": {"source": "parquet:gs://bucket/papers/*.parquet", "text_field": "body"},
        "code": "text:/src/repo/**/*.py",
        "books": {"source": "tfds:pg19:0.1.1", "split": "train", "feature": "book_text"},
    }

Kinds: ``bundled`` (the five bundled corpora), ``jsonl``, ``parquet``, ``text``
(``loam/data/sources/files.py``), ``tfds``, ``hf``, ``seqio`` (modules of the same names).
A kind module is imported only when a source of its kind is used, so reading JSON lines never
imports TensorFlow, pyarrow or ``datasets``. A kind module provides:

- ``units(source) -> list[Unit]``: the units of preparation work (a file, a row range, a shard),
  in a deterministic order; ``CorpusError`` if there are none;
- ``read_unit(unit[, stats]) -> Iterator[(doc_id, text)]``: every record of the unit, in order;
- optionally ``fingerprint(source) -> str``: changes when the source's data changes;
- optionally ``OPTIONS``: the option names it accepts (a set, or a mapping kind -> set when one
  module serves several kinds), and ``validate(source)``: checks the target and option values.

Options every kind accepts: ``validation`` -- ``"hash"`` (default: about 3% of the documents, by a
hash of their id, see ``loam.data.corpora.is_validation``) or another source (a spec string or
mapping) whose documents form the validation split, this source's all being train.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import re
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import Any

from loam.data import corpora
from loam.data.corpora import CorpusError

# kind -> module (a name inside this package, or a dotted module path).
_KIND_MODULES: dict[str, str] = {
    "bundled": "files",
    "jsonl": "files",
    "parquet": "files",
    "text": "files",
    "tfds": "tfds",
    "hf": "hf",
    "seqio": "seqio",
}
# Options every kind accepts (handled here, not by the kind module).
COMMON_OPTIONS = frozenset({"validation"})
SPLITS = ("train", "validation")
_DOMAIN_RE = re.compile(r"[^\s/:]+")
_FINGERPRINT_VERSION = "loam.sources/1"

__all__ = ["COMMON_OPTIONS", "CorpusError", "SPLITS", "Source", "Unit", "default_sources",
           "doc_split", "fingerprint", "from_config", "kinds", "parse", "read_documents",
           "read_unit", "register_kind", "units"]


def kinds() -> tuple[str, ...]:
    """The registered source kinds."""
    return tuple(_KIND_MODULES)


def register_kind(kind: str, module: str) -> None:
    """Registers `kind`, served by `module` (a dotted module path, imported when first used)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", kind):
        raise ValueError(f"source kind {kind!r}: use lower-case letters, digits and '_'")
    _KIND_MODULES[kind] = module
    _module.cache_clear()
    _takes_stats.cache_clear()


@functools.cache
def _module(kind: str) -> ModuleType:
    if kind not in _KIND_MODULES:
        raise CorpusError(f"unknown source kind {kind!r}; known kinds: {', '.join(_KIND_MODULES)} "
                          "(write a source as 'kind:target', e.g. 'jsonl:data/*.jsonl.gz')")
    name = _KIND_MODULES[kind]
    full = name if "." in name else f"{__name__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name != full:
            raise
        raise CorpusError(f"source kind {kind!r} is not available in this install "
                          f"(module {full} is missing)") from None


def _options_of(kind: str) -> frozenset[str]:
    opts = getattr(_module(kind), "OPTIONS", None)
    if isinstance(opts, Mapping):
        opts = opts.get(kind, ())
    return COMMON_OPTIONS | frozenset(opts or ())


# ---------------------------------------------------------------------------------------------
# Option values: JSON-able, stored frozen (hashable) and given back as plain JSON values.

class _FrozenMap(tuple):
    """A mapping option value, frozen: sorted (key, value) pairs."""


def _freeze(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        items = _items(value)
        for k, _ in items:
            if not isinstance(k, str):
                raise CorpusError(f"{where}: keys must be strings, got {k!r}")
        return _FrozenMap(sorted((k, _freeze(v, f"{where}.{k}")) for k, v in items))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v, f"{where}[{i}]") for i, v in enumerate(value))
    raise CorpusError(f"{where}: {type(value).__name__} is not a valid option value "
                      "(use strings, numbers, booleans, lists or mappings)")


def _thaw(value: Any) -> Any:
    if isinstance(value, _FrozenMap):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _items(mapping: Any) -> list[tuple[Any, Any]]:
    """(key, value) pairs in the mapping's own order (a ConfigDict's insertion order, which its
    keys() and to_dict() would sort)."""
    fields = getattr(mapping, "_fields", None)
    if isinstance(fields, Mapping):
        return [(k, mapping[k]) for k in fields]  # mapping[k] resolves FieldReferences
    return list(mapping.items())


ordered_items = _items


# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
    """One domain's source. Frozen and hashable; build it with `parse`."""

    domain: str
    kind: str
    target: str
    options: tuple[tuple[str, Any], ...] = ()   # sorted (key, value); lists frozen as tuples

    def option(self, key: str, default: Any = None) -> Any:
        """The option's value (lists and mappings as plain JSON values), else `default`."""
        for k, v in self.options:
            if k == key:
                return _thaw(v)
        return default

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.target}"

    def to_json(self) -> dict[str, Any]:
        """``{"source": "kind:target", **options}``; `parse(domain, source.to_json())` gives the
        source back."""
        return {"source": self.spec, **{k: _thaw(v) for k, v in self.options}}

    def describe(self) -> str:
        """Canonical one-line form (stable: options sorted), e.g.
        ``jsonl:data/*.jsonl.gz {"text_field": "body"}``."""
        if not self.options:
            return self.spec
        opts = json.dumps({k: _thaw(v) for k, v in self.options}, sort_keys=True,
                          ensure_ascii=False)
        return f"{self.spec} {opts}"

    def __str__(self) -> str:
        return f"{self.domain}={self.describe()}"


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of preparation work: a file, a group of files, a row range, a tfds shard ...

    `index` is its position in `units(source)` (the output shard number); `key` a stable
    description (e.g. the file's path relative to the glob's root). `split` None: each document
    goes to the split given by a hash of its id (`doc_split`); "train" or "validation": all of the
    unit's documents go there."""

    source: Source
    index: int
    key: str
    split: str | None = None


def _check_domain(domain: Any) -> str:
    if not isinstance(domain, str) or not _DOMAIN_RE.fullmatch(domain):
        raise CorpusError(f"domain name {domain!r} is invalid: use a non-empty name without "
                          "whitespace, '/' or ':' (e.g. 'web' or 'code_python')")
    return domain


def parse(domain: str, spec: str | Mapping[str, Any] | Source) -> Source:
    """The Source of `domain` from a spec: ``"kind:target"`` or a mapping with key ``source`` and
    options. Checks the domain name, the kind, the option names and (through the kind module)
    their values; raises CorpusError naming the problem and the fix."""
    _check_domain(domain)
    if isinstance(spec, Source):
        return dataclasses.replace(spec, domain=domain)
    where = f"source of domain {domain!r}"
    if isinstance(spec, str):
        text, raw_opts = spec, []
    elif isinstance(spec, Mapping) or hasattr(spec, "to_dict"):
        items = _items(spec)
        keys = [k for k, _ in items]
        if "source" not in keys:
            raise CorpusError(f"{where}: a mapping needs the key 'source' ('kind:target'); it has "
                              f"{', '.join(map(repr, keys)) or 'no keys'}")
        text = dict(items)["source"]
        raw_opts = [(k, v) for k, v in items if k != "source"]
    else:
        raise CorpusError(f"{where}: expected a string 'kind:target' or a mapping with key "
                          f"'source', got {type(spec).__name__}")
    if not isinstance(text, str) or ":" not in text:
        raise CorpusError(f"{where}: {text!r} is not 'kind:target'; kinds: "
                          f"{', '.join(_KIND_MODULES)} (e.g. 'jsonl:data/*.jsonl.gz')")
    kind, target = text.split(":", 1)
    kind = kind.strip()
    if kind not in _KIND_MODULES:
        raise CorpusError(f"{where}: unknown source kind {kind!r} in {text!r}; known kinds: "
                          f"{', '.join(_KIND_MODULES)}")
    if not target:
        raise CorpusError(f"{where}: {text!r} names no target after '{kind}:'")
    known = _options_of(kind)
    options = []
    for k, v in raw_opts:
        if not isinstance(k, str) or k not in known:
            raise CorpusError(f"{where}: unknown option {k!r} for a {kind} source; known options: "
                              f"{', '.join(sorted(known))}")
        options.append((k, _freeze(v, f"{where}: option {k!r}")))
    source = Source(domain, kind, target, tuple(sorted(options)))
    _validation_source(source)  # checks a validation spec
    validate = getattr(_module(kind), "validate", None)
    if validate is not None:
        validate(source)
    return source


def _validation_source(source: Source) -> Source | None:
    """The source of `source`'s validation split, if given by the ``validation`` option."""
    spec = source.option("validation", "hash")
    if spec == "hash":
        return None
    if not isinstance(spec, (str, Mapping)):
        raise CorpusError(f"source of domain {source.domain!r}: option 'validation' must be "
                          "'hash' or a source ('kind:target' or a mapping with key 'source')")
    val = parse(source.domain, spec)
    if val.option("validation", "hash") != "hash":
        raise CorpusError(f"source of domain {source.domain!r}: the validation source "
                          f"{val.describe()} cannot itself have a 'validation' option")
    return val


def _field(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping) or hasattr(obj, "to_dict"):
        return obj.get(key)
    return getattr(obj, key, None)


def default_sources() -> dict[str, Source]:
    """The five bundled corpora, in the order of `loam.data.corpora.DOMAIN_NAMES`."""
    return {name: parse(name, f"bundled:{name}") for name in corpora.DOMAIN_NAMES}


def from_config(config: Any) -> dict[str, Source]:
    """Domain name -> Source, in the order of ``config.data.sources`` (a mapping: ConfigDict or
    dict; or a list of (domain, spec) pairs). Absent or empty: the five bundled corpora in the
    order of `loam.data.corpora.DOMAIN_NAMES`, so configs written before sources existed keep
    their meaning. A non-empty ``config.data.dir`` is the ``data_dir`` of every bundled source
    that does not set its own."""
    data = _field(config, "data")
    raw = _field(data, "sources")
    data_dir = _field(data, "dir") or ""
    if not raw:
        items: list[tuple[Any, Any]] = [(n, f"bundled:{n}") for n in corpora.DOMAIN_NAMES]
    elif isinstance(raw, Mapping) or hasattr(raw, "to_dict"):
        items = _items(raw)
    elif isinstance(raw, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in raw):
        items = [(p[0], p[1]) for p in raw]
    else:
        raise CorpusError("config.data.sources must map domain names to sources, e.g. "
                          "{'web': 'jsonl:data/web/*.jsonl.gz'}; got "
                          f"{type(raw).__name__}")
    out: dict[str, Source] = {}
    for domain, spec in items:
        if domain in out:
            raise CorpusError(f"config.data.sources names domain {domain!r} twice")
        src = parse(domain, spec)
        if data_dir and src.kind == "bundled" and src.option("data_dir") is None:
            src = dataclasses.replace(
                src, options=tuple(sorted((*src.options, ("data_dir", str(data_dir))))))
        out[domain] = src
    return out


# ---------------------------------------------------------------------------------------------

def units(source: Source) -> list[Unit]:
    """The source's units in a deterministic order (`Unit.index` = position). With a
    ``validation`` source, this source's units (split "train") come first, then the validation
    source's (split "validation"). CorpusError if the source has no data."""
    val = _validation_source(source)
    found = list(_module(source.kind).units(source))
    if not found:
        raise CorpusError(f"source {source} has no data")
    if val is not None:
        val_units = list(_module(val.kind).units(val))
        if not val_units:
            raise CorpusError(f"validation source {val} of domain {source.domain!r} has no data")
        found = ([dataclasses.replace(u, split="train") for u in found]
                 + [dataclasses.replace(u, split="validation") for u in val_units])
    return [u if u.index == i else dataclasses.replace(u, index=i) for i, u in enumerate(found)]


@functools.cache
def _takes_stats(kind: str) -> bool:
    return "stats" in inspect.signature(_module(kind).read_unit).parameters


def read_unit(unit: Unit, stats: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every record of the unit, in order, empty texts included.

    `stats`, if given, is a dict the kind module fills while reading (at least ``records``: the
    records read; ``skipped_bad_lines``: lines or files skipped under ``skip_bad_lines``)."""
    kind = unit.source.kind
    if _takes_stats(kind):
        return _module(kind).read_unit(unit, stats=stats)
    return _count(_module(kind).read_unit(unit), stats)


def _count(docs: Iterator[tuple[str, str]], stats: dict[str, int] | None):
    if stats is None:
        yield from docs
        return
    stats.setdefault("records", 0)
    stats.setdefault("skipped_bad_lines", 0)
    for doc in docs:
        stats["records"] += 1
        yield doc


def fingerprint(source: Source) -> str:
    """A hex digest that changes when the source's data or options change (how a kind detects
    a change of its data: see its module's ``fingerprint``). The domain name is not part of it."""
    h = hashlib.sha256()
    h.update(f"{_FINGERPRINT_VERSION}\n{source.describe()}\n".encode())
    part = getattr(_module(source.kind), "fingerprint", None)
    if part is not None:
        h.update(str(part(source)).encode())
    val = _validation_source(source)
    if val is not None:
        h.update(b"\nvalidation\n" + fingerprint(val).encode())
    return h.hexdigest()


def doc_split(unit: Unit, doc_id: str) -> str:
    """The split ("train" or "validation") a document of `unit` belongs to."""
    if unit.split is not None:
        return unit.split
    return "validation" if corpora.is_validation(doc_id) else "train"


def read_documents(source: Source, split: str | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of all the source's units in order; with `split`, only that split's."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    for unit in units(source):
        if split is not None and unit.split is not None and unit.split != split:
            continue
        for doc_id, text in read_unit(unit):
            if split is None or doc_split(unit, doc_id) == split:
                yield doc_id, text
