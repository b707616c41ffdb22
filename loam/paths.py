"""One path layer for every file a run reads or writes: local paths and URL-addressed object
stores (`gs://`, `s3://`, `az://`, `hf://`) alike.

    p = paths.Path("gs://bucket/run") / "config.json"   # an etils.epath.Path
    paths.atomic_write(p, b"...")                       # readers see the old object or the new

`Path` is `etils.epath.Path`, the path type orbax-checkpoint takes, so checkpoints and every
other file of a run go through the same code; a URL's filesystem is fsspec's (gcsfs, s3fs,
adlfs, huggingface_hub: whichever is installed). A scheme with no filesystem here, or one whose
package is missing, is refused in one line naming what to install.

Object stores are not POSIX: an object is written whole (a single PUT is atomic, a rename is a
copy), never appended to, and nothing releases a lock when its process dies. Two primitives say
what a caller can rely on, and the run directory's lock, config and result files build on them:
`atomic_write` (temp file + rename locally, one PUT on a store) and `create_new`
(create-if-absent: O_EXCL locally, a generation / If-None-Match precondition on a store).

epath reaches `gs://` through TensorFlow's gfile when TensorFlow is installed, importing it
(seconds and gigabytes) and using a second storage client; loam sets `EPATH_USE_TF=false` (unless
the environment says otherwise) so that every URL goes through fsspec.
"""

from __future__ import annotations

import glob as glob_lib
import os
import re
import shutil
from typing import IO, Any

import fsspec

from loam.cli import UserError

os.environ.setdefault("EPATH_USE_TF", "false")

from etils import epath  # noqa: E402

PathLike = str | os.PathLike

# The URL schemes epath routes to fsspec, and the package that implements each.
PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class PathError(UserError, ValueError):
    """A path loam cannot read or write here; the message names the fix."""


def scheme(path: PathLike) -> str | None:
    """"gs" for gs://bucket/x, None for a local path."""
    m = _URL.match(os.fspath(path))
    return m.group(1).lower() if m else None


def is_local(path: PathLike) -> bool:
    return scheme(path) in (None, "file")


def _check_scheme(text: str) -> None:
    s = scheme(text)
    if s is None or s == "file":
        return
    if s not in PACKAGES:
        known = ", ".join(f"{k}://" for k in PACKAGES)
        raise PathError(f"{text}: {s}:// paths are not supported; use a local path or one of "
                        f"{known} (with its filesystem package installed)")

    try:
        fsspec.get_filesystem_class(s)
    except ImportError:
        raise PathError(f"{text}: {s}:// paths need the {PACKAGES[s]} package; install it "
                        f"(pip install {PACKAGES[s]}) and rerun") from None


def Path(path: PathLike, *more: str) -> epath.Path:
    """The path `path / more...` as an epath.Path (local, or a URL whose package is here)."""
    if isinstance(path, epath.Path) and not more:
        return path
    text = os.fspath(path)
    _check_scheme(text)
    if scheme(text) == "file":
        text = text[len("file://"):]
    return epath.Path(text, *more)


def absolute(path: PathLike) -> epath.Path:
    """A local path made absolute; a URL as it is."""
    p = Path(path)
    return p.absolute() if is_local(p) else p


