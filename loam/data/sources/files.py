"""File-based source kinds: ``bundled``, ``jsonl``, ``parquet``, ``text``.

- ``bundled:<name>``: one of the five bundled corpora, ``<data dir>/<name>.jsonl.gz`` (data dir:
  option ``data_dir``, else ``$LOAM_DATA_DIR``, else ``loam/data/bundled``), read exactly as
  ``loam.data.corpora.read_documents`` reads it.
- ``jsonl:<glob>``: JSON lines, plain, ``.gz`` or ``.zst``; one unit (output shard) per file.
  Options ``text_field`` (default ``text``), ``id_field`` (default ``id``), ``skip_bad_lines``.
- ``parquet:<glob>``: Parquet files read by row group (pyarrow, ``pip install 'loam[parquet]'``);
  one unit per file. Options ``text_field``, ``id_field``, ``skip_bad_lines``.
- ``text:<glob>``: one document per file (a code repository, a folder of books); the document id
  is the file's path relative to the glob's root. Files are grouped into units of at most
  `TEXT_UNIT_FILES` files or `TEXT_UNIT_BYTES` bytes. Option ``skip_bad_lines`` (skip binary or
  non-UTF-8 files).

Globs: the files a glob matches, sorted; ``**`` matches any number of directories; as in a shell,
``*`` does not match names starting with '.'. A relative glob is relative to the current
directory. The glob's root is its longest leading part without a wildcard (``data/web`` for
``data/web/**/*.jsonl``); unit keys are paths relative to it. Local paths are plain paths;
URL-addressed ones (``gs://``, ``s3://``, ``memory://`` ...) are read with fsspec where the
filesystem's package is installed.

Document ids: the id field's value (an integer becomes a string). A record without the default
id field gets ``<unit key>:<n>``, n being the line number in a JSON-lines file (counted from 1,
as error messages count) or the row number in a Parquet file (counted from 0, as pyarrow counts);
an ``id_field`` set explicitly must be present in every record.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import zstandard

from loam.data import corpora
from loam.data.corpora import CorpusError
from loam.data.sources import Source, Unit

log = logging.getLogger(__name__)

OPTIONS: dict[str, set[str]] = {
    "bundled": {"data_dir"},
    "jsonl": {"text_field", "id_field", "skip_bad_lines"},
    "parquet": {"text_field", "id_field", "skip_bad_lines"},
    "text": {"skip_bad_lines"},
}
# A text source's unit: at most this many files, or this many bytes (a larger file alone).
TEXT_UNIT_FILES = 1024
TEXT_UNIT_BYTES = 64 << 20
_PARQUET_BATCH = 1024
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_MAGIC = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class FilesUnit(Unit):
    """A unit of a file-based source: the files it reads, as (path, name relative to the glob's
    root) pairs."""

    files: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------------------------------------
# Paths: plain local paths, or URLs through fsspec.

def _is_url(path: str) -> bool:
    return bool(_URL.match(path))


def _fsspec(url: str):
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise CorpusError(f"cannot read {url}: its filesystem package is not installed ({e}); "
                          "install it (e.g. gcsfs for gs://, s3fs for s3://)") from None
    except ValueError as e:
        raise CorpusError(f"cannot read {url}: {e}") from None


def _glob_root(pattern: str) -> str:
    """The longest leading part of `pattern` without a wildcard (its directory if none has one)."""
    head = ""
    if _is_url(pattern):
        head, pattern = pattern.split("://", 1)
        head += "://"
    fixed = []
    for p in pattern.split("/")[:-1]:
        if _MAGIC.search(p):
            break
        fixed.append(p)
    return head + ("/" if fixed == [""] else "/".join(fixed))


def _source_where(source: Source) -> str:
    return f"{source.kind} source of domain {source.domain!r} ({source.spec})"


_URL_STAT_KEYS = ("size", "mtime", "updated", "LastModified", "last_modified", "created", "ETag",
                  "etag", "md5Hash", "crc32c", "generation")


def _match(source: Source) -> list[tuple[str, str, list[Any]]]:
    """(path, name relative to the glob's root, [size, version...]) of every file the source's
    glob matches, sorted by name. CorpusError if none."""
    pattern = os.path.expanduser(source.target)
    root = _glob_root(pattern)
    out: list[tuple[str, str, list[Any]]] = []
    if _is_url(pattern):
        fs, fs_pattern = _fsspec(pattern)
        fs_root = _fsspec(root)[1] if root.split("://", 1)[1] else ""
        mentions_dot = "/." in "/" + pattern[len(root):]
        try:
            found = (fs.glob(fs_pattern, detail=True) if _MAGIC.search(fs_pattern)
                     else {fs_pattern: fs.info(fs_pattern)})
        except FileNotFoundError:
            found = {}
        for p, info in found.items():
            if info.get("type") != "file":
                continue
            name = p[len(fs_root):].lstrip("/") if fs_root and p.startswith(fs_root) else p
            if not mentions_dot and any(c.startswith(".") for c in name.split("/")):
                continue
            out.append((fs.unstrip_protocol(p), name,
                        [info.get("size", 0)] + [str(info.get(k)) for k in _URL_STAT_KEYS]))
    else:
        abs_root = os.path.abspath(root or ".")
        matches = globlib.glob(pattern, recursive=True) if _MAGIC.search(pattern) else [pattern]
        for p in matches:
            try:
                st = os.stat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                a = os.path.abspath(p)
                out.append((a, os.path.relpath(a, abs_root).replace(os.sep, "/"),
                            [st.st_size, st.st_mtime_ns]))
    if not out:
        if not _is_url(pattern) and os.path.isdir(pattern):
            raise CorpusError(f"{_source_where(source)}: {pattern} is a directory; name its "
                              f"files with a glob, e.g. '{pattern.rstrip('/')}/**/*.jsonl'")
        if not _MAGIC.search(pattern):
            raise CorpusError(f"{_source_where(source)}: file {pattern} does not exist"
                              + ("" if _is_url(pattern) else
                                 f" (relative to the current directory {os.getcwd()})"))
        raise CorpusError(
            f"{_source_where(source)}: the glob {pattern!r} matches no file"
            + ("" if _is_url(pattern) else f" (relative to the current directory {os.getcwd()})")
            + "; check the path, or use '**' to match files in subdirectories")
    out.sort(key=lambda m: m[1])
    return out


def _open(path: str) -> IO[bytes]:
    if _is_url(path):
        fs, p = _fsspec(path)
        try:
            return fs.open(p, "rb")
        except FileNotFoundError:
            raise CorpusError(f"{path}: file not found (was it removed after the source was "
                              "listed?)") from None
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CorpusError(f"{path}: file not found (was it removed after the source was "
                          "listed?)") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot open ({e})") from None


# ---------------------------------------------------------------------------------------------
# Registry interface

def _flag(source: Source, key: str) -> bool:
    return bool(source.option(key, False))


def validate(source: Source) -> None:
    where = _source_where(source)
    if source.kind == "bundled":
        if source.target not in corpora.DOMAIN_NAMES:
            raise CorpusError(f"{where}: unknown bundled corpus {source.target!r}; the bundled "
                              f"corpora are {', '.join(corpora.DOMAIN_NAMES)}")
    for key in ("text_field", "id_field", "data_dir"):
        value = source.option(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise CorpusError(f"{where}: option {key!r} must be a non-empty string, got {value!r}")
    skip = source.option("skip_bad_lines")
    if skip is not None and not isinstance(skip, bool):
        raise CorpusError(f"{where}: option 'skip_bad_lines' must be true or false, got {skip!r}")


def _bundled_path(source: Source) -> str:
    return str(corpora.corpus_path(source.target, source.option("data_dir")))


def units(source: Source) -> list[Unit]:
    if source.kind == "bundled":
        path = _bundled_path(source)
        if not os.path.isfile(path):
            raise CorpusError(
                f"{_source_where(source)}: corpus file {path} does not exist; build it with "
                f"`python -m loam.data.build --out {os.path.dirname(path)}`, or unset "
                "LOAM_DATA_DIR (and data_dir) to use the bundled corpora")
        name = os.path.basename(path)
        return [FilesUnit(source, 0, name, None, ((path, name),))]
    files = _match(source)
    if source.kind in ("jsonl", "parquet"):
        return [FilesUnit(source, i, name, None, ((path, name),))
                for i, (path, name, _) in enumerate(files)]
    if source.kind == "text":
        groups: list[list[tuple[str, str]]] = []
        size = 0
        for path, name, st in files:
            n = int(st[0] or 0)
            if not groups or len(groups[-1]) >= TEXT_UNIT_FILES or size + n > TEXT_UNIT_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((path, name))
            size += n
        return [FilesUnit(source, i, g[0][1] if len(g) == 1 else f"{g[0][1]} .. {g[-1][1]}",
                          None, tuple(g)) for i, g in enumerate(groups)]
    raise CorpusError(f"source kind {source.kind!r} is not a file kind")


def fingerprint(source: Source) -> str:
    """``bundled``: a hash of the corpus file's bytes (stable across checkouts, whose modification
    times differ). Other kinds: a hash of every matched file's path, size and modification time
    (object stores: their etag or generation when they report one) -- a file added, removed or
    rewritten changes it; the bytes themselves are not read."""
    h = hashlib.sha256()
    if source.kind == "bundled":
        with _open(_bundled_path(source)) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    for path, _, st in _match(source):
        h.update(json.dumps([path, *st]).encode() + b"\n")
    return h.hexdigest()


def _files_of(unit: Unit) -> tuple[tuple[str, str], ...]:
    if isinstance(unit, FilesUnit) and unit.files:
        return unit.files
    # A plain Unit (e.g. rebuilt from its fields): find its files again by key.
    for u in units(unit.source):
        if u.key == unit.key:
            assert isinstance(u, FilesUnit)
            return u.files
    raise CorpusError(f"{_source_where(unit.source)}: no unit {unit.key!r} (the files changed "
                      "since the source was listed)")


def read_unit(unit: Unit, stats: dict[str, int] | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every record of the unit, in order (empty texts included).

    Bad input raises CorpusError naming the file (and line, or row). With the source option
    ``skip_bad_lines``, a bad record (a line that is not UTF-8, not JSON, not an object, lacks the
    text field or has a non-string text or bad id; a Parquet row with a null text or id; a text
    file that is binary or not UTF-8) is skipped instead: the count is logged (a warning of this
    module's logger, with the first problem) at the end of the unit, and added to
    ``stats["skipped_bad_lines"]`` when a `stats` dict is passed; ``stats["records"]`` counts the
    records yielded. An unreadable file (not gzip / zstd / Parquet, truncated) always raises."""
    if stats is None:
        stats = {}
    stats.setdefault("records", 0)
    stats.setdefault("skipped_bad_lines", 0)
    source = unit.source
    if source.kind == "bundled":
        for doc in corpora.read_documents(_files_of(unit)[0][0]):
            stats["records"] += 1
            yield doc
        return
    reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}[source.kind]
    bad = _Bad(unit, _flag(source, "skip_bad_lines"))
    for doc in reader(unit, bad):
        stats["records"] += 1
        yield doc
    stats["skipped_bad_lines"] += bad.count
    bad.report()


