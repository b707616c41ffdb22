"""Metrics to `metrics.jsonl` and to TensorBoard event files, without importing TensorFlow.

In a local run directory both are appended to as records come. An object (gs://...) cannot be
appended to, so there each writer keeps its records in segment objects of its own,
`metrics.jsonl.d/<writer>-<n>.jsonl`, rewritten whole at every flush (every FLUSH_SECONDS, at
each checkpoint and evaluation, and at the end) and closed for the next one past SEGMENT_BYTES:
an upload costs at most a segment, and a killed run loses only records written after its last
flush (the steps it replays after resuming write them again). `read_jsonl` reads the file and
its segments in order, so readers see one sequence of records either way. TensorBoard's writer
(its no-TensorFlow build) can only append to local files, so its event files are written in a
local staging directory and uploaded whole at the same flushes, a new one begun past
SEGMENT_BYTES; TensorBoard reads every event file of a directory.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from typing import Any

from loam import paths

# TensorBoard's file I/O goes through a lazily imported "tf" module: the real TensorFlow when it is
# installed (seconds of import and gigabytes of address space per process), else a stub that
# handles local and fsspec paths. Registering `tensorboard.compat.notf` (what TensorBoard's own
# no-TensorFlow build provides) selects the stub, unless TensorFlow is already loaded anyway.
if "tensorflow" not in sys.modules:
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.summary.writer import event_file_writer  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402


def _quiet_event_writer_threads() -> None:
    """TensorBoard writes events from a thread of its own. When a write fails there (a full
    disk), the thread keeps the exception, which the writer raises again at its next write or
    flush in the calling thread (where loam turns it into one `error:` line), and also lets it
    escape, so Python prints its traceback to stderr. That printed copy is dropped."""
    previous = threading.excepthook
    writer_thread = getattr(event_file_writer, "_AsyncWriterThread", ())

    def hook(args):
        if isinstance(args.thread, writer_thread):
            return
        previous(args)

    threading.excepthook = hook


_quiet_event_writer_threads()


def flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    """{"loss": {"code": 1.0}} -> {"loss/code": 1.0}: the tag form TensorBoard shows."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


FLUSH_SECONDS = 30.0
SEGMENT_BYTES = 8 << 20
SEGMENTS_SUFFIX = ".d"


def segments(path: paths.PathLike) -> list[paths.epath.Path]:
    """The segment objects of a JSONL file written to an object store, in writing order."""
    p = paths.Path(path)
    return paths.glob(p.parent / (p.name + SEGMENTS_SUFFIX) / "*.jsonl")


def jsonl_exists(path: paths.PathLike) -> bool:
    """True if a JSONL file (or, on an object store, any of its segments) exists."""
    return paths.exists(path) or bool(segments(path))


def repair_jsonl(path: paths.PathLike) -> str | None:
    """Makes an append-only JSONL file end at a line boundary again after a kill mid-write.

    A last line without its newline is kept if it is a whole record (newline added); otherwise
    it is appended to `<file>.partial` (nothing is deleted) and cut from the file, so the next
    record starts on a line of its own. Returns a note of what was done, or None. On an object
    store there is nothing to repair: every segment is written whole.
    """
    if not paths.is_local(path):
        return None
    return _repair_local(pathlib.Path(os.fspath(paths.Path(path))))


def _repair_local(path: pathlib.Path) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return None
        # Read back to the last newline (a record is a few KB; read the tail in blocks).
        end, block, tail = size, 1 << 16, b""
        while end > 0 and b"\n" not in tail:
            start = max(0, end - block)
            f.seek(start)
            tail = f.read(end - start) + tail
            end = start
        cut = end + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.seek(cut)
        fragment = f.read()
        try:
            json.loads(fragment)
            whole = True
        except ValueError:
            whole = False
        if whole:
            f.seek(0, 2)
            f.write(b"\n")
            return f"{path}: the last record lacked its newline; added it"
        side = path.with_name(path.name + ".partial")
        with open(side, "ab") as g:
            g.write(fragment + b"\n")
            g.flush()
            os.fsync(g.fileno())
        f.truncate(cut)
    note = (f"{path}: moved a partial last line ({len(fragment)} bytes, from a run killed "
            f"mid-write) to {side}")
    print(f"note: {note}", file=sys.stderr, flush=True)
    return note


def read_jsonl(path: paths.PathLike) -> list[dict]:
    """The records of a JSONL file, then of its segments (object stores); a line that does not
    parse is skipped with a warning that names the file and line (a run killed mid-write leaves
    at most one). FileNotFoundError if there is neither."""
    path = paths.Path(path)
    parts = segments(path)
    sources = ([path] if not parts or paths.exists(path) else []) + parts
    records = []
    for source in sources:
        text = paths.read_text(source, errors="replace")
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                print(f"warning: {source}:{n} is not valid JSON ({e}); skipped",
                      file=sys.stderr)
    return records