def filesystem(path: PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for the operations epath does not offer."""

    p = Path(path)
    return fsspec.core.url_to_fs(os.fspath(p))


# --------------------------------------------------------------------------- reading

def read_bytes(path: PathLike) -> bytes:
    p = Path(path)
    if is_local(p):
        return p.read_bytes()
    fs, inner = filesystem(p)
    return fs.cat_file(inner)  # one GET, never a listing cache's stale view


def read_text(path: PathLike, encoding: str = "utf-8", errors: str = "strict") -> str:
    return read_bytes(path).decode(encoding, errors)


def exists(path: PathLike) -> bool:
    p = Path(path)
    if is_local(p):
        return p.exists()
    fs, inner = filesystem(p)
    fs.invalidate_cache(inner)
    return fs.exists(inner)


def glob(pattern: PathLike) -> list[epath.Path]:
    """Paths matching `pattern` (wildcards in its last parts), sorted."""
    p = Path(pattern)
    if is_local(p):

        return [Path(x) for x in sorted(glob_lib.glob(os.fspath(p)))]
    fs, inner = filesystem(p)
    fs.invalidate_cache()
    prefix = f"{scheme(p)}://"
    return [Path(prefix + x) for x in sorted(fs.glob(inner))]


def open(path: PathLike, mode: str = "r") -> IO:
    """A file object; on an object store, "w" writes the object whole at close (no "a")."""
    p = Path(path)
    if not is_local(p) and "a" in mode:
        raise PathError(f"{p}: objects in {scheme(p)}:// cannot be appended to")
    return p.open(mode)


# --------------------------------------------------------------------------- writing

def mkdir(path: PathLike) -> epath.Path:
    """Creates a local directory and its parents; on an object store (where a directory is a
    prefix of object names) there is nothing to create."""
    p = Path(path)
    if is_local(p):
        p.mkdir(parents=True, exist_ok=True)
    return p


def write_bytes(path: PathLike, data: bytes) -> epath.Path:
    p = Path(path)
    if is_local(p):
        p.write_bytes(data)
    else:
        fs, inner = filesystem(p)
        fs.pipe_file(inner, data)
    return p


def atomic_write(path: PathLike, data: bytes | str) -> epath.Path:
    """Writes `path` so that a reader sees the old content or the new, never a part: a temp file
    renamed over it locally, one PUT of the whole object on a store."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    p = Path(path)
    if not is_local(p):
        return write_bytes(p, data)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return p


def write_text(path: PathLike, text: str) -> epath.Path:
    """`atomic_write` of a text."""
    return atomic_write(path, text)


def create_new(path: PathLike, data: bytes | str) -> bool:
    """Creates `path` holding `data` only if nothing is there (False if something is): O_EXCL
    locally, a create-if-absent precondition on a store; of two racing callers, one wins."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    p = Path(path)
    if is_local(p):
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, inner = filesystem(p)
    try:
        fs.pipe_file(inner, data, mode="create")
    except FileExistsError:
        return False
    return True


def copy(src: PathLike, dst: PathLike) -> epath.Path:
    """Copies one file (the destination written whole, as `atomic_write`)."""
    return atomic_write(dst, read_bytes(src))


def upload(local: PathLike, dst: PathLike) -> epath.Path:
    """Puts a local file at `dst` (one object, written whole)."""
    d = Path(dst)
    if is_local(d):
        return atomic_write(d, Path(local).read_bytes())
    fs, inner = filesystem(d)
    fs.put_file(os.fspath(local), inner)
    return d


def rename(src: PathLike, dst: PathLike) -> epath.Path:
    """Moves a file or directory. Atomic locally; on an object store a copy of every object
    under `src` then their deletion (a reader may see both for a moment)."""
    s, d = Path(src), Path(dst)
    if is_local(s) and is_local(d):
        os.rename(s, d)
    else:
        fs, inner = filesystem(s)
        fs.invalidate_cache()
        fs.mv(inner, filesystem(d)[1], recursive=True)
    return d


def remove(path: PathLike, missing_ok: bool = True) -> None:
    """Deletes a file, or a directory and everything under it."""
    p = Path(path)
    if is_local(p):

        if p.is_dir():
            shutil.rmtree(p)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                if not missing_ok:
                    raise
        return
    fs, inner = filesystem(p)
    fs.invalidate_cache()
    try:
        fs.rm(inner, recursive=True)
    except FileNotFoundError:
        if not missing_ok:
            raise


def is_dir(path: PathLike) -> bool:
    p = Path(path)
    if is_local(p):
        return p.is_dir()
    fs, inner = filesystem(p)
    fs.invalidate_cache()
    return fs.isdir(inner)


def iterdir(path: PathLike) -> list[epath.Path]:
    """The entries directly under `path` (none if it does not exist), sorted by name."""
    p = Path(path)
    if is_local(p):
        return sorted(p.iterdir()) if p.is_dir() else []
    fs, inner = filesystem(p)
    fs.invalidate_cache()
    try:
        names = fs.ls(inner, detail=False)
    except FileNotFoundError:
        return []
    prefix = f"{scheme(p)}://"
    return sorted(Path(prefix + n.rstrip("/")) for n in names if n.rstrip("/") != inner.rstrip("/"))
