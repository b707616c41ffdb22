"""The output projection fused with the cross-entropy, in chunks of the sequence, with its own VJP.

`projected_nll` takes the final hidden states and the output matrix and returns the per-token
negative log-likelihood and log-partition (logsumexp) together with the training objective
Σ a·nll + Σ b·lse², where ``a`` (loss weights, times any per-token weights) and ``b`` (z-loss
coefficient times loss weights) are data, not differentiated. The vocabulary-sized logits of one
chunk of positions exist at a time and never whole: at the peer-a shape (4,096 tokens per step,
16,384 ids) the unfused path writes and re-reads 268 MB of float32 logits, softmax probabilities
and their cotangent each step.

Because the objective's weights are known in the forward pass, the gradient of the objective with
respect to the hidden states and to the output matrix is computed there too, chunk by chunk, from
the probabilities just computed (d objective / d logits = a·(p - onehot) + 2·b·lse·p), and the
backward pass only scales it by the incoming cotangent. The matmul count is that of the unfused
path (one forward and two backward products of the projection); nothing is recomputed.

Chunks run along the sequence axis (all rows of a chunk of positions at once), so a batch sharded
over its rows stays sharded the same way in every chunk. Everything is float32 from the logits
on; the hidden states and the output matrix enter the matmuls in the model's compute type.
The outputs nll and lse carry no gradient: callers use them for logs and aux sums only.
Logical axis constraints keep a chunk's logits sharded like the model's ("batch", "vocab") and
the output matrix's gradient accumulator like the matrix ("embed", "vocab"), so under FSDP it is
never replicated (at Llama-3-8B's shape it is 2.1 GB).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from loam.model import sharding as shd

Array = jax.Array

# Positions per chunk are picked so that one chunk's float32 logits (rows x positions x vocab)
# stay near this many bytes: small enough to stay out of main memory's way, large enough that
# each chunk's matmuls are efficient.
CHUNK_BYTES = 16 * 2**20


def _local(rows: int, vocab: int) -> tuple[int, int]:
    """Rows and vocabulary ids one device holds under the active mesh (if any): the batch is
    split over the batch axes, the vocabulary over "tensor"."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return rows, vocab
    shape = dict(mesh.shape)
    batch = math.prod(shape.get(a, 1) for a in shd.BATCH_AXES)
    tensor = shape.get("tensor", 1)
    return (max(1, rows // batch) if rows % batch == 0 else rows,
            max(1, vocab // tensor) if vocab % tensor == 0 else vocab)


def chunk_length(rows: int, length: int, vocab: int, budget: int = CHUNK_BYTES) -> int:
    """The largest divisor of ``length`` whose chunk of float32 logits fits ``budget`` (>= 1)."""
    best = 1
    for c in range(1, length + 1):
        if length % c == 0 and rows * c * vocab * 4 <= budget:
            best = c
    return best


def _chunk(x_BxCxD: Array, t_BxC: Array, w_dt: Array, tied: bool):
    """One chunk flattened to its N = rows x positions tokens (2-D matmuls: XLA:CPU's fast path):
    (x_NxD in the compute type, float32 logits_NxV, lse_N, target logit_N, onehot_NxV).
    w_dt, in the compute type, is [V, D] when tied (the embedding), else [D, V]."""
    rows, c, d = x_BxCxD.shape
    x_NxD = x_BxCxD.reshape(rows * c, d).astype(w_dt.dtype)
    dims = (((1,), (1,)), ((), ())) if tied else (((1,), (0,)), ((), ()))
    logits = nn.with_logical_constraint(
        jax.lax.dot_general(x_NxD, w_dt, dims, preferred_element_type=jnp.float32),
        ("batch", "vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    t_N = t_BxC.reshape(-1)
    onehot = jnp.arange(logits.shape[-1], dtype=t_N.dtype) == t_N[:, None]
    target = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    return x_NxD, logits, lse, target, onehot


def _chunks(x: Array, c: int) -> Array:
    """[B, L, ...] -> [L/c, B, c, ...] (scan runs over the leading axis)."""
    b, length = x.shape[:2]
    return jnp.moveaxis(x.reshape((b, length // c, c) + x.shape[2:]), 1, 0)


def _unchunk(x: Array) -> Array:
    """[L/c, B, c, ...] -> [B, L, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((b, n * c) + x.shape[3:])


def _forward(x_BxLxD, w, targets_BxL, tied, dtype, chunk):
    """(nll, lse) [B, L] without gradients, one chunk of logits at a time."""
    w_dt = w.astype(dtype)

    def body(_, xs):
        x_BxCxD, t_BxC = xs
        _, _, lse, target, _ = _chunk(x_BxCxD, t_BxC, w_dt, tied)
        return None, ((lse - target).reshape(t_BxC.shape), lse.reshape(t_BxC.shape))

    _, (nll, lse) = jax.lax.scan(body, None, (_chunks(x_BxLxD, chunk),
                                              _chunks(targets_BxL, chunk)))
    return _unchunk(nll), _unchunk(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(x_BxLxD, w, targets_BxL, a_BxL, b_BxL, tied, dtype, chunk):
    nll, lse = _forward(x_BxLxD, w, targets_BxL, tied, dtype, chunk)
    return jnp.sum(a_BxL * nll) + jnp.sum(b_BxL * jnp.square(lse)), nll, lse


def _fused_fwd(x_BxLxD, w, targets_BxL, a_BxL, b_BxL, tied, dtype, chunk):
    vocab = w.shape[0] if tied else w.shape[1]
    d = x_BxLxD.shape[-1]
    w_dt = w.astype(dtype)

    def body(dw_DxV, xs):
        x_BxCxD, t_BxC, a_BxC, b_BxC = xs
        rows, c = t_BxC.shape
        x_NxD, logits, lse, target, onehot = _chunk(x_BxCxD, t_BxC, w_dt, tied)
        a_N, b_N = a_BxC.reshape(-1), b_BxC.reshape(-1)
        p = jnp.exp(logits - lse[:, None])
        # d(a·nll + b·lse²)/d logits = a (p - onehot) + 2 b lse p
        g_NxV = ((a_N + 2.0 * b_N * lse)[:, None] * p
                 - jnp.where(onehot, a_N[:, None], 0.0)).astype(dtype)
        # dx = g w (tied, w [V, D]) or g w^T (w [D, V])
        dx_NxD = jax.lax.dot_general(g_NxV, w_dt, (((1,), (0 if tied else 1,)), ((), ())),
                                     preferred_element_type=jnp.float32)
        # dw as [D, V] either way (x^T g): contracts the tokens with g as it lies, so the
        # vocabulary-sized g is never transposed; tied weights transpose once at the end.
        dw_DxV = nn.with_logical_constraint(
            dw_DxV + jax.lax.dot_general(x_NxD, g_NxV, (((0,), (0,)), ((), ())),
                                         preferred_element_type=jnp.float32), ("embed", "vocab"))
        return dw_DxV, ((lse - target).reshape(rows, c), lse.reshape(rows, c),
                        dx_NxD.reshape(rows, c, d))

    xs = (_chunks(x_BxLxD, chunk), _chunks(targets_BxL, chunk), _chunks(a_BxL, chunk),
          _chunks(b_BxL, chunk))
    dw0 = nn.with_logical_constraint(jnp.zeros((d, vocab), jnp.float32), ("embed", "vocab"))
    dw, (nll, lse, dx) = jax.lax.scan(body, dw0, xs)
    # Kept for the backward pass: sharded like the weight it is the gradient of.
    dw = nn.with_logical_constraint(dw.T if tied else dw,
                                    ("vocab", "embed") if tied else ("embed", "vocab"))
    nll, lse, dx = _unchunk(nll), _unchunk(lse), _unchunk(dx)
    objective = jnp.sum(a_BxL * nll) + jnp.sum(b_BxL * jnp.square(lse))
    residuals = (dx.astype(x_BxLxD.dtype), dw.astype(w.dtype), targets_BxL, a_BxL, b_BxL)
    return (objective, nll, lse), residuals


def _fused_bwd(tied, dtype, chunk, residuals, cotangents):
    del tied, dtype, chunk
    dx, dw, targets, a, b = residuals
    g = cotangents[0]  # nll and lse are returned under stop_gradient by projected_nll
    return ((g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype),
            _zero_cotangent(targets), jnp.zeros_like(a), jnp.zeros_like(b))


def _zero_cotangent(x: Array):
    if jnp.issubdtype(x.dtype, jnp.integer):
        return jnp.zeros(x.shape, jax.dtypes.float0)
    return jnp.zeros_like(x)


_fused.defvjp(_fused_fwd, _fused_bwd)


def projected_nll(x_BxLxD: Array, w: Array, targets_BxL: Array, a_BxL: Array, b_BxL: Array,
                  *, tied: bool, dtype=jnp.float32, chunk: int | None = None
                  ) -> tuple[Array, Array, Array]:
    """(objective, nll_BxL, lse_BxL) of logits = x·w (x·wᵀ when ``tied``: w is the [V, D]
    embedding), computed ``chunk`` positions at a time (None: `chunk_length`'s pick).

    objective = Σ a·nll + Σ b·lse² is differentiable in x and w (not in a, b); nll and lse are
    float32 and carry no gradient. ``dtype`` is the matmuls' operand type (the model's compute
    type); logits, probabilities and sums are float32.
    """
    rows, length = targets_BxL.shape
    vocab = w.shape[0] if tied else w.shape[1]
    if chunk is None:  # sized by what one device holds
        local_rows, local_vocab = _local(rows, vocab)
        chunk = chunk_length(local_rows, length, local_vocab)
    if chunk < 1 or length % chunk:
        raise ValueError(f"loss chunk {chunk} must divide the sequence length {length}")
    objective, nll, lse = _fused(x_BxLxD, w, targets_BxL, a_BxL.astype(jnp.float32),
                                 b_BxL.astype(jnp.float32), tied, jnp.dtype(dtype), chunk)
    return objective, jax.lax.stop_gradient(nll), jax.lax.stop_gradient(lse)
