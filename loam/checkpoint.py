"""Orbax checkpoints holding everything a run needs to continue exactly.

A checkpoint has two items: `state` (params, optimiser state, step: sharded arrays, restored onto
whatever mesh the resuming run uses) and `meta` (JSON: the data stream's position, the RNG seed,
and a fingerprint of the parameters). orbax's atomic rename keeps half-written checkpoints out of
the listing; the fingerprint (per-leaf sums computed on device) catches one whose files are
readable but whose values are damaged.

A checkpoint that does not fit is not a damaged one. Before restoring, the saved tree (paths,
shapes, dtypes, read from orbax's metadata without touching the arrays) is compared with the
target: a difference raises `CheckpointMismatch` and nothing is touched. Only a checkpoint that
fits but fails to restore or fails its fingerprint is damaged: `restore_latest` moves it aside
into `checkpoints/damaged/` (never deletes it; orbax's listing ignores that directory, so the step
is saved again later) and tries the previous one; if none is intact it stops with
`CheckpointError` rather than let a run start over.

Checkpoints live on a local path or in Google Cloud Storage (gs://): orbax writes arrays through
tensorstore, whose kvstore spec it builds for those two only (`gs://` gets tensorstore's gcs
driver, anything else its file driver); `check_directory` refuses other stores in one line.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from loam import paths
from loam.cli import UserError, one_line

log = logging.getLogger("loam")

DAMAGED_DIR = "damaged"
# The fix a mismatch names. Resuming needs the model and optimizer the run was saved with; a
# different one (a larger model, another optimizer) is a new run, which may start from this
# checkpoint with init.checkpoint (init.carry=params takes the parameters alone; a different
# shape is refused there, naming the field).
_MISMATCH_FIX = ("to resume this run, restore the model and optimizer settings it was saved "
                 "with; to train a different one from it, use a new workdir with "
                 "--config.init.checkpoint={run}:{step} (--config.init.carry=params if the "
                 "optimizer differs)")


class CheckpointError(UserError):
    """A checkpoint that cannot be used; the message names it and the fix."""


class CheckpointMismatch(CheckpointError, ValueError):
    """A checkpoint saved by a different model or optimiser than the one restoring it."""


class _Damaged(Exception):
    """A checkpoint that fits the target but cannot be read back intact."""


def _quiet_closed_loop_callbacks() -> None:
    """When orbax fails to read a damaged checkpoint, tensorstore still completes the reads it
    had started and calls back into the asyncio loop orbax has closed by then; Python reports
    each as an unraisable "Event loop is closed" traceback, after the one-line error. Those
    (and only those) are dropped; every other unraisable exception goes to the previous hook."""
    previous = sys.unraisablehook

    def hook(unraisable):
        e, tb = unraisable.exc_value, unraisable.exc_traceback
        frames = traceback.extract_tb(tb) if tb is not None else []
        if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" and frames
                and frames[-1].name == "_check_closed"):
            return
        previous(unraisable)

    sys.unraisablehook = hook


_quiet_closed_loop_callbacks()


class _BackgroundSaveErrors(logging.Filter):
    """orbax logs the traceback of a background save that failed for want of disk space from
    each thread it passes through, then raises the same exception where the save is awaited;
    loam turns that into a one-line error naming the fix, so the logged copies are dropped. So is
    asyncio's report, when the process ends, of the other writes of that save gathered with the
    failed one ("exception was never retrieved"): the same full disk, once more."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info:
            return True
        path = record.pathname.replace(os.sep, "/")
        source = "orbax/checkpoint" in path or (
            record.name == "asyncio" and "never retrieved" in str(record.msg))
        return not (source and _is_disk_full(record.exc_info[1]))


logging.getLogger("absl").addFilter(_BackgroundSaveErrors())
logging.getLogger("asyncio").addFilter(_BackgroundSaveErrors())


