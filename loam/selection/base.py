"""What a scorer is: a Beam transform from documents to per-document values.

Every scorer reads the documents of prepared domains as ``Doc`` records and returns, for each
document it scores, ``(domain, index, {column: value})``. ``loam.selection.pipeline`` runs it as
one Apache Beam pipeline over the sources (the DirectRunner here; Dataflow, Flink or Spark with
their own options) and writes the values as columns next to each prepared domain
(``loam.data.columns``), with a manifest naming the scorer, its parameters and the fingerprints
of its inputs. A scorer that looks at one document at a time subclasses ``PerDocument``; one
that needs the whole corpus (deduplication, DSIR's target statistics, ratings fitted from
judgments) implements ``expand`` with Beam's own transforms.

apache_beam is imported inside ``expand``, so defining or configuring a scorer never needs it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class Doc(NamedTuple):
    """One document of a prepared domain, as scorers see it."""
    domain: str
    # its global index in the prepared domain (shard base + record number); the name shadows
    # tuple.index, which scorers never call on a Doc
    index: int  # type: ignore[assignment]
    doc_id: str    # its id in the source
    split: str     # "train" or "validation"
    text: str
    tokens: int    # its length in the domain's tokenizer, EOS included


Scored = tuple[str, int, dict[str, float]]  # (domain, index, {column: value})


class ScorerError(ValueError):
    """A scorer's parameters or inputs are wrong; the message says how to fix it."""


class Scorer:
    """Base class. Subclasses set ``name`` and ``columns`` and implement ``expand`` (or
    ``score`` via ``PerDocument``); parameters are dataclass fields (they go into the manifest,
    and ``--param key=value`` on the command line sets them)."""

    name: str = ""
    columns: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        """The scorer's parameters, as written in the columns' manifest."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}

    def inputs(self) -> dict[str, str]:
        """Fingerprints of what the scorer reads besides the documents (a target set, a model
        checkpoint, a judgments file): a column whose inputs changed is stale."""
        return {}

    def check(self, catalog) -> None:
        """Bad parameters or inputs, found before any document is read: raise ScorerError."""

    def expand(self, docs):
        """PCollection[Doc] -> PCollection[Scored]."""
        raise NotImplementedError

    def report(self, domain: str, columns: Mapping[str, Any], tokens: Any) -> dict | None:
        """Optional summary of one domain's finished columns (numpy arrays over the domain's
        documents, ``tokens`` their lengths), printed by the scoring command and written beside
        the columns as ``{scorer}.report.json`` (e.g. documents and tokens each filter drops)."""
        return None


class PerDocument(Scorer):
    """A scorer that looks at one document at a time: implement ``score``."""

    def score(self, doc: Doc) -> dict[str, float]:
        raise NotImplementedError

    def expand(self, docs):
        import apache_beam as beam  # noqa: PLC0415

        return docs | f"Score_{self.name}" >> beam.Map(
            lambda d, s=self: (d.domain, d.index, s.score(d)))


SCORERS: dict[str, Callable[..., Scorer]] = {}


def register(cls):
    """Class decorator: makes a scorer available as ``--scorer NAME``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    SCORERS[cls.name] = cls
    return cls


def make(name: str, params: Mapping[str, Any] | None = None) -> Scorer:
    """The scorer registered as ``name`` with ``params``; one clear error for an unknown name or
    parameter."""
    importlib.import_module("loam.selection.scorers")  # registers the built-in scorers

    if name not in SCORERS:
        raise ScorerError(f"unknown scorer {name!r}; choose one of {sorted(SCORERS)}")
    cls = SCORERS[name]
    params = dict(params or {})
    if dataclasses.is_dataclass(cls):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ScorerError(f"scorer {name!r} has no parameter(s) {unknown}; its parameters "
                              f"are {sorted(known)}")
    elif params:
        raise ScorerError(f"scorer {name!r} takes no parameters (got {sorted(params)})")
    return cls(**params)
