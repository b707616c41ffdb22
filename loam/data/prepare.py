"""Preparation: sources -> tokenized shards, on Apache Beam.

    python -m loam.data.prepare --config FILE[:ARG] [--num_workers N] [--prepared_dir DIR]
    python -m loam.data.prepare --config FILE --runner DataflowRunner --project P \\
        --region R --temp_location gs://B/tmp --prepared_dir gs://B/prepared [Beam options ...]

Each configured source (``config.data.sources``) is cut into units (``loam.data.sources.units``:
a file, a row range ...); each unit becomes one shard of token arrays (``loam.data.shards``
describes the format), then a domain's manifest records its shards' counts. The pipeline::

    Create(units) | Reshuffle | ParDo(prepare_unit) | GroupByKey(domain) | ParDo(finalize)

runs on the DirectRunner with N local worker processes by default, and unchanged on Dataflow,
Flink or Spark with ``--runner`` and that runner's usual options (any flag this command does not
define is passed to Beam: ``--project``, ``--region``, ``--temp_location``, ``--flink_master``,
``--setup_file`` ...). Workers must see the prepared directory (a bucket, or a shared disk) and
have loam installed (e.g. ``--setup_file ./setup.py`` or a custom container).

Properties:
- memory is bounded by a batch of documents (``BATCH_BYTES`` of text), not by the unit or the
  corpus: documents are tokenized a batch at a time and their arrays streamed to files;
- a shard depends only on its unit and the tokenizer, so the bytes written are the same whatever
  the number of workers or the runner;
- a shard is written to a temporary directory, with ``shard.json`` last, then renamed into place:
  a shard directory holding ``shard.json`` is complete and kept by a later run, anything else is
  redone (on an object store, where there is no rename, the arrays are written in place and
  ``shard.json`` last); temporary directories of an interrupted run are removed at the end;
- the manifest is written last, after the checks of the whole domain: duplicate document ids
  and a domain left without training documents are errors naming the fix.

The trainer calls ``ensure_prepared`` (no Beam): a small source missing its shards is prepared
in-process, with the same functions and so the same bytes; a large one gets an error naming this
command.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loam import cli
from loam.data import shards as shards_lib
from loam.data import sources as sources_lib
from loam.data import vocab as vocab_lib
from loam.data.corpora import CorpusError
from loam.data.shards import ARRAYS, MANIFEST, SHARD_META, SPLITS, PreparedDomain

log = logging.getLogger(__name__)

FORMAT_VERSION = shards_lib.FORMAT_VERSION
# Text tokenized per call of the tokenizer (and held in memory at once).
BATCH_BYTES = 4 << 20
BATCH_DOCUMENTS = 8192
# The trainer prepares a source by itself up to this size; beyond, it names the command.
AUTO_MAX_BYTES = 200 << 20
# Memory of the duplicate-id check: document id hashes held at once (8 bytes each).
DUPLICATE_CHECK_BYTES = 256 << 20
COMMAND = "python -m loam.data.prepare --config FILE"
_TMP = ".tmp-"


def default_root() -> str:
    """$LOAM_CACHE_DIR/prepared, else ~/.cache/loam/prepared."""
    return str(shards_lib.cache_dir() / "prepared")


def prepared_key(source_fingerprint: str, tokenizer_fingerprint: str) -> str:
    blob = json.dumps([FORMAT_VERSION, source_fingerprint, tokenizer_fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepared_path(source: sources_lib.Source, tokenizer, root) -> str:
    """``<root>/<domain>-<key>``, the key a hash of the format, the source's fingerprint and the
    tokenizer's: a changed source or another tokenizer never finds the old shards."""
    return _prepared_path(source, tokenizer, root, sources_lib.fingerprint(source))


def _prepared_path(source, tokenizer, root, source_fingerprint: str) -> str:
    key = prepared_key(source_fingerprint, tokenizer.fingerprint)
    return _join(root, f"{source.domain}-{key}")


# ---------------------------------------------------------------------------------- paths

def _join(root, *parts: str) -> str:
    text = os.fspath(root) if not isinstance(root, str) else root
    if shards_lib.is_url(text):
        return "/".join([text.rstrip("/"), *parts])
    return str(Path(shards_lib.local_path(text), *parts))


