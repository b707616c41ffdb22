"""The device mesh and the one table that maps logical axis names onto it.

Parameters and activations name their axes logically ("embed", "heads", ...); ``LOGICAL_RULES``
alone says which mesh axis shards each. Data parallelism shards the batch over ("data", "fsdp"),
FSDP additionally shards every weight's embed axis over "fsdp" (gathered per layer by XLA), and
tensor parallelism shards heads / MLP / vocab over "tensor". A 1-device mesh runs the same code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Order matters: a mesh axis is used at most once per array, first rule wins. "batch" comes
# before "embed", so activations [batch, length, embed] shard the batch and keep embed whole,
# while weights (no batch axis) shard embed over fsdp.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("kv", None),
    ("layers", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor"); one size may be -1 for "all the rest"."""
    devices = list(jax.devices() if devices is None else devices)
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh sizes {tuple(shape)} invalid: use positive sizes and at most "
                         "one -1 (meaning the remaining devices)")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {tuple(shape)}; "
                             f"the fixed sizes ({known}) must divide the device count")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) > len(devices):
        raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices but only "
                         f"{len(devices)} exist (on CPU, set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=N before importing jax)")
    grid = np.asarray(devices[: math.prod(shape)], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh + rules in context, so the model's logical constraints take effect when traced."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (those dimensions stay whole)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if names and dim % size == 0 else None)
    return P(*out)


def logical_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a tree holding nn.LogicallyPartitioned boxes (e.g. from eval_shape).

    The result has the structure of the *unboxed* tree; leaves without axis names replicate.
    """
    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            spec = nn.logical_to_mesh_axes(x.names, LOGICAL_RULES)
            if spec is None:  # flax returns None only for names=None: no axis names, replicate
                return NamedSharding(mesh, P())
            return NamedSharding(mesh, _fit(spec, x.value.shape, mesh))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, abstract_tree,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Every batch feature is [B, L]: rows split over ("data", "fsdp")."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a host batch on the mesh (each process passes its own rows on multi-host)."""
    sharding = batch_sharding(mesh)
    rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
    out = {}
    for name, value in batch.items():
        if value.shape[0] * jax.process_count() % rows:
            raise ValueError(f"batch feature {name!r} has {value.shape[0]} rows per process; "
                             f"the global batch must be divisible by data*fsdp={rows}")
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out
