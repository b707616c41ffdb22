"""Metrics to `metrics.jsonl` and to TensorBoard event files, without importing TensorFlow."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
from pathlib import Path

# TensorBoard's file I/O goes through a lazily imported "tf" module: the real TensorFlow when it is
# installed (seconds of import and gigabytes of address space per process), else a stub that
# handles local and fsspec paths. Registering `tensorboard.compat.notf` (what TensorBoard's own
# no-TensorFlow build provides) selects the stub, unless TensorFlow is already loaded anyway.
if "tensorflow" not in sys.modules:
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))

from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: E402
from tensorboard.summary.writer.event_file_writer import EventFileWriter  # noqa: E402


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


def repair_jsonl(path: str | Path) -> str | None:
    """Makes an append-only JSONL file end at a line boundary again after a kill mid-write.

    A last line without its newline is kept if it is a whole record (newline added); otherwise
    it is appended to `<file>.partial` (nothing is deleted) and cut from the file, so the next
    record starts on a line of its own. Returns a note of what was done, or None.
    """
    path = Path(path)
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


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSONL file; a line that does not parse is skipped with a warning that
    names the file and line (a run killed mid-write leaves at most one)."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                print(f"warning: {path}:{n} is not valid JSON ({e}); skipped", file=sys.stderr)
    return records


class MetricWriter:
    """Appends one JSON line per record and mirrors every scalar into TensorBoard.

    `subdir` separates event files (e.g. "eval") so that TensorBoard shows them as runs.
    """

    def __init__(self, workdir: str | Path, subdir: str = "train", jsonl: str = "metrics.jsonl",
                 enabled: bool = True):
        self.enabled = enabled
        self.workdir = Path(workdir)
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.workdir / jsonl)
        self._jsonl = open(self.workdir / jsonl, "a", buffering=1)
        self._tb = EventFileWriter(str(self.workdir / "tensorboard" / subdir))

    def write(self, step: int, record: dict):
        if not self.enabled:
            return
        self._jsonl.write(json.dumps(_json_safe({"step": int(step), **record})) + "\n")
        wall = time.time()
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v)
                  for k, v in flatten(record).items()]
        self._tb.add_event(event_pb2.Event(wall_time=wall, step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def flush(self):
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

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
