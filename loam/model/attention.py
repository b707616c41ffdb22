"""The attention core (scores, mask, softmax, weighted values) with its own VJP.

``attend`` computes softmax(q kᵀ, masked) v for grouped-query heads with the numbers of
differentiating the plain einsum/softmax path (``attend_reference``), and less work:

- the backward pass uses the saved probabilities P and the row sums of dO ⊙ O
  (dS = P ⊙ (dP − rowsum(dO ⊙ O))), where autodiff of the softmax re-derives the normaliser
  and takes extra passes over the [Q, S] scores;
- the heads are laid out once as [B, G, R, Q, K] (R query heads share a key/value head), so
  every matmul is one batched matmul over contiguous [Q, K] / [S, K] tiles, forward and
  backward, instead of the transposes autodiff inserts around each einsum.

Rows that see no key at all (padding: segment 0) come out as zeros, where the plain path gives
the mean of the values, and pass no gradient back. Nothing reads them: the loss weighs padding
0 and no other position attends to it, so the loss and every gradient are the same.

``attend_splash`` is causal attention within segments by TPU's splash-attention kernel (Pallas:
blocks above the diagonal are skipped, the [Q, S] scores never reach HBM). It knows no
bidirectional prefix, so a model using it trains causal objectives only. Elsewhere than on a TPU
the same kernel runs in Pallas's interpreter (slow; for checking the numbers on a CPU).

``attend_cudnn`` is the same softmax(q kᵀ masked) v by cuDNN's fused flash attention on an
NVIDIA GPU (``jax.nn.dot_product_attention(implementation="cudnn")``): any mask, the prefix
included, reaches the kernel as an additive bias, and the scores stay on chip. cuDNN computes in
bfloat16 (or float16) only and needs JAX's CUDA plugin: on another backend it cannot be traced.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from loam.model.sharding import BATCH_AXES

Array = jax.Array
_NEG = jnp.finfo(jnp.float32).min


def attend_reference(q_BxQxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, mask_BxQxS: Array,
                     dtype) -> Array:
    """The plain path, differentiated by autodiff: the numbers ``attend`` reproduces."""
    b, length, h, k = q_BxQxHxK.shape
    g = k_BxSxGxK.shape[2]
    q_BxQxGxRxK = q_BxQxHxK.reshape(b, length, g, h // g, k)
    scores = jnp.einsum("bqgrk,bsgk->bgrqs", q_BxQxGxRxK, k_BxSxGxK,
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BxQxS[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bgrqs,bsgk->bqgrk", probs, v_BxSxGxK)
    return out.reshape(b, length, h, k)


def _heads(x_BxQxHxK: Array, g: int) -> Array:
    """[B, Q, H, K] -> [B, G, R, Q, K]."""
    b, length, h, k = x_BxQxHxK.shape
    return x_BxQxHxK.reshape(b, length, g, h // g, k).transpose(0, 2, 3, 1, 4)


def _unheads(x_BxGxRxQxK: Array) -> Array:
    """[B, G, R, Q, K] -> [B, Q, H, K]."""
    b, g, r, length, k = x_BxGxRxQxK.shape
    return x_BxGxRxQxK.transpose(0, 3, 1, 2, 4).reshape(b, length, g * r, k)


def _kv_heads(x_BxSxGxK: Array) -> Array:
    """[B, S, G, K] <-> [B, G, S, K]."""
    return x_BxSxGxK.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxQxS, dtype):
    return _attend_fwd(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxQxS, dtype)[0]


def _attend_fwd(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxQxS, dtype):
    qh = _heads(q_BxQxHxK, k_BxSxGxK.shape[2])
    kh, vh = _kv_heads(k_BxSxGxK), _kv_heads(v_BxSxGxK)
    s = jnp.einsum("bgrqk,bgsk->bgrqs", qh, kh, preferred_element_type=jnp.float32)
    s = jnp.where(mask_BxQxS[:, None, None], s, _NEG)
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    # Rows that see no key get probabilities 0 (not uniform), so masked entries are exactly 0
    # everywhere and the backward pass needs no mask. Kept in the compute type, as the plain
    # path feeds them to the values' matmul.
    seen = jnp.any(mask_BxQxS, axis=-1)[:, None, None, :, None]
    p = (e * (seen / jnp.sum(e, axis=-1, keepdims=True))).astype(dtype)
    oh = jnp.einsum("bgrqs,bgsk->bgrqk", p, vh)
    return _unheads(oh), (qh, kh, vh, oh, p)


def _attend_bwd(dtype, res, do_BxQxHxK):
    qh, kh, vh, oh, p = res
    doh = _heads(do_BxQxHxK, kh.shape[1]).astype(dtype)
    f32 = jnp.float32
    # rowsum(dP ⊙ P) = rowsum(dO ⊙ O): one pass over [Q, K] instead of one over [Q, S].
    delta = jnp.sum(doh.astype(f32) * oh.astype(f32), axis=-1, keepdims=True)
    dp = jnp.einsum("bgrqk,bgsk->bgrqs", doh, vh, preferred_element_type=f32)
    # Masked entries pass no gradient (as through the reference's select): their P is 0.
    ds = (p.astype(f32) * (dp - delta)).astype(dtype)
    dq = jnp.einsum("bgrqs,bgsk->bgrqk", ds, kh, preferred_element_type=f32)
    dk = jnp.einsum("bgrqs,bgrqk->bgsk", ds, qh, preferred_element_type=f32)
    dv = jnp.einsum("bgrqs,bgrqk->bgsk", p, doh, preferred_element_type=f32)
    return (_unheads(dq).astype(qh.dtype), _kv_heads(dk).astype(kh.dtype),
            _kv_heads(dv).astype(vh.dtype), None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(q_BxQxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, mask_BxQxS: Array,
           dtype) -> Array:
    """softmax(q kᵀ masked) v: [B, Q, H, K] queries over [B, S, G, K] keys and values (H a
    multiple of G), ``mask_BxQxS`` True where a query sees a key; the queries carry their
    scale. Scores and softmax in float32, matmul operands in ``dtype``."""
    return _attend(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxQxS, jnp.dtype(dtype))


def attend_causal_blocks(q_BxQxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array,
                         mask_BxQxS: Array, dtype, block: int) -> Array:
    """`attend` for a causal mask (no query sees a later key; packed segments allowed), in
    query blocks of ``block`` rows (the last may be shorter): block i attends only to the keys
    up to its last row, so the score blocks above the diagonal, all masked, are never computed
    (a quarter of the scores at two blocks, three eighths at four). The result equals
    `attend`'s; a mask that lets a query see a later key (a bidirectional prefix) would be cut,
    so the model refuses a prefix with it."""
    length = q_BxQxHxK.shape[1]
    if length <= block:
        return attend(q_BxQxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxQxS, dtype)
    outs = []
    for lo in range(0, length, block):
        hi = min(lo + block, length)
        outs.append(attend(q_BxQxHxK[:, lo:hi], k_BxSxGxK[:, :hi], v_BxSxGxK[:, :hi],
                           mask_BxQxS[:, lo:hi, :hi], dtype))
    return jnp.concatenate(outs, axis=1)


CUDNN_DTYPES = ("bfloat16",)  # of the model's compute types (cuDNN: bfloat16, float16)


def attend_cudnn(q_BxQxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, mask_BxQxS: Array,
                 dtype, implementation: Literal["cudnn", "xla"] = "cudnn") -> Array:
    """`attend` by cuDNN's fused attention (shapes and mask as there, queries carrying their
    scale). Padding rows (no visible key) see themselves instead, so the kernel never
    normalises an empty row; nothing reads them, as in `attend`. ``implementation="xla"``: the
    same call computed by XLA (what checks it away from a GPU)."""
    length = q_BxQxHxK.shape[1]
    own = jnp.eye(length, k_BxSxGxK.shape[1], dtype=bool)[None]
    empty_BxQ = ~jnp.any(mask_BxQxS, axis=-1)
    mask_BxQxS = mask_BxQxS | (own & empty_BxQ[:, :, None])
    out = jax.nn.dot_product_attention(
        q_BxQxHxK.astype(dtype), k_BxSxGxK.astype(dtype), v_BxSxGxK.astype(dtype),
        mask=mask_BxQxS[:, None], scale=1.0, implementation=implementation)
    return out.astype(dtype)


# The splash kernel's tile edge: the largest of these dividing the sequence (a multiple of 128).
SPLASH_BLOCKS = (512, 256, 128)


def _splash_kernel(length: int, heads: int, interpret: bool):
    if length % SPLASH_BLOCKS[-1]:
        raise ValueError(f"attention_impl='splash' tiles the sequence in blocks of "
                         f"{SPLASH_BLOCKS[-1]} (the TPU's lane width), but the sequence is "
                         f"{length} long: use a multiple of {SPLASH_BLOCKS[-1]} "
                         "(data.seq_len), or attention_impl='manual'")
    block = next(b for b in SPLASH_BLOCKS if length % b == 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes,
                                  interpret=interpret)


def attend_splash(q_BxQxHxK: Array, k_BxSxGxK: Array, v_BxSxGxK: Array, segment_ids_BxL: Array,
                  dtype) -> Array:
    """Causal softmax(q kᵀ) v within segments (a query sees the keys of its own segment up to
    itself) by the splash-attention kernel; shapes as ``attend``, queries carrying their scale.
    Padding (segment 0) attends to padding, which nothing reads. Under an active mesh the kernel
    runs per device (shard_map): rows over the batch axes, heads over "tensor" when both head
    counts divide by it."""
    b, length, h, _ = q_BxQxHxK.shape
    g = k_BxSxGxK.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    kernel = _splash_kernel(length, h, interpret=platform != "tpu")

    def run(q_BxHxQxK, k_BxGxSxK, v_BxGxSxK, seg_BxL):
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s)))(
            q_BxHxQxK, k_BxGxSxK, v_BxGxSxK, seg_BxL)

    q = q_BxQxHxK.astype(dtype).transpose(0, 2, 1, 3)
    k = k_BxSxGxK.astype(dtype).transpose(0, 2, 1, 3)
    v = v_BxSxGxK.astype(dtype).transpose(0, 2, 1, 3)
    seg = segment_ids_BxL.astype(jnp.int32)
    if not mesh.empty:
        rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
        t = mesh.shape["tensor"]
        batch = BATCH_AXES if b % rows == 0 else None
        heads = "tensor" if h % t == 0 and g % t == 0 else None
        spec = P(batch, heads, None, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)),
                            out_specs=spec, check_vma=False)
    return run(q, k, v, seg).transpose(0, 2, 1, 3)