def _exists(path: str) -> bool:
    if shards_lib.is_url(path):
        fs, inner = shards_lib.filesystem(path)
        return bool(fs.exists(inner))
    return os.path.exists(path)


def _write_atomic(path: str, data: bytes) -> None:
    """Whole or not at all: a local file through a temporary file and a rename; an object on
    a store, which is written whole by one put."""
    if shards_lib.is_url(path):
        fs, inner = shards_lib.filesystem(path)
        fs.pipe_file(inner, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}{_TMP}", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode()


# ---------------------------------------------------------------------------------- one unit

def _doc_hashes(doc_ids: list[str]) -> np.ndarray:
    return np.frombuffer(b"".join(hashlib.sha256(d.encode()).digest()[:8] for d in doc_ids),
                         "<u8")


class _SplitWriter:
    """Streams one split's arrays of a shard to files."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype):
        self.dtype = dtype
        self.files = {a: open(directory / f"{split}.{a}", "wb") for a in ARRAYS}
        self.documents = 0
        self.tokens = 0
        self.files["offsets"].write(np.zeros(1, "<i8").tobytes())

    def add(self, ids: list[list[int]], records: list[int], nbytes: list[int],
            hashes: np.ndarray, eos: int) -> None:
        if not ids:
            return
        for doc in ids:
            doc.append(eos)
        lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
        total = int(lengths.sum())
        tokens = np.fromiter(itertools.chain.from_iterable(ids), self.dtype, count=total)
        self.files["tokens"].write(tokens.tobytes())
        self.files["offsets"].write((self.tokens + np.cumsum(lengths)).astype("<i8").tobytes())
        self.files["doc_index"].write(np.asarray(records, "<i8").tobytes())
        self.files["doc_bytes"].write(np.asarray(nbytes, "<i8").tobytes())
        self.files["doc_hash"].write(hashes.astype("<u8").tobytes())
        self.documents += len(ids)
        self.tokens += total

    def close(self) -> dict[str, int]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        return {"documents": self.documents, "tokens": self.tokens}


def _write_shard(unit: sources_lib.Unit, tokenizer, directory: Path) -> dict:
    """Reads, tokenizes and writes the unit's documents into `directory`; returns shard.json."""
    vocab_size = int(tokenizer.vocab_size)
    dtype = shards_lib.token_dtype(vocab_size)
    eos = int(tokenizer.eos_id)
    writers = {s: _SplitWriter(directory, s, dtype) for s in SPLITS}
    stats: dict[str, int] = {}
    dropped = 0
    records = 0
    batch: list[tuple[int, str, str]] = []
    batch_bytes = 0

    def flush():
        ids = tokenizer.encode([t for _, _, t in batch])
        picks: dict[str, list[int]] = {s: [] for s in SPLITS}
        for k, (_, doc_id, _) in enumerate(batch):
            picks[sources_lib.doc_split(unit, doc_id)].append(k)
        for split, pick in picks.items():
            if pick:
                writers[split].add([ids[k] for k in pick], [batch[k][0] for k in pick],
                                   [len(batch[k][2].encode()) for k in pick],
                                   _doc_hashes([batch[k][1] for k in pick]), eos)
        batch.clear()

    try:
        for record, (doc_id, text) in enumerate(sources_lib.read_unit(unit, stats)):
            records = record + 1
            if not text.strip():
                dropped += 1
                continue
            batch.append((record, doc_id, text))
            batch_bytes += len(text)
            if batch_bytes >= BATCH_BYTES or len(batch) >= BATCH_DOCUMENTS:
                flush()
                batch_bytes = 0
        if batch:
            flush()
        counts = {s: w.close() for s, w in writers.items()}
    finally:
        for w in writers.values():
            for f in w.files.values():
                f.close()
    meta = {"format": FORMAT_VERSION, "index": unit.index, "key": unit.key, "split": unit.split,
            "records": records, "dropped_empty": dropped,
            "skipped_bad_lines": int(stats.get("skipped_bad_lines", 0)),
            "dtype": dtype.name, "splits": counts}
    with open(directory / SHARD_META, "wb") as f:
        f.write(_dumps(meta))
        f.flush()
        os.fsync(f.fileno())
    if dropped:
        log.info("%s: %s: dropped %d of %d documents that are empty after stripping",
                 unit.source.domain, unit.key, dropped, records)
    return meta