class _Bad:
    """Raises on a bad record, or counts it when the source skips bad lines."""

    def __init__(self, unit: Unit, skip: bool):
        self.unit, self.skip, self.count, self.first = unit, skip, 0, ""

    def __call__(self, message: str) -> None:
        if not self.skip:
            raise CorpusError(f"{message} (or set the source option skip_bad_lines: true to "
                              "skip such records)")
        self.count += 1
        self.first = self.first or message

    def report(self) -> None:
        if self.count:
            log.warning("%s: skipped %d bad record(s) in %s (skip_bad_lines); first: %s",
                        self.unit.source.domain, self.count, self.unit.key, self.first)


def _doc_id(value: Any, explicit: bool, field: str, fallback: str, where: str,
            bad: _Bad) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None:
        if not explicit:
            return fallback
        bad(f"{where}: no id field {field!r} (the source option id_field); fix id_field, or "
            "remove id_field to number the records")
        return None
    bad(f"{where}: id field {field!r} is a {type(value).__name__}; ids must be strings or "
        "integers")
    return None


# --- jsonl --------------------------------------------------------------------------------

def _lines(path: str) -> Iterator[bytes]:
    """The file's lines (bytes), decompressed by its suffix: .gz, .zst / .zstd, else plain."""
    raw = _open(path)
    name = path.lower()
    stream: Any
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    if name.endswith(".gz"):
        kind = "gzip"
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
    elif name.endswith((".zst", ".zstd")):
        kind = "zstd"
        errors += (zstandard.ZstdError,)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        stream = io.BufferedReader(reader, 1 << 20)
    else:
        kind = "a file"
        stream = raw
    lineno = 0
    try:
        with raw, stream:
            for lineno, line in enumerate(stream, 1):  # noqa: B007
                yield line
    except errors as e:
        raise CorpusError(f"{path}:{lineno + 1}: cannot read as {kind} ({type(e).__name__}: "
                          f"{e}); the file is damaged or not what its name says") from None


