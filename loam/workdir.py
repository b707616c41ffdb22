"""Run directories: an advisory lock (one writer at a time) and reading the files in them.

    with workdir_lock(workdir):   # WorkdirBusy if another process holds it
        ...

The lock is `fcntl.flock` on `workdir/.lock`, which records the holder (command, pid, host,
start time) so the refusal can say who holds it. The kernel releases a flock when its process
dies, however it dies, so a lock left by a killed run is simply taken over: there is no stale
lock to clean up. (flock does not lock across hosts on every network filesystem; the holder's
host is recorded for the message, not relied on.)
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from loam.cli import UserError

LOCK_FILE = ".lock"


class WorkdirBusy(UserError):
    """Another live process holds the workdir's lock."""


class UnreadableFile(UserError):
    """A JSON file that cannot be read; the message names the file."""


def read_json(path: str | Path):
    """The content of a JSON file, or UnreadableFile naming the file and what is wrong with it
    (a truncated write, a missing file), never a bare `Expecting value ...`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UnreadableFile(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UnreadableFile(f"{path} cannot be read ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        what = "is empty" if not text.strip() else (
            f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}"
            + ("; it looks truncated, as by a process killed mid-write)"
               if e.pos >= len(text.rstrip()) - 1 else ")"))
        raise UnreadableFile(f"{path} {what}") from None


def write_json(path: str | Path, value, **dumps) -> Path:
    """Writes JSON atomically (temp file + rename): a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value, **dumps))
    os.replace(tmp, path)
    return path


def save_config(workdir: str | Path, config) -> Path:
    """Writes `workdir/config.json` (a ConfigDict) atomically. A different config already there
    is kept as `config.<time>.json` (never overwritten: a counter is added within one second),
    so the history of a run's edited configs survives."""
    workdir = Path(workdir)
    path = workdir / "config.json"
    new = json.loads(config.to_json_best_effort())
    if path.exists():
        try:
            if read_json(path) == new:
                return path
        except UnreadableFile:
            pass
        stamp = time.strftime("%Y%m%d-%H%M%S")
        keep, n = workdir / f"config.{stamp}.json", 1
        while keep.exists():
            keep, n = workdir / f"config.{stamp}.{n}.json", n + 1
        path.rename(keep)
    return write_json(path, new, indent=2, sort_keys=True)


def _command() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["since"])))
        return f"{h['command']} (pid {h['pid']} on {h['host']}) since {since}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def _is_secondary_process() -> bool:
    """True in processes 1..N-1 of a multi-process JAX job: process 0 holds the lock for the
    job (they all write one run directory)."""
    jax = sys.modules.get("jax")
    return jax is not None and jax.process_count() > 1 and jax.process_index() != 0


@contextlib.contextmanager
def workdir_lock(workdir: str | Path, command: str | None = None, enabled: bool | None = None):
    """Holds the lock of `workdir` (created if needed) for the duration of the block.

    `enabled=None` locks except in the secondary processes of a multi-process JAX job.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if enabled is None:
        enabled = not _is_secondary_process()
    if not enabled:
        yield None
        return
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise WorkdirBusy(f"{workdir} is in use by {holder}; wait for it to finish or use "
                              "another workdir") from None
        record = {"command": command or _command(), "pid": os.getpid(),
                  "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it would race a new holder)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
