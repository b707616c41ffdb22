"""Run directories: an advisory lock (one writer at a time) and reading the files in them.

    with workdir_lock(workdir):   # WorkdirBusy if another process holds it
        ...

A local workdir's lock is `fcntl.flock` on `workdir/.lock`, which records the holder (command,
pid, host, start time) so the refusal can say who holds it. The kernel releases a flock when its
process dies, however it dies, so a lock left by a killed run is simply taken over: there is no
stale lock to clean up. (flock does not lock across hosts on every network filesystem; the
holder's host is recorded for the message, not relied on.)

An object store (gs://...) has no flock, and nothing there notices that a process died. Its lock
is a lease: numbered objects `workdir/.lock/<epoch>.json`, each created with create-if-absent
semantics, the highest one the current holder's. The holder rewrites its object's heartbeat
every LEASE_SECONDS / 6 and marks it released at the end. A newcomer takes over only a released
lease, one whose holder ran on this host and is gone (pid check), or one without a heartbeat for
LEASE_SECONDS, by creating the next epoch: of two racing newcomers exactly one creates it, and
one that finds a higher epoch after creating its own backs off. So the lock needs only
create-if-absent and consistent listing, which GCS and S3 both give.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import threading
import time

from loam import paths
from loam.cli import UserError

LOCK_FILE = ".lock"
LEASE_SECONDS = 180.0


class WorkdirBusy(UserError):
    """Another live process holds the workdir's lock."""


class UnreadableFile(UserError):
    """A JSON file that cannot be read; the message names the file."""


def read_json(path: paths.PathLike):
    """The content of a JSON file, or UnreadableFile naming the file and what is wrong with it
    (a truncated write, a missing file), never a bare `Expecting value ...`."""
    path = paths.Path(path)
    try:
        text = paths.read_text(path)
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


def write_json(path: paths.PathLike, value, **dumps) -> paths.epath.Path:
    """Writes JSON atomically (paths.atomic_write): a reader sees the old file or the new one."""
    return paths.atomic_write(path, json.dumps(value, **dumps))


def save_config(workdir: paths.PathLike, config) -> paths.epath.Path:
    """Writes `workdir/config.json` (a ConfigDict) atomically. A different config already there
    is kept as `config.<time>.json` (never overwritten: a counter is added within one second),
    so the history of a run's edited configs survives."""
    run = paths.Path(workdir)
    path = run / "config.json"
    new = json.loads(config.to_json_best_effort())
    if paths.exists(path):
        try:
            if read_json(path) == new:
                return path
        except UnreadableFile:
            pass
        stamp = time.strftime("%Y%m%d-%H%M%S")
        keep, n = run / f"config.{stamp}.json", 1
        while paths.exists(keep):
            keep, n = run / f"config.{stamp}.{n}.json", n + 1
        paths.copy(path, keep)  # kept before the new one replaces it: never a moment without
    return write_json(path, new, indent=2, sort_keys=True)


def _command() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return spec.name.removesuffix(".__main__")
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def _holder(text: str | dict) -> str:
    try:
        h = json.loads(text) if isinstance(text, str) else text
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
def workdir_lock(workdir: paths.PathLike, command: str | None = None,
                 enabled: bool | None = None, lease: float = LEASE_SECONDS):
    """Holds the lock of `workdir` (created if needed) for the duration of the block.

    `enabled=None` locks except in the secondary processes of a multi-process JAX job. `lease`
    applies to object stores only (see the module docstring).
    """
    run = paths.mkdir(workdir)
    if enabled is None:
        enabled = not _is_secondary_process()
    if not enabled:
        yield None
        return
    record = {"command": command or _command(), "pid": os.getpid(),
              "host": socket.gethostname(), "since": time.time()}
    if paths.is_local(run):
        with _flock(run, record) as path:
            yield path
    else:
        lock = _LeaseLock(run, record, lease)
        try:
            yield lock.path
        finally:
            lock.release()