def _read_jsonl(unit: Unit, bad: _Bad) -> Iterator[tuple[str, str]]:
    source = unit.source
    text_field = source.option("text_field", "text")
    explicit_id = source.option("id_field") is not None
    id_field = source.option("id_field", "id")
    for path, name in _files_of(unit):
        for lineno, raw in enumerate(_lines(path), 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad(f"{where}: bytes that are not UTF-8 ({e}); re-encode the file as UTF-8")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                bad(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be "
                    "one JSON object")
                continue
            if not isinstance(record, dict):
                bad(f"{where}: a JSON {type(record).__name__}, not an object; each line must be "
                    f"one JSON object with a text field {text_field!r}")
                continue
            if text_field not in record:
                keys = ", ".join(map(repr, list(record)[:20])) or "none"
                bad(f"{where}: no text field {text_field!r} (the record's keys: {keys}); set the "
                    "source option text_field to the field holding the text")
                continue
            text = record[text_field]
            if not isinstance(text, str):
                bad(f"{where}: text field {text_field!r} is a {type(text).__name__}, not a "
                    "string")
                continue
            doc_id = _doc_id(record.get(id_field), explicit_id, id_field, f"{name}:{lineno}",
                             where, bad)
            if doc_id is not None:
                yield doc_id, text


# --- parquet ------------------------------------------------------------------------------

def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("parquet sources need pyarrow: pip install 'loam[parquet]'") from None
    return pa, pq


def _read_parquet(unit: Unit, bad: _Bad) -> Iterator[tuple[str, str]]:
    pa, pq = _pyarrow()
    source = unit.source
    text_field = source.option("text_field", "text")
    explicit_id = source.option("id_field") is not None
    id_field = source.option("id_field", "id")
    for path, name in _files_of(unit):
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(_open(path)) if _is_url(path) else path
            try:
                pf = pq.ParquetFile(f)
            except FileNotFoundError:
                raise CorpusError(f"{path}: file not found (was it removed after the source "
                                  "was listed?)") from None
            except (pa.ArrowException, OSError) as e:
                raise CorpusError(f"{path}: cannot read as Parquet ({e})") from None
            stack.callback(pf.close)
            schema = pf.schema_arrow
            columns = schema.names
            if text_field not in columns:
                raise CorpusError(
                    f"{path}: no text column {text_field!r} (columns: "
                    f"{', '.join(map(repr, columns))}); set the source option text_field to "
                    "the column holding the text")
            ttype = schema.field(text_field).type
            if not (pa.types.is_string(ttype) or pa.types.is_large_string(ttype)
                    or getattr(pa.types, "is_string_view", lambda t: False)(ttype)):
                raise CorpusError(f"{path}: text column {text_field!r} has type {ttype}, not a "
                                  "string type")
            read_id = id_field in columns
            if explicit_id and not read_id:
                raise CorpusError(
                    f"{path}: no id column {id_field!r} (columns: {', '.join(map(repr, columns))}"
                    "); fix the source option id_field, or remove it to number the rows")
            if read_id:
                itype = schema.field(id_field).type
                if not (pa.types.is_integer(itype) or pa.types.is_string(itype)
                        or pa.types.is_large_string(itype)):
                    raise CorpusError(f"{path}: id column {id_field!r} has type {itype}; ids "
                                      "must be strings or integers")
            cols = [text_field] + ([id_field] if read_id and id_field != text_field else [])
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=cols):
                    texts = batch.column(text_field).to_pylist()
                    ids = (batch.column(id_field).to_pylist() if read_id
                           else [None] * len(texts))
                    for text, raw_id in zip(texts, ids, strict=True):
                        where = f"{path}: row {row}"
                        fallback = f"{name}:{row}"
                        row += 1
                        if text is None:
                            bad(f"{where}: text column {text_field!r} is null")
                            continue
                        doc_id = _doc_id(raw_id, explicit_id, id_field, fallback, where, bad)
                        if doc_id is not None:
                            yield doc_id, text
            except (pa.ArrowException, OSError) as e:
                raise CorpusError(f"{path}: row {row}: cannot read as Parquet ({e})") from None


# --- text ---------------------------------------------------------------------------------

def _read_text(unit: Unit, bad: _Bad) -> Iterator[tuple[str, str]]:
    for path, name in _files_of(unit):
        with _open(path) as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad(f"{path}: not UTF-8 text ({e}); a text source reads UTF-8 files only -- narrow "
                "the glob (e.g. '**/*.py') or re-encode the file")
            continue
        if "\x00" in text:
            bad(f"{path}: a binary file (it contains NUL bytes); narrow the glob (e.g. "
                "'**/*.py') to match text files only")
            continue
        yield name, text
