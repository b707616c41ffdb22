"""A bundled domain's token arrays, by name: the prepared shards of ``bundled:<domain>`` with the
bundled tokenizer (``loam.data.prepare`` makes them on first use), read as whole splits.

For inspecting a domain in a notebook or a test. A run's own domains, sources and tokenizer are
in its catalog (``loam.run.build_catalog(config)``).

Per split (``train`` and ``validation``, by ``corpora.is_validation`` of the document id):
  tokens     [T]    every kept document's tokens followed by EOS, concatenated
  offsets    [N+1]  document i is tokens[offsets[i]:offsets[i+1]]
  doc_index  [N]    the document's position in the corpus file (its doc id in batches)
  doc_bytes  [N]    UTF-8 bytes of its text (for bits per byte)
"""

from __future__ import annotations

from loam.data import catalog as catalog_lib
from loam.data.shards import Split

SPLITS = ("train", "validation")
__all__ = ["SPLITS", "Split", "TokenizedDomain", "load"]


class TokenizedDomain:
    """One domain's train and validation splits."""

    def __init__(self, domain: str, data_dir=None):
        catalog = catalog_lib.default(data_dir)
        self.domain = catalog.check(domain)
        self.domain_id = catalog.domain_id(domain)
        self.prepared = catalog.prepared(domain)
        self.dropped_documents = self.prepared.dropped_documents
        self._splits = {s: self.prepared.split(s) for s in SPLITS}

    def split(self, name: str) -> Split:
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}")
        return self._splits[name]

    @property
    def train(self) -> Split:
        return self._splits["train"]

    @property
    def validation(self) -> Split:
        return self._splits["validation"]


def load(domain: str, data_dir=None) -> TokenizedDomain:
    return TokenizedDomain(domain, data_dir)