@contextlib.contextmanager
def _flock(workdir, record: dict):
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise WorkdirBusy(f"{workdir} is in use by {holder}; wait for it to finish or use "
                              "another workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it would race a new holder)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class _LeaseLock:
    """The object-store lock (module docstring): acquired on construction, WorkdirBusy if held."""

    _NAME = re.compile(r"^(\d{10})\.json$")

    def __init__(self, workdir, record: dict, lease: float):
        self.workdir, self.lease = workdir, float(lease)
        self.dir = workdir / LOCK_FILE
        self.record = dict(record, heartbeat=time.time(), lease=self.lease)
        self.epoch = self._acquire()
        self.path = self.dir / self._name(self.epoch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="loam-workdir-lease",
                                        daemon=True)
        self._thread.start()

    def _name(self, epoch: int) -> str:
        return f"{epoch:010d}.json"

    def _epochs(self) -> list[int]:
        found = (self._NAME.match(p.name) for p in paths.iterdir(self.dir))
        return sorted(int(m.group(1)) for m in found if m)

    def _read(self, epoch: int) -> dict | None:
        try:
            value = json.loads(paths.read_text(self.dir / self._name(epoch)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _gone(self, holder: dict, now: float) -> bool:
        """True if a lease no longer protects anything (released, dead or silent holder)."""
        if holder.get("released"):
            return True
        try:
            if holder["host"] == socket.gethostname() and not _pid_alive(int(holder["pid"])):
                return True
            return now - float(holder["heartbeat"]) > float(holder.get("lease", self.lease))
        except (KeyError, TypeError, ValueError):
            return False  # unreadable: not proven gone; the message names the object

    def _busy(self, epoch: int, holder: dict) -> WorkdirBusy:
        age = ""
        try:
            age = f", last heartbeat {time.time() - float(holder['heartbeat']):.0f}s ago"
        except (KeyError, TypeError, ValueError):
            pass
        lease = float(holder.get("lease", self.lease)) if holder else self.lease
        return WorkdirBusy(
            f"{self.workdir} is in use by {_holder(holder)} (lock {self.dir / self._name(epoch)}"
            f"{age}); wait for it to finish or use another workdir. A holder that was killed "
            f"on another host is taken over {lease:.0f}s after its last heartbeat")

    def _acquire(self) -> int:
        for _ in range(5):
            epochs = self._epochs()
            top = epochs[-1] if epochs else 0
            if epochs:
                holder = self._read(top)
                if holder is None:
                    continue  # deleted while we looked: look again
                if not self._gone(holder, time.time()):
                    raise self._busy(top, holder)
            mine = top + 1
            self.record["heartbeat"] = time.time()
            if not paths.create_new(self.dir / self._name(mine), json.dumps(self.record)):
                continue  # another newcomer created it first: it holds the lock now
            if self._epochs()[-1] != mine:  # a takeover raced past this one: back off
                paths.remove(self.dir / self._name(mine))
                continue
            for old in epochs:
                paths.remove(self.dir / self._name(old))
            return mine
        epochs = self._epochs()
        raise self._busy(epochs[-1], self._read(epochs[-1]) or {}) if epochs else WorkdirBusy(
            f"{self.workdir}: could not take its lock ({self.dir}); rerun the command")

    def _write(self, **fields) -> None:
        self.record.update(fields)
        paths.write_bytes(self.path, json.dumps(self.record).encode())

    def _beat(self) -> None:
        interval = max(self.lease / 6, 0.05)
        while not self._stop.wait(interval):
            try:
                if self._epochs()[-1] != self.epoch:
                    print(f"warning: the lock of {self.workdir} was taken over by another "
                          "process (this one sent no heartbeat for too long); stop one of them",
                          file=sys.stderr, flush=True)
                    return
                self._write(heartbeat=time.time())
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the lease is long
                print(f"warning: could not renew the lock of {self.workdir} ({e})",
                      file=sys.stderr, flush=True)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            if self._epochs()[-1] == self.epoch:
                self._write(released=True, heartbeat=time.time())
        except Exception as e:  # noqa: BLE001 - the lease then expires by itself
            print(f"warning: could not release the lock of {self.workdir} ({e}); it expires "
                  f"{self.lease:.0f}s after its last heartbeat", file=sys.stderr, flush=True)