def _complete_shard(final: str, unit: sources_lib.Unit) -> dict | None:
    meta = shards_lib.read_json(_join(final, SHARD_META))
    if meta is None:
        return None
    if meta.get("format") != FORMAT_VERSION or meta.get("index") != unit.index \
            or meta.get("key") != unit.key:
        raise CorpusError(f"{final} holds shard {meta.get('index')} ({meta.get('key')!r}), not "
                          f"unit {unit.index} ({unit.key!r}) of {unit.source}; delete "
                          f"{os.path.dirname(os.path.dirname(final))} and prepare again")
    return meta


def prepare_unit(unit: sources_lib.Unit, tokenizer, domain_dir) -> dict:
    """Writes the unit's shard into ``<domain_dir>/shards/<index>`` (see the module docstring);
    returns its shard.json. A complete shard is kept as it is."""
    final = _join(domain_dir, "shards", shards_lib.shard_name(unit.index))
    meta = _complete_shard(final, unit)
    if meta is not None:
        return meta
    if shards_lib.is_url(final):
        return _prepare_unit_remote(unit, tokenizer, final)
    parent = Path(final).parent
    parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(final):  # a shard without shard.json: never trusted, redone
        shutil.rmtree(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{Path(final).name}{_TMP}", dir=parent))
    try:
        meta = _write_shard(unit, tokenizer, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            done = _complete_shard(final, unit)  # another worker finished it first
            if done is None:
                raise
            return done
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _prepare_unit_remote(unit: sources_lib.Unit, tokenizer, final: str) -> dict:
    fs, inner = shards_lib.filesystem(final)
    with tempfile.TemporaryDirectory(prefix="loam-shard-") as tmp:
        meta = _write_shard(unit, tokenizer, Path(tmp))
        fs.makedirs(inner, exist_ok=True)
        for split in SPLITS:  # identical bytes whoever writes them: overwriting is safe
            for a in ARRAYS:
                fs.put_file(os.path.join(tmp, f"{split}.{a}"), f"{inner}/{split}.{a}")
        fs.put_file(os.path.join(tmp, SHARD_META), f"{inner}/{SHARD_META}")
    return meta


# ---------------------------------------------------------------------------------- one domain

def _read_array(domain_dir: str, index: int, split: str, name: str, dtype) -> np.ndarray:
    path = _join(domain_dir, "shards", shards_lib.shard_name(index), f"{split}.{name}")
    if shards_lib.is_url(path):
        fs, inner = shards_lib.filesystem(path)
        return np.frombuffer(fs.cat_file(inner), dtype)
    if os.path.getsize(path) == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _doc_ids_at(unit: sources_lib.Unit, records: set[int]) -> dict[int, str]:
    found: dict[int, str] = {}
    for record, (doc_id, _) in enumerate(sources_lib.read_unit(unit)):
        if record in records:
            found[record] = doc_id
            if len(found) == len(records):
                break
    return found


def _check_duplicates(source, domain_dir: str, metas: list[dict],
                      units: Mapping[int, sources_lib.Unit]) -> None:
    """CorpusError naming two documents of the domain with the same id. Hashes (8 bytes of
    sha256 of the id) are compared a bucket at a time, so memory stays bounded; a hash match is
    confirmed on the ids themselves (re-read from the two units) before it is reported."""
    total = sum(m["splits"][s]["documents"] for m in metas for s in SPLITS)
    buckets = max(1, math.ceil(total * 8 / DUPLICATE_CHECK_BYTES))
    u8 = np.dtype("<u8")
    for bucket in range(buckets):
        parts = []
        for m in metas:
            for s in SPLITS:
                if m["splits"][s]["documents"]:
                    h = _read_array(domain_dir, m["index"], s, "doc_hash", u8)
                    parts.append(h[h % buckets == bucket] if buckets > 1 else np.asarray(h))
        if not parts:
            continue
        hashes = np.sort(np.concatenate(parts))
        for value in np.unique(hashes[1:][hashes[1:] == hashes[:-1]]):
            _report_duplicate(source, domain_dir, metas, units, value)


def _report_duplicate(source, domain_dir, metas, units, value) -> None:
    where: list[tuple[int, int]] = []  # (shard, record)
    for m in metas:
        for s in SPLITS:
            if m["splits"][s]["documents"]:
                h = _read_array(domain_dir, m["index"], s, "doc_hash", np.dtype("<u8"))
                for k in np.flatnonzero(h == value):
                    rec = _read_array(domain_dir, m["index"], s, "doc_index", np.dtype("<i8"))
                    where.append((m["index"], int(rec[k])))
    ids: dict[tuple[int, int], str] = {}
    for shard in sorted({w[0] for w in where}):
        recs = {r for s, r in where if s == shard}
        for r, d in _doc_ids_at(units[shard], recs).items():
            ids[(shard, r)] = d
    by_id: dict[str, list[tuple[int, int]]] = {}
    for w in sorted(where):
        by_id.setdefault(ids.get(w, f"?{w}"), []).append(w)
    for doc_id, places in by_id.items():
        if len(places) < 2:
            continue  # 64-bit hashes of different ids: not a duplicate
        (s1, r1), (s2, r2) = places[:2]
        more = f" (and {len(places) - 2} more times)" if len(places) > 2 else ""
        raise CorpusError(
            f"domain {source.domain!r}: document id {doc_id!r} appears twice{more}: record "
            f"{r1 + 1} of {units[s1].key} (shard {shards_lib.shard_name(s1)}) and record "
            f"{r2 + 1} of {units[s2].key} (shard {shards_lib.shard_name(s2)}); document ids "
            "must be unique "
            "within a domain (they key the validation split, scores and selections): remove "
            "the duplicates from the source, or set the source option id_field to a unique "
            "field (a JSON-lines or Parquet source without an id field numbers its records)")


def finalize_domain(source: sources_lib.Source, tokenizer, domain_dir,
                    metas: Iterable[dict], units: Iterable[sources_lib.Unit],
                    source_fingerprint: str | None = None) -> dict:
    """Checks the domain's complete set of shards and writes its manifest (last, atomically);
    returns the manifest. `source_fingerprint`: the one the preparation started from (that
    names its directory); a source changed since is an error."""
    domain_dir = os.fspath(domain_dir) if not isinstance(domain_dir, str) else domain_dir
    metas = sorted(metas, key=lambda m: m["index"])
    by_index = {u.index: u for u in units}
    if [m["index"] for m in metas] != sorted(by_index):
        missing = sorted(set(by_index) - {m["index"] for m in metas})
        raise CorpusError(f"domain {source.domain!r}: shards {missing[:5]} were not prepared; "
                          f"run `{COMMAND}` again to complete them")
    base = 0
    shard_entries = []
    for m in metas:
        shard_entries.append({"index": m["index"], "key": m["key"], "split": m["split"],
                              "base": base, "records": m["records"],
                              "dropped_empty": m["dropped_empty"],
                              "skipped_bad_lines": m["skipped_bad_lines"],
                              "splits": m["splits"]})
        base += int(m["records"])
    totals = {s: {k: sum(int(m["splits"][s][k]) for m in metas) for k in ("documents", "tokens")}
              for s in SPLITS}
    records = base
    dropped = sum(int(m["dropped_empty"]) for m in metas)
    skipped = sum(int(m["skipped_bad_lines"]) for m in metas)
    if totals["train"]["documents"] == 0:
        kept = records - dropped
        if records == 0:
            why = "holds no documents" + (f" ({skipped} bad lines skipped)" if skipped else "")
        elif kept == 0:
            why = f"holds {records} documents, all empty (only whitespace)"
        else:
            why = (f"has {kept} non-empty documents, none in the training split (about 3% of "
                   "the documents, by a hash of their id, go to validation)")
        raise CorpusError(f"domain {source.domain!r}: source {source.describe()} {why}; give it "
                          "more documents, or drop the domain from config.data.sources")
    _check_duplicates(source, domain_dir, metas, by_index)
    fingerprint = sources_lib.fingerprint(source)
    if source_fingerprint is not None and fingerprint != source_fingerprint:
        raise CorpusError(f"domain {source.domain!r}: source {source.describe()} changed while "
                          f"it was being prepared; run `{COMMAND}` again once it is complete")
    manifest = {
        "format": FORMAT_VERSION, "domain": source.domain,
        "source": source.describe(), "source_spec": source.to_json(),
        "source_fingerprint": fingerprint,
        "tokenizer": tokenizer.spec, "tokenizer_fingerprint": tokenizer.fingerprint,
        "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id),
        "dtype": shards_lib.token_dtype(int(tokenizer.vocab_size)).name,
        "records": records, "dropped_empty": dropped, "skipped_bad_lines": skipped,
        "splits": totals, "shards": shard_entries}
    _write_atomic(_join(domain_dir, MANIFEST), _dumps(manifest))
    _remove_temporaries(domain_dir)
    if dropped:
        log.warning("domain %s: dropped %d of %d documents that are empty after stripping",
                    source.domain, dropped, records)
    return manifest


def _remove_temporaries(domain_dir: str) -> None:
    if shards_lib.is_url(domain_dir):
        return
    directory = Path(domain_dir) / "shards"
    for p in directory.glob(f".*{_TMP}*"):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------- opening

def _stale(what: str, manifest: dict, source, tokenizer, source_fp: str) -> str | None:
    if manifest.get("domain") != source.domain:
        return f"{what} holds domain {manifest.get('domain')!r}, not {source.domain!r}"
    if manifest.get("source_fingerprint") != source_fp:
        return (f"{what} was prepared from {manifest.get('source')!r} as it was then; the "
                f"source {source.describe()} has changed since (or is another one)")
    if manifest.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        return (f"{what} was prepared with the tokenizer {manifest.get('tokenizer')!r} "
                f"(fingerprint {str(manifest.get('tokenizer_fingerprint'))[:12]}), not with "
                f"{tokenizer.spec!r} (fingerprint {tokenizer.fingerprint[:12]})")
    return None


def open_prepared(path, source: sources_lib.Source | None = None, tokenizer=None, *,
                  source_fingerprint: str | None = None) -> PreparedDomain:
    """The prepared domain at `path` (its directory or its manifest.json). With `source` and
    `tokenizer`, CorpusError unless it was prepared from exactly them."""
    domain = shards_lib.open_prepared(path)
    if source is not None and tokenizer is not None:
        problem = _stale(str(path), domain.manifest, source, tokenizer,
                         source_fingerprint or sources_lib.fingerprint(source))
        if problem:
            raise CorpusError(f"{problem}; prepare it again with `{COMMAND}` and point "
                              "config.data.prepared_dir at the new preparation (or at the "
                              "directory holding the preparations)")
    return domain


def _explicit(root) -> str | None:
    """`root` itself if it is one prepared domain (a directory with a manifest, or a
    manifest), else None: then it is the directory holding preparations."""
    text = os.fspath(root) if not isinstance(root, str) else root
    if text.rstrip("/").endswith(MANIFEST):
        return text
    return text if _exists(_join(text, MANIFEST)) else None


def source_bytes(source: sources_lib.Source) -> int | None:
    """Bytes of the source's files (None when the kind does not tell)."""
    size = getattr(sources_lib, "size_bytes", None)
    if size is not None:
        return size(source)
    total, known = 0, False
    for unit in sources_lib.units(source):
        for path, _ in getattr(unit, "files", ()):
            known = True
            if shards_lib.is_url(path):
                fs, inner = shards_lib.filesystem(path)
                total += int(fs.size(inner) or 0)
            else:
                total += os.path.getsize(path)
    return total if known else None


def ensure_prepared(source: sources_lib.Source, tokenizer, root=None, *,
                    auto_max_bytes: int = AUTO_MAX_BYTES) -> PreparedDomain:
    """The source's prepared domain for the trainer: opened if complete; prepared here and now
    (in this process, no Beam, the same bytes) if missing and at most `auto_max_bytes` of
    source; otherwise CorpusError naming the prepare command. `root` may also be one prepared
    domain (config.data.prepared_dir pointing at it): used only if made from this very source
    and tokenizer."""
    root = default_root() if root is None else root
    explicit = _explicit(root)
    if explicit is not None:
        return open_prepared(explicit, source, tokenizer)
    fingerprint = sources_lib.fingerprint(source)
    path = _prepared_path(source, tokenizer, root, fingerprint)
    if _exists(_join(path, MANIFEST)):
        return open_prepared(path, source, tokenizer, source_fingerprint=fingerprint)
    size = source_bytes(source)
    if size is not None and size > auto_max_bytes:
        raise CorpusError(
            f"domain {source.domain!r}: source {source.describe()} is not prepared yet and holds "
            f"{size / 1e6:,.0f} MB, more than the {auto_max_bytes / 1e6:,.0f} MB a run prepares "
            f"by itself; prepare it first with `{COMMAND}` (the run's config; Beam, one process "
            "per core, or --runner DataflowRunner/FlinkRunner/SparkRunner), then start the run"
            f"{_other_preparations(root, source)}")
    units = sources_lib.units(source)
    metas = [prepare_unit(u, tokenizer, path) for u in units]
    finalize_domain(source, tokenizer, path, metas, units, fingerprint)
    return shards_lib.open_prepared(path)


def _other_preparations(root, source) -> str:
    text = os.fspath(root) if not isinstance(root, str) else root
    if shards_lib.is_url(text) or not os.path.isdir(text):
        return ""
    others = sorted(p.name for p in Path(text).glob(f"{source.domain}-*")
                    if (p / MANIFEST).exists())
    if not others:
        return ""
    return (f" ({', '.join(others[:3])} in {text} were prepared from other files or another "
            "tokenizer and are not used)")


# ---------------------------------------------------------------------------------- Beam

def pipeline_options(runner: str = "DirectRunner", num_workers: int | None = None,
                     beam_args: Iterable[str] = ()):
    """Beam options: the DirectRunner runs `num_workers` local processes (one: in this
    process); other runners take their own options from `beam_args`."""
    _import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions  # noqa: PLC0415

    beam_args = list(beam_args)
    args = [f"--runner={runner}", *beam_args]
    if not any(a.lstrip("-").startswith("default_sdk_harness_log_level") for a in beam_args):
        args.append("--default_sdk_harness_log_level=WARNING")  # workers log each bundle
    if runner in ("DirectRunner", "direct"):
        n = num_workers or os.cpu_count() or 1
        mode = "multi_processing" if n > 1 else "in_memory"
        args += [f"--direct_num_workers={n}", f"--direct_running_mode={mode}"]
    elif num_workers and not any(a.lstrip("-").startswith("num_workers") for a in beam_args):
        args.append(f"--num_workers={num_workers}")  # Dataflow's initial worker count
    return PipelineOptions(args)


def _import_beam():
    """apache_beam, imported without the root-logger warning its GCP module prints when the
    Google API client is not installed (it is not needed here)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import apache_beam  # noqa: PLC0415
    except ImportError:
        raise CorpusError("preparation runs on Apache Beam, which is not installed: "
                          "pip install 'loam[beam]'") from None
    finally:
        root.setLevel(level)
    return apache_beam


class _PrepareUnit:
    """DoFn body: (domain, unit) -> (domain, shard.json or an error), in a worker."""

    def __init__(self, tokenizer_spec: str, tokenizer_fingerprint: str, dirs: dict[str, str],
                 threads: int = -1):
        self.tokenizer_spec, self.tokenizer_fingerprint = tokenizer_spec, tokenizer_fingerprint
        self.dirs = dirs
        self.threads = threads
        self._tokenizer: Any = None

    def tokenizer(self):
        if self._tokenizer is None:
            vocab_lib.set_encode_threads(self.threads)

            tok = vocab_lib.get_tokenizer(self.tokenizer_spec)
            if tok.fingerprint != self.tokenizer_fingerprint:
                raise CorpusError(f"tokenizer {self.tokenizer_spec}: the worker's file differs "
                                  "from the one the pipeline was started with; give the workers "
                                  "the same file")
            self._tokenizer = tok
        return self._tokenizer

    def __call__(self, element):
        domain, unit = element
        try:
            meta = prepare_unit(unit, self.tokenizer(), self.dirs[domain])
            return domain, {"meta": meta, "unit": unit}
        except (CorpusError, OSError, ValueError) as e:
            return domain, {"error": f"{unit.key}: {e}" if unit.key not in str(e) else str(e),
                            "unit": unit}


class _Finalize:
    """DoFn body: (domain, [shard results]) -> manifest or errors, written where the driver
    reads them."""

    def __init__(self, sources: dict, fingerprints: dict[str, str], unit_fn: _PrepareUnit,
                 dirs: dict[str, str], report_dir: str):
        self.sources, self.unit_fn, self.dirs = sources, unit_fn, dirs
        self.fingerprints = fingerprints
        self.report_dir = report_dir

    def __call__(self, element):
        domain, results = element
        results = list(results)
        errors = sorted((r["unit"].index, r["error"]) for r in results if "error" in r)
        report: dict[str, Any]
        if not errors:
            try:
                manifest = finalize_domain(self.sources[domain], self.unit_fn.tokenizer(),
                                           self.dirs[domain], [r["meta"] for r in results],
                                           [r["unit"] for r in results],
                                           self.fingerprints[domain])
                report = {"ok": True, "manifest": manifest}
            except (CorpusError, OSError, ValueError) as e:
                errors = [(-1, str(e))]
        if errors:
            report = {"ok": False, "errors": [m for _, m in errors]}
        _write_atomic(_join(self.report_dir, f"{domain}.json"), _dumps(report))
        return domain


def _run_pipeline(todo: dict, fingerprints: dict[str, str], tokenizer, root: str,
                  options, threads: int = -1) -> dict[str, dict]:
    beam = _import_beam()

    report_dir = _join(root, f".prepare-{uuid.uuid4().hex[:12]}")
    dirs = {d: path for d, (_, path, _) in todo.items()}
    srcs = {d: source for d, (source, _, _) in todo.items()}
    unit_fn = _PrepareUnit(tokenizer.spec, tokenizer.fingerprint, dirs, threads)
    elements = [(d, u) for d, (_, _, units) in todo.items() for u in units]
    try:
        with beam.Pipeline(options=options) as p:
            _ = (p
                 | "Units" >> beam.Create(elements, reshuffle=False)
                 | "Spread" >> beam.Reshuffle()
                 | "PrepareUnit" >> beam.Map(unit_fn)
                 | "ByDomain" >> beam.GroupByKey()
                 | "Finalize" >> beam.Map(_Finalize(srcs, fingerprints, unit_fn, dirs,
                                                   report_dir)))
        reports = {}
        for d in todo:
            report = shards_lib.read_json(_join(report_dir, f"{d}.json"))
            if report is None:
                raise RuntimeError(f"the pipeline ended without a report for domain {d!r}")
            reports[d] = report
        return reports
    finally:
        if shards_lib.is_url(report_dir):
            fs, inner = shards_lib.filesystem(report_dir)
            if fs.exists(inner):
                fs.rm(inner, recursive=True)
        else:
            shutil.rmtree(report_dir, ignore_errors=True)


def prepare(sources: Mapping[str, sources_lib.Source], tokenizer, root=None, *,
            runner: str = "DirectRunner", num_workers: int | None = None,
            beam_args: Iterable[str] = ()) -> dict[str, PreparedDomain]:
    """Prepares every source not prepared yet (for this tokenizer) with one Beam pipeline;
    returns domain -> PreparedDomain. CorpusError naming the first problem of each failed
    domain (domains that succeeded keep their shards and manifest)."""
    root = default_root() if root is None else os.fspath(root)
    if _explicit(root) is not None:
        raise CorpusError(f"{root} is one prepared domain, not a directory to prepare into; "
                          "pass the directory that holds the preparations")
    done: dict[str, PreparedDomain] = {}
    todo: dict[str, tuple[sources_lib.Source, str, list[sources_lib.Unit]]] = {}
    fingerprints: dict[str, str] = {}
    for domain, source in sources.items():
        fingerprints[domain] = fingerprint = sources_lib.fingerprint(source)
        path = _prepared_path(source, tokenizer, root, fingerprint)
        if _exists(_join(path, MANIFEST)):
            done[domain] = open_prepared(path, source, tokenizer, source_fingerprint=fingerprint)
        else:
            todo[domain] = (source, path, sources_lib.units(source))
    if todo:
        # One worker in this process encodes on every core; several workers (or a cluster's)
        # encode one thread each: the workers are the parallelism.
        alone = runner in ("DirectRunner", "direct") and (num_workers or os.cpu_count()) == 1
        reports = _run_pipeline(todo, fingerprints, tokenizer, root,
                                pipeline_options(runner, num_workers, beam_args),
                                threads=-1 if alone else 1)
        failed = {d: r["errors"] for d, r in reports.items() if not r["ok"]}
        if failed:
            lines = [("" if errs[0].startswith(f"domain {d!r}") else f"domain {d!r}: ")
                     + errs[0] + (f" (and {len(errs) - 1} more shard errors)"
                                  if len(errs) > 1 else "")
                     for d, errs in failed.items()]
            raise CorpusError("; ".join(lines))
        for domain, (source, path, _) in todo.items():
            done[domain] = open_prepared(path, source, tokenizer,
                                         source_fingerprint=fingerprints[domain])
    return {d: done[d] for d in sources}


# ---------------------------------------------------------------------------------- command

_OWN_FLAGS = ("config", "runner", "num_workers", "prepared_dir")


def split_beam_args(argv: list[str], own_flags=_OWN_FLAGS) -> tuple[list[str], list[str]]:
    """(this command's arguments, Beam's): flags the command defines (``own_flags``, and
    --config.* overrides) stay; every other flag, with its value, goes to Beam."""
    ours: list[str] = []
    beam_args: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.lstrip("-").split("=", 1)[0]
        own = a in ("-h", "--help", "--helpshort", "--helpfull") or (
            a.startswith("-") and (name in own_flags or name.startswith("config.")
                                   or name.startswith("noconfig.")))
        takes_next = (a.startswith("-") and "=" not in a and i + 1 < len(argv)
                      and not argv[i + 1].startswith("-"))
        target = ours if own or not a.startswith("-") else beam_args
        target.append(a)
        if takes_next:
            target.append(argv[i + 1])
            i += 1
        i += 1
    return ours, beam_args


def _define_flags(flags):
    flags.DEFINE_string("runner", "DirectRunner",
                        "Beam runner: DirectRunner (local processes), DataflowRunner, "
                        "FlinkRunner, SparkRunner ...")
    flags.DEFINE_integer("num_workers", None,
                         "DirectRunner: worker processes (default: one per core); other "
                         "runners: passed on as their --num_workers")
    flags.DEFINE_string("prepared_dir", None,
                        "where preparations go (default: config.data.prepared_dir, else "
                        "$LOAM_CACHE_DIR/prepared or ~/.cache/loam/prepared)")


def summary_lines(prepared: Mapping[str, PreparedDomain]) -> list[str]:
    lines = [f"{'domain':<14} {'documents':>10} {'tokens':>14} {'val docs':>9} "
             f"{'val tokens':>12} {'dropped':>8} {'skipped':>8}  path"]
    for d, p in prepared.items():
        m = p.manifest
        lines.append(f"{d:<14} {m['splits']['train']['documents']:>10,} "
                     f"{m['splits']['train']['tokens']:>14,} "
                     f"{m['splits']['validation']['documents']:>9,} "
                     f"{m['splits']['validation']['tokens']:>12,} "
                     f"{m['dropped_empty']:>8,} {m['skipped_bad_lines']:>8,}  {p.origin}")
    return lines


def main(argv: list[str] | None = None):

    argv = list(sys.argv if argv is None else argv)
    ours, beam_args = split_beam_args(argv[1:])

    def run(config, flags):
        srcs = sources_lib.from_config(config)
        tok = vocab_lib.get_tokenizer(config.data.get("tokenizer") or "bundled")
        root = flags.prepared_dir or config.data.get("prepared_dir") or default_root()
        prepared = prepare(srcs, tok, root, runner=flags.runner, num_workers=flags.num_workers,
                           beam_args=beam_args)
        print("\n".join(summary_lines(prepared)), flush=True)
        return prepared

    return cli.config_main(run, define_flags=_define_flags, argv=[argv[0], *ours])


if __name__ == "__main__":
    main()