class _SegmentedJsonl:
    """This writer's records on an object store: its own segment objects, each rewritten whole
    at a flush (module docstring)."""

    def __init__(self, path):
        self.dir = path.parent / (path.name + SEGMENTS_SUFFIX)
        self.writer = f"{time.time_ns():020d}-{os.getpid()}"
        self.index, self.buffer, self.dirty = 0, bytearray(), False

    def write(self, line: str):
        self.buffer += line.encode("utf-8")
        self.dirty = True

    def flush(self):
        if not self.dirty:
            return
        paths.write_bytes(self.dir / f"{self.writer}-{self.index:05d}.jsonl", bytes(self.buffer))
        self.dirty = False
        if len(self.buffer) >= SEGMENT_BYTES:
            self.index, self.buffer = self.index + 1, bytearray()

    def close(self):
        self.flush()


class _StagedEvents:
    """TensorBoard event files for an object store: written locally, uploaded whole at a flush
    (module docstring)."""

    def __init__(self, remote):
        self.remote = remote
        self.local = tempfile.mkdtemp(prefix="loam-tensorboard-")
        self.writer = EventFileWriter(self.local)

    def add_event(self, event):
        self.writer.add_event(event)

    def _upload(self):
        for name in sorted(os.listdir(self.local)):
            paths.upload(os.path.join(self.local, name), self.remote / name)

    def flush(self):
        self.writer.flush()
        self._upload()
        full = [n for n in os.listdir(self.local)
                if os.path.getsize(os.path.join(self.local, n)) >= SEGMENT_BYTES]
        if full:  # uploaded whole just now: begin the next event file
            self.writer.close()
            self._upload()
            for name in os.listdir(self.local):
                os.remove(os.path.join(self.local, name))
            self.writer = EventFileWriter(self.local)

    def close(self):
        self.writer.close()
        self._upload()
        shutil.rmtree(self.local, ignore_errors=True)


class MetricWriter:
    """Appends one JSON line per record and mirrors every scalar into TensorBoard.

    `subdir` separates event files (e.g. "eval") so that TensorBoard shows them as runs;
    `listeners` are called with (step, record) after each record is written (another sink of
    the same records, e.g. Weights & Biases).
    """

    def __init__(self, workdir: paths.PathLike, subdir: str = "train",
                 jsonl: str = "metrics.jsonl", enabled: bool = True):
        self.enabled = enabled
        self.workdir = paths.Path(workdir)
        self.listeners: list[Callable[[int, dict], None]] = []
        if not enabled:
            return
        self.local = paths.is_local(self.workdir)
        paths.mkdir(self.workdir)
        self._jsonl: Any
        self._tb: _StagedEvents | EventFileWriter
        if self.local:
            repair_jsonl(self.workdir / jsonl)
            self._jsonl = open(self.workdir / jsonl, "a", buffering=1)
            self._tb = EventFileWriter(os.fspath(self.workdir / "tensorboard" / subdir))
        else:
            self._jsonl = _SegmentedJsonl(self.workdir / jsonl)
            self._tb = _StagedEvents(self.workdir / "tensorboard" / subdir)
        self._flushed = time.monotonic()

    def write(self, step: int, record: dict):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(_json_safe({"step": int(step), **record})) + "\n")
        wall = time.time()
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v)
                  for k, v in flatten(record).items()]
        self._tb.add_event(event_pb2.Event(wall_time=wall, step=int(step),
                                           summary=summary_pb2.Summary(value=values)))
        if not self.local and time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()
        for listener in self.listeners:
            listener(int(step), record)

    def flush(self):
        """Makes every record written so far durable (on an object store: uploads them)."""
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()
            self._flushed = time.monotonic()

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


class Progress:
    """One status line with rate and ETA, redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, start: int = 0, every: int = 10):
        self.total, self.start, self.every = total, start, every
        self.t0 = time.time()
        self.tty = sys.stdout.isatty()

    def update(self, step: int, text: str):
        done = step - self.start
        if not self.tty and step % self.every and step != self.total:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        line = (f"step {step}/{self.total} {100 * step / max(self.total, 1):5.1f}% | {text} | "
                f"elapsed {elapsed:6.0f}s eta {eta:6.0f}s")
        if self.tty:
            sys.stdout.write("\r" + line[:160].ljust(160))
            if step == self.total:
                sys.stdout.write("\n")
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