def _everywhere(ok: bool) -> bool:
    """True if `ok` holds on every process of a multi-process run (no communication on one)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _is_disk_full(e: BaseException | None) -> bool:
    return e is not None and ((isinstance(e, OSError) and e.errno == errno.ENOSPC)
                              or "No space left on device" in str(e))


# URL schemes orbax-checkpoint can write arrays to (through tensorstore's kvstore drivers).
CHECKPOINT_SCHEMES = ("gs",)


def check_directory(directory: paths.PathLike) -> None:
    """CheckpointError (one line) if orbax cannot keep checkpoints at `directory`."""
    s = paths.scheme(directory)
    if paths.is_local(directory) or s in CHECKPOINT_SCHEMES or s not in paths.PACKAGES:
        paths.Path(directory)  # an unknown scheme or a missing filesystem package is named here
        return
    raise CheckpointError(
        f"{directory}: orbax-checkpoint saves arrays only to local paths and gs:// (its "
        f"tensorstore spec has no {s}:// form), so a run cannot keep its checkpoints there. Use "
        f"gs://, a local path, or the bucket mounted as a local path (the same on every host)")


def _save_failure(directory, step: int | None, e: BaseException) -> BaseException:
    """A full disk or an unwritable directory as a CheckpointError naming the fix; anything
    else is returned unchanged (a bug keeps its traceback)."""
    text = one_line(e)
    what = f"saving checkpoint {step}" if step is not None else "saving a checkpoint"
    if _is_disk_full(e):
        return CheckpointError(
            f"{what} in {directory} failed: No space left on device (the disk is full). The "
            "checkpoints saved before it are intact: free some space (or lower "
            "keep_checkpoints) and rerun the same command to resume")
    if isinstance(e, PermissionError) or "Permission denied" in text:
        return CheckpointError(f"{what} in {directory} failed: permission denied; make the "
                               "directory writable and rerun the same command to resume")
    return e


@jax.jit
def fingerprint(params) -> jax.Array:
    return jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(params)])


def _close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= 1e-4 * np.abs(b) + 1e-6))


def _key_name(key) -> str:
    """A path entry as orbax names it (a NamedTuple's field, a tuple's index, a dict's key)."""
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of a tree of arrays, ShapeDtypeStructs or orbax ArrayMetadata."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))
    out = {}
    for path, leaf in flat:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out["/".join(_key_name(k) for k in path)] = (tuple(leaf.shape),
                                                          str(np.dtype(leaf.dtype)))
    return out


def _reason(e: BaseException) -> str:
    text = one_line(e)
    if len(text) > 300:
        text = text[:300].rsplit(" ", 1)[0] + " …"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Checkpointer:
    def __init__(self, directory: paths.PathLike, keep: int = 3, async_save: bool = True):
        check_directory(directory)
        self.directory = paths.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        # Handlers registered up front: orbax reads an item's metadata only for known handlers.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, force: bool = False):
        meta = dict(meta, fingerprint=np.asarray(fingerprint(state.params)).tolist())
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 - re-raised, as a one-line error where it is one
            raise _save_failure(self.directory, step, e) from e

    def wait(self):
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised, as a one-line error where it is one
            raise _save_failure(self.directory, None, e) from e

    # ----------------------------------------------------------------------- fit or damage

    def _saved_tree(self, step: int):
        try:
            metadata = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - unreadable metadata is damage
            raise _Damaged(f"its metadata cannot be read ({_reason(e)})") from e
        if metadata is None:
            raise _Damaged("its state metadata is missing")
        return getattr(metadata, "tree", metadata)

    def check_fits(self, step: int, abstract, subtree: str | None = None) -> None:
        """Raises CheckpointMismatch naming the first parameter whose path, shape or dtype
        differs between checkpoint `step` and `abstract` (the whole state, or one subtree such
        as "params"); _Damaged if the saved tree cannot be read."""
        saved = self._saved_tree(step)
        if subtree is not None:
            if not isinstance(saved, dict) or subtree not in saved:
                raise _Damaged(f"its state has no {subtree!r}")
            saved = saved[subtree]
        have, want = _leaves(saved), _leaves(abstract)
        prefix = f"{subtree}/" if subtree else ""
        problems = []
        for path, (shape, dtype) in want.items():
            if path not in have:
                problems.append(f"{prefix}{path} {shape} {dtype} is in this config's model but "
                                "not in the checkpoint")
            elif have[path] != (shape, dtype):
                problems.append(f"{prefix}{path} is {have[path][0]} {have[path][1]} in the "
                                f"checkpoint but {shape} {dtype} in this config's model")
        problems += [f"{prefix}{path} {have[path][0]} {have[path][1]} is in the checkpoint but "
                     "not in this config's model" for path in have if path not in want]
        if problems:
            n = len(problems) - 1
            more = f" (and {n} more difference{'s' if n > 1 else ''})" if n else ""
            raise CheckpointMismatch(
                f"checkpoint {step} in {self.directory} was saved by a different model or "
                f"optimizer: {problems[0]}{more}. Nothing was changed; "
                + _MISMATCH_FIX.format(run=self.directory.parent, step=step))

    def _restore(self, step: int, abstract_state):
        self.check_fits(step, abstract_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            state, meta = restored["state"], restored["meta"]
            ok = _close(fingerprint(state.params), meta["fingerprint"])
        except Exception as e:  # noqa: BLE001 - it fits, so a failure to read it is damage
            raise _Damaged(f"it does not restore ({_reason(e)})") from e
        if not ok:
            raise _Damaged("its parameters do not match the fingerprint saved with them")
        return state, meta

    def _damaged_error(self, step: int, why: str) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        return CheckpointError(
            f"checkpoint {step} in {self.directory} is damaged: {why}. Use another step"
            + (f" (the others: {others})" if others else "")
            + " or restore it from a backup")

    # ----------------------------------------------------------------------- restoring

    def restore(self, step: int, abstract_state):
        """(state, meta) of checkpoint `step`: CheckpointMismatch if it does not fit
        `abstract_state`, CheckpointError if it is damaged. Changes nothing on disk."""
        try:
            return self._restore(step, abstract_state)
        except _Damaged as e:
            raise self._damaged_error(step, str(e)) from None

    def restore_params(self, step: int, abstract_params):
        """The parameters of checkpoint `step` alone (no optimizer state), placed as
        `abstract_params` says (any mesh, any device count). Errors as `restore`."""
        try:
            self.check_fits(step, abstract_params, subtree="params")
            target = {"params": abstract_params}
            checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
            try:
                restored = checkpointer.restore(
                    self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
                        item=target, partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
                meta = self._manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
                params = jax.tree.unflatten(jax.tree.structure(abstract_params),
                                            jax.tree.leaves(restored["params"]))
                ok = _close(fingerprint(params), meta["fingerprint"])
            except Exception as e:  # noqa: BLE001
                raise _Damaged(f"it does not restore ({_reason(e)})") from e
            finally:
                checkpointer.close()
            if not ok:
                raise _Damaged("its parameters do not match the fingerprint saved with them")
            return params
        except _Damaged as e:
            raise self._damaged_error(step, str(e)) from None

    def restore_latest(self, abstract_state, max_step: int | None = None):
        """(state, meta) of the newest intact checkpoint at or before `max_step`; None only
        when there is no checkpoint at all. A damaged one is moved aside and the previous one
        tried; a mismatch (CheckpointMismatch) stops at once; CheckpointError if none is
        intact."""
        moved = []
        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                restored, why = self._restore(step, abstract_state), ""
            except _Damaged as e:
                restored, why = None, str(e)
            # Each host reads only its own shards, so a read error may show on one host alone:
            # the hosts agree before any of them moves the checkpoint aside or trains from it.
            if _everywhere(not why):
                return restored
            why = why or "damaged as another process read it"
            dest = self._move_aside(step)
            moved.append(step)
            log.info("checkpoint %d in %s is damaged (%s); moved to %s", step, self.directory,
                     why, dest)
            print(f"WARNING: checkpoint {step} is corrupt or incomplete ({why}); moved it to "
                  f"{dest} and falling back to the previous one", flush=True)
        damaged = self.directory / DAMAGED_DIR
        if moved or (not self.steps() and paths.iterdir(damaged)):
            what = (f"every checkpoint in {self.directory} is damaged (steps {moved} moved to "
                    f"{damaged})" if moved else
                    f"{self.directory} holds no intact checkpoint, only damaged ones in {damaged}")
            raise CheckpointError(
                f"{what}; nothing was trained over them. Restore them from a backup, or train "
                f"into a new workdir; to start this one over from step 0, move {damaged} away")
        return None

    def _move_aside(self, step: int) -> paths.epath.Path:
        """Renames checkpoint `step` into damaged/ (process 0; the others wait for it)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.directory / DAMAGED_DIR / f"{step}.{stamp}"
        n = 1
        while paths.exists(dest):
            dest, n = self.directory / DAMAGED_DIR / f"{step}.{stamp}.{n}", n + 1
        if jax.process_index() == 0:
            paths.mkdir(dest.parent)
            paths.rename(self.directory / str(step), dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"loam_damaged_{step}")
        self._manager.reload()
        return dest

    def close(self):
        self._manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore places arrays onto this mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
