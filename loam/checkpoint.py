"""Orbax checkpoints holding everything a run needs to continue exactly.

A checkpoint has two items: `state` (params, optimiser state, step: sharded arrays, restored onto
whatever mesh the resuming run uses) and `meta` (JSON: the data stream's position, the RNG seed,
and a fingerprint of the parameters). The fingerprint — per-leaf sums computed on device — catches a
checkpoint whose files are readable but whose values are damaged; orbax's own atomic rename keeps
half-written checkpoints out of the listing. A damaged latest checkpoint is reported and the
previous one is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger("loam")


@jax.jit
def fingerprint(params) -> jax.Array:
    return jnp.stack([jnp.sum(jnp.abs(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(params)])


def _close(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= 1e-4 * np.abs(b) + 1e-6))


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state, meta: dict, force: bool = False):
        meta = dict(meta, fingerprint=np.asarray(fingerprint(state.params)).tolist())
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def wait(self):
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state):
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        state, meta = restored["state"], restored["meta"]
        if not _close(fingerprint(state.params), meta["fingerprint"]):
            raise ValueError("parameter fingerprint does not match the one saved with it")
        return state, meta

    def restore_latest(self, abstract_state, max_step: int | None = None):
        """The newest checkpoint that restores intact (at or before `max_step`), or None."""
        for step in reversed(self.steps()):
            if max_step is not None and step > max_step:
                continue
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # any damage: unreadable files, bad metadata, wrong values
                log.warning("checkpoint at step %d in %s is corrupt or incomplete (%s: %s); "
                            "falling back to the previous one", step, self.directory,
                            type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
                print(f"WARNING: checkpoint {step} is corrupt or incomplete "
                      f"({type(e).__name__}); falling back to the previous one", flush=True)
        return None

    def close(self):
        self._manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs carrying the target shardings: restore places arrays onto this mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
