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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
