"""The scoring pipeline: a scorer over the documents of prepared domains, on Apache Beam.

    Create(units) | Reshuffle | FlatMap(read_unit -> Doc) | scorer.expand
        | (domain, (index, values)) | GroupByKey(domain) | Map(write columns)

Each unit of a domain's source (a file, a row range ...) is read by one worker, in record order;
a record's global index is its shard's base in the prepared manifest plus its record number, its
split and length in tokens come from the prepared shards, and the records preparation dropped
(empty texts) are skipped. A domain's values are written as columns (``loam.data.columns``) only
when all of them are in, so a failed run leaves the columns it would replace as they were.

The DirectRunner runs ``num_workers`` local processes; other runners (Dataflow, Flink, Spark)
take their own options, as preparation does (``loam.data.prepare.pipeline_options``).
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from loam.data import columns as columns_lib
from loam.data import prepare, shards
from loam.data import sources as sources_lib
from loam.selection.base import Doc, Scorer, ScorerError


class _ReadUnit:
    """DoFn body: (domain, unit, prepared path) -> the unit's kept documents as ``Doc``s."""

    def __init__(self):
        self._prepared: dict[str, shards.PreparedDomain] = {}

    def prepared(self, path: str) -> shards.PreparedDomain:
        if path not in self._prepared:
            self._prepared[path] = shards.open_prepared(path)
        return self._prepared[path]

    def __call__(self, element):
        domain, unit, path = element
        p = self.prepared(path)
        i = int(unit.index)
        kept: dict[int, tuple[str, int]] = {}
        for split in shards.SPLITS:
            if p.shard_counts(i, split)["documents"] == 0:
                continue
            records = np.asarray(p.shard_array(i, split, "doc_index"))
            lengths = np.diff(np.asarray(p.shard_array(i, split, "offsets")))
            kept.update(zip(records.tolist(), zip([split] * len(records), lengths.tolist())))
        base = p.shard_base(i)
        for record, (doc_id, text) in enumerate(sources_lib.read_unit(unit)):
            if record in kept:
                split, tokens = kept[record]
                yield Doc(domain, base + record, doc_id, split, text, int(tokens))


class _WriteDomain:
    """DoFn body: (domain, [(index, values)]) -> the domain's columns, manifest and report,
    and a note for the driver in ``report_dir``."""

    def __init__(self, scorer: Scorer, paths: dict[str, str], report_dir: str):
        self.scorer, self.paths, self.report_dir = scorer, paths, report_dir

    def __call__(self, element):
        domain, scored = element
        try:
            note = {"ok": True, **self.write(domain, scored)}
        except (ValueError, OSError) as e:
            note = {"ok": False, "error": f"domain {domain!r}: {e}"}
        prepare._write_atomic(prepare._join(self.report_dir, f"{domain}.json"),
                              prepare._dumps(note))
        return domain

    def write(self, domain: str, scored) -> dict:
        p = shards.open_prepared(self.paths[domain])
        records = int(p.manifest["records"])
        names = list(dict.fromkeys(self.scorer.columns))
        values: dict[str, np.ndarray] = {c: np.full(records, np.nan, np.float32) for c in names}
        seen = np.zeros(records, bool)
        for index, cols in scored:
            if not 0 <= index < records:
                raise ScorerError(f"scorer {self.scorer.name!r} scored document {index}, outside "
                                  f"the domain's {records} records")
            if seen[index]:
                raise ScorerError(f"scorer {self.scorer.name!r} gave document {index} two sets "
                                  "of values; give one per document")
            seen[index] = True
            for c, v in cols.items():
                if c not in values:
                    values[c] = np.full(records, np.nan, np.float32)
                values[c][index] = v
        tokens = columns_lib.doc_tokens(p)
        report = self.scorer.report(domain, values, tokens)
        manifest = columns_lib.write(p, self.scorer.name, self.scorer.params(),
                                     self.scorer.inputs(), values, report)
        return {"manifest": manifest, "report": report}


def score(scorer: Scorer, catalog, domains: Sequence[str] | None = None, *,
          runner: str = "DirectRunner", num_workers: int | None = None,
          beam_args: Iterable[str] = ()) -> dict[str, dict]:
    """Scores ``domains`` (default: every source of the catalog) with one Beam pipeline and
    writes their columns; returns {domain: {"manifest": ..., "report": ...}}. ScorerError for
    bad parameters (before any document is read) and for the domains whose columns could not
    be written (the others keep theirs)."""
    domains = [catalog.check(d) for d in (domains or catalog.names)]
    if not domains:
        raise ScorerError("no domains to score")
    scorer.check(catalog)
    beam = prepare._import_beam()
    paths, elements = {}, []
    for d in domains:
        p = catalog.prepared(d)
        paths[d] = p.origin
        for unit in sources_lib.units(catalog.source(d)):
            elements.append((d, unit, p.origin))
    report_dir = prepare._join(catalog.root, f".score-{uuid.uuid4().hex[:12]}")
    try:
        with beam.Pipeline(options=prepare.pipeline_options(runner, num_workers,
                                                            beam_args)) as pipe:
            docs = (pipe
                    | "Units" >> beam.Create(elements, reshuffle=False)
                    | "Spread" >> beam.Reshuffle()
                    | "Read" >> beam.FlatMap(_ReadUnit()))
            _ = (scorer.expand(docs)
                 | "Key" >> beam.Map(lambda s: (s[0], (int(s[1]), dict(s[2]))))
                 | "ByDomain" >> beam.GroupByKey()
                 | "Write" >> beam.Map(_WriteDomain(scorer, paths, report_dir)))
        out, errors = {}, []
        for d in domains:
            note = shards.read_json(prepare._join(report_dir, f"{d}.json"))
            if note is None:  # the scorer gave no document of the domain a value
                note = {"ok": True, **_WriteDomain(scorer, paths, report_dir).write(d, [])}
            if note["ok"]:
                out[d] = {"manifest": note["manifest"], "report": note["report"]}
            else:
                errors.append(note["error"])
        if errors:
            raise ScorerError("; ".join(errors))
        return out
    finally:
        if shards.is_url(report_dir):
            fs, inner = shards.filesystem(report_dir)
            if fs.exists(inner):
                fs.rm(inner, recursive=True)
        else:
            shutil.rmtree(report_dir, ignore_errors=True)


def summary_lines(scorer: Scorer, results: dict[str, dict]) -> list[str]:
    """Per domain: documents scored per column and their mean; then each report."""
    lines = []
    for d, r in results.items():
        m = r["manifest"]
        cols = ", ".join(f"{c} mean {m['mean'][c]:.4g} ({m['scored'][c]}/{m['documents']} "
                         "scored)" for c in m["columns"])
        lines.append(f"{d:12s} {scorer.name}: {cols}")
        if r["report"] is not None:
            lines.append(f"{d:12s} report: {json.dumps(r['report'], sort_keys=True)}")
    return lines
