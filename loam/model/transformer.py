"""Decoder-only transformer in flax.linen: RMSNorm, rotary positions, SwiGLU, GQA, scanned layers.

Every parameter carries logical axis names (``nn.with_logical_partitioning``) and the main
activations carry logical constraints, so ``loam.model.sharding.LOGICAL_RULES`` alone decides how
the model is laid out on a mesh. Constraints are no-ops unless rules and a mesh are active.

Packed batches: attention is restricted to the same nonzero segment (causal, plus a bidirectional
prefix where ``prefix == 1``) and rotary angles come from the ``positions`` feature, so an example
packed after another sees exactly what it would see alone.

Mixed precision is the config's ``dtype`` (compute) against ``param_dtype`` (stored weights):
with dtype="bfloat16" the matmuls and activations run in bfloat16 on float32 weights (so
gradients and optimizer moments stay float32), while norms, softmax, rotary angles and the
logits are computed in float32; the loss is taken from float32 logits (``loam.step``).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from loam.model import attention as attn_lib

Array = jax.Array
FLOAT_DTYPES = ("float32", "bfloat16")
LOSS_IMPLS = ("fused", "logits")
ATTENTION_IMPLS = ("manual", "xla", "splash", "causal_blocks", "cudnn")
# Implementations that compute causal attention only (they skip the blocks above the diagonal):
# the model refuses a prefix with them, the step passes none.
CAUSAL_ONLY = ("splash", "causal_blocks")
RESIDUALS = ("dots", "all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Transformer. Hashable, so it can be a static jit argument."""

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None -> n_heads (multi-head); fewer -> grouped-query
    head_dim: int | None = None  # None -> d_model // n_heads
    mlp_dim: int = 1024
    max_len: int = 1024  # longest sequence the model accepts (rotary has no table to outgrow)
    tied_embeddings: bool = True
    remat: bool = False
    dtype: str = "float32"  # compute dtype: "float32", or "bfloat16" for mixed precision
    param_dtype: str = "float32"  # stored (master) weights
    rope_theta: float = 10_000.0
    # How the step is computed; none of these changes the numbers beyond float rounding.
    # "fused": the training loss takes the output projection and cross-entropy a chunk of
    # positions at a time with its own VJP (loam.model.loss), never the whole logits;
    # "logits": the full logits, then the loss.
    loss_impl: str = "fused"
    # Layers run as one scanned body (1: one compiled layer, the fastest compile) or unrolled
    # by this factor (n_layers: fully unrolled, no stacked residual buffers).
    scan_unroll: int = 1
    # "manual": the attention core with its own VJP (loam.model.attention); "xla": the plain
    # einsum/softmax path, differentiated by autodiff; "splash": TPU's fused causal kernel
    # (interpreted elsewhere), causal attention only: the model then refuses a prefix;
    # "causal_blocks": the manual core per block of `attention_block` query rows, over the keys
    # up to the block's end (the score blocks above the diagonal are never computed), causal
    # attention only too; "cudnn": cuDNN's fused flash attention on an NVIDIA GPU (bfloat16
    # compute; any mask, the prefix included).
    attention_impl: str = "manual"
    attention_block: int = 128
    # What the backward pass keeps from each layer's forward pass when remat is off: "dots",
    # the outputs of the weight matmuls (norms, rotary, SwiGLU and the attention core are
    # recomputed in the backward pass, cheaper on a CPU than storing and re-reading them), or
    # "all", everything autodiff saves. remat=True keeps only each layer's input.
    residuals: str = "dots"

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in FLOAT_DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r} is not a supported float "
                                 f"type; choose one of {', '.join(FLOAT_DTYPES)}")
        # Resolve the None defaults in place, so the fields (and repr, equality, hash) hold the
        # numbers the model uses; code that needs an int reads kv_heads / head_size.
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads="
                             f"{self.n_heads}; set head_dim explicitly or change n_heads")
        object.__setattr__(self, "n_kv_heads", self.kv_heads)
        object.__setattr__(self, "head_dim", self.head_size)
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads="
                             f"{self.kv_heads} for grouped-query attention")
        if self.attention_block < 1:
            raise ValueError(f"attention_block={self.attention_block} must be >= 1 (query rows "
                             "per block of attention_impl='causal_blocks')")
        for field, choices in (("loss_impl", LOSS_IMPLS), ("attention_impl", ATTENTION_IMPLS),
                               ("residuals", RESIDUALS)):
            if getattr(self, field) not in choices:
                raise ValueError(f"{field}={getattr(self, field)!r}; choose one of "
                                 f"{', '.join(choices)}")
        if self.attention_impl == "cudnn" and self.dtype not in attn_lib.CUDNN_DTYPES:
            raise ValueError(f"attention_impl='cudnn' computes in bfloat16, but "
                             f"dtype={self.dtype!r}: "
                             "set dtype='bfloat16' (the weights and the loss stay float32), or "
                             "attention_impl='manual'")
        if self.scan_unroll < 1:
            raise ValueError(f"scan_unroll={self.scan_unroll} must be >= 1")
        if self.head_size % 2:
            raise ValueError(f"head_dim={self.head_size} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        """n_kv_heads with its default applied (typed int; the field is None until resolved)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """head_dim with its default applied (typed int; the field is None until resolved)."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self):
        return jnp.dtype(self.param_dtype)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
    return nn.with_logical_constraint(x, names)


def project(x_NxI: Array, w: Array, dtype, out_dtype=None) -> Array:
    """x @ w with w flattened to 2-D [I, O]: token-major 2-D matmuls (and their transposes in
    the backward pass) run ~1.5x faster on XLA:CPU than the equivalent 3-D einsums.
    ``out_dtype`` (e.g. float32 logits from bfloat16 operands) is the accumulation and result
    type; None: ``dtype``."""
    return jnp.dot(x_NxI, w.reshape(x_NxI.shape[-1], -1).astype(dtype),
                   preferred_element_type=out_dtype)


def _param(module: nn.Module, name: str, init, shape, names, cfg: ModelConfig) -> Array:
    # unbox=True is the default; passing it selects flax's overload that types the result as the
    # unboxed array rather than the LogicallyPartitioned box the initialiser returns.
    return module.param(name, nn.with_logical_partitioning(init, names), shape, cfg.weight_dtype,
                        unbox=True)


def _fan_in_init(in_axis, out_axis):
    return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                            in_axis=in_axis, out_axis=out_axis)


class RMSNorm(nn.Module):
    cfg: ModelConfig
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        scale_D = _param(self, "scale", nn.initializers.ones, (self.cfg.d_model,), ("embed",),
                         self.cfg)
        x = x_BxLxD.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale_D.astype(jnp.float32)).astype(self.cfg.compute_dtype)


def rotary(x_BxLxHxK: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotate channel pairs (i, i + K/2) by position * theta^(-2i/K)."""
    half = x_BxLxHxK.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxLx1xF = (positions_BxL.astype(jnp.float32)[:, :, None] * freq)[:, :, None, :]
    sin, cos = jnp.sin(angle_BxLx1xF), jnp.cos(angle_BxLx1xF)
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def attention_mask(segment_ids_BxL: Array, prefix_BxL: Array) -> Array:
    """mask_BxQxS: query i sees key j iff same nonzero segment and (j <= i or prefix[j])."""
    length = segment_ids_BxL.shape[1]
    idx = jnp.arange(length)
    causal_QxS = idx[None, :] <= idx[:, None]
    same_BxQxS = ((segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
                  & (segment_ids_BxL[:, :, None] != 0))
    visible_BxQxS = causal_QxS[None] | (prefix_BxL[:, None, :] == 1)
    return same_BxQxS & visible_BxQxS


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, mask_BxQxS: Array, positions_BxL: Array,
                 kv: dict | None = None, index: Array | None = None):
        """Attention output; with a layer's cache ``kv`` ({"key", "value"}: B x S x G x K), the
        new keys and values are written at slot ``index`` and the queries attend over the whole
        cache (``mask_BxQxS`` over its S slots): returns (output, updated kv). For the splash
        kernel without a cache, ``mask_BxQxS`` is the segment ids [B, L] (the kernel masks
        causally by itself)."""
        cfg = self.cfg
        d, h, kvh, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size
        dt = cfg.compute_dtype
        wq_DxHxK = _param(self, "query", _fan_in_init(0, (1, 2)), (d, h, k),
                          ("embed", "heads", "kv"), cfg)
        wk_DxGxK = _param(self, "key", _fan_in_init(0, (1, 2)), (d, kvh, k),
                          ("embed", "kv_heads", "kv"), cfg)
        wv_DxGxK = _param(self, "value", _fan_in_init(0, (1, 2)), (d, kvh, k),
                          ("embed", "kv_heads", "kv"), cfg)
        wo_HxKxD = _param(self, "out", _fan_in_init((0, 1), 2), (h, k, d),
                          ("heads", "kv", "embed"), cfg)
        b, length = x_BxLxD.shape[:2]
        x_NxD = x_BxLxD.astype(dt).reshape(b * length, d)  # N = B*L tokens
        q_BxLxHxK = project(x_NxD, wq_DxHxK, dt).reshape(b, length, h, k)
        k_BxLxGxK = project(x_NxD, wk_DxGxK, dt).reshape(b, length, kvh, k)
        v_BxLxGxK = project(x_NxD, wv_DxGxK, dt).reshape(b, length, kvh, k)
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "kv"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "kv"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "kv"))
        q_BxLxHxK = rotary(q_BxLxHxK, positions_BxL, cfg.rope_theta) * (k ** -0.5)
        k_BxLxGxK = rotary(k_BxLxGxK, positions_BxL, cfg.rope_theta)
        if kv is not None:
            assert index is not None, "a cache needs the slot to write"
            start = (0, index, 0, 0)
            kv = {"key": jax.lax.dynamic_update_slice(kv["key"], k_BxLxGxK.astype(
                      kv["key"].dtype), start),
                  "value": jax.lax.dynamic_update_slice(kv["value"], v_BxLxGxK.astype(
                      kv["value"].dtype), start)}
            k_BxLxGxK, v_BxLxGxK = kv["key"].astype(dt), kv["value"].astype(dt)  # L -> S slots

        if cfg.attention_impl == "splash" and kv is None:
            out_BxLxHxK = attn_lib.attend_splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxQxS,
                                                 dt)
        elif cfg.attention_impl == "causal_blocks" and kv is None:
            out_BxLxHxK = attn_lib.attend_causal_blocks(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                                        mask_BxQxS, dt, cfg.attention_block)
        elif cfg.attention_impl == "cudnn" and kv is None:
            out_BxLxHxK = attn_lib.attend_cudnn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxQxS, dt)
        elif cfg.attention_impl != "xla":  # with a cache: the manual path
            out_BxLxHxK = attn_lib.attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask_BxQxS, dt)
        else:
            out_BxLxHxK = attn_lib.attend_reference(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK,
                                                    mask_BxQxS, dt)
        out_BxLxHxK = constrain(out_BxLxHxK, ("batch", "length", "heads", "kv"))
        out_NxD = project(out_BxLxHxK.reshape(b * length, h * k), wo_HxKxD, dt)
        if kv is not None:
            return out_NxD.reshape(b, length, d), kv
        return out_NxD.reshape(b, length, d)


class Mlp(nn.Module):
    """SwiGLU: (silu(x W_gate) * x W_up) W_down."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array) -> Array:
        cfg = self.cfg
        dt = cfg.compute_dtype
        shape, names = (cfg.d_model, cfg.mlp_dim), ("embed", "mlp")
        w_gate_DxF = _param(self, "gate", _fan_in_init(0, 1), shape, names, cfg)
        w_up_DxF = _param(self, "up", _fan_in_init(0, 1), shape, names, cfg)
        w_down_FxD = _param(self, "down", _fan_in_init(0, 1), shape[::-1], names[::-1], cfg)
        b, length = x_BxLxD.shape[:2]
        x_NxD = x_BxLxD.astype(dt).reshape(b * length, cfg.d_model)
        gate_NxF = project(x_NxD, w_gate_DxF, dt)
        up_NxF = project(x_NxD, w_up_DxF, dt)
        h_BxLxF = constrain((nn.silu(gate_NxF) * up_NxF).reshape(b, length, cfg.mlp_dim),
                            ("batch", "length", "mlp"))
        out_NxD = project(h_BxLxF.reshape(b * length, cfg.mlp_dim), w_down_FxD, dt)
        return out_NxD.reshape(b, length, cfg.d_model)


class Block(nn.Module):
    """Pre-norm residual block; (carry, None) signature so nn.scan can stack it."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: Array, mask_BxQxS: Array, positions_BxL: Array,
                 kv: dict | None = None, index: Array | None = None):
        h = RMSNorm(self.cfg, name="attn_norm")(x_BxLxD)
        if kv is None:
            x_BxLxD = x_BxLxD + Attention(self.cfg, name="attn")(h, mask_BxQxS, positions_BxL)
        else:  # decoding: the layer's slice of the cache goes in and comes out updated
            out_BxLxD, kv = Attention(self.cfg, name="attn")(h, mask_BxQxS, positions_BxL, kv,
                                                             index)
            x_BxLxD = x_BxLxD + out_BxLxD
        h = RMSNorm(self.cfg, name="mlp_norm")(x_BxLxD)
        x_BxLxD = x_BxLxD + Mlp(self.cfg, name="mlp")(h)
        return constrain(x_BxLxD, ("batch", "length", "embed")), kv


def _block(cfg: ModelConfig):
    """The layer as the scan runs it: rematerialised whole (remat), or keeping only the weight
    matmuls' outputs for the backward pass (residuals="dots"), or plain."""
    if cfg.remat:
        return nn.remat(Block, prevent_cse=False)
    if cfg.residuals == "dots":
        return nn.remat(Block, prevent_cse=False,
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return Block


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, inputs_BxL: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, prefix: Array | None = None,
                 cache: dict | None = None, hidden: bool = False):
        """Logits of every position. With a ``cache`` (see `init_cache`), the inputs are the
        next tokens of the sequences the cache holds: returns (logits, updated cache).
        ``hidden``: the final-normed hidden states [B, L, D] instead of the logits (what the
        fused loss projects itself, see `output_matrix`)."""
        if cache is not None:
            return self._decode(inputs_BxL, segment_ids, positions, cache)
        cfg = self.cfg
        b, length = inputs_BxL.shape
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len={cfg.max_len}; "
                             "raise ModelConfig.max_len or shorten the batch")
        if segment_ids is None:
            segment_ids = jnp.ones((b, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        if cfg.attention_impl in CAUSAL_ONLY and prefix is not None:
            raise ValueError(f"attention_impl={cfg.attention_impl!r} is causal attention only "
                             "and cannot honour a bidirectional prefix: call the model without "
                             "prefix (a causal objective), or use attention_impl='manual'")
        if prefix is None:
            prefix = jnp.zeros((b, length), jnp.int32)

        embedding_VxD = _param(self, "embedding", nn.initializers.normal(cfg.d_model ** -0.5),
                               (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        # Gather from the whole table (FSDP gathers weights anyway; a sharded gather reshards
        # badly).
        table_VxD = constrain(embedding_VxD, (None, None))
        x_BxLxD = jnp.take(table_VxD, inputs_BxL, axis=0).astype(cfg.compute_dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))
        # The splash kernel masks causally within segments by itself: it takes the segment ids.
        mask_BxQxS = (segment_ids if cfg.attention_impl == "splash"
                      else attention_mask(segment_ids, prefix))

        stack = nn.scan(_block(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                        unroll=min(cfg.scan_unroll, cfg.n_layers),
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x_BxLxD, _ = stack(cfg, name="layers")(x_BxLxD, mask_BxQxS, positions)
        return self._logits(x_BxLxD, embedding_VxD, hidden)

    def _logits(self, x_BxLxD: Array, embedding_VxD: Array, hidden: bool = False) -> Array:
        """Final norm, then the output projection (``hidden``: the normed states alone)."""
        cfg = self.cfg
        b, length = x_BxLxD.shape[:2]
        x_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)
        unembed_DxV = None if cfg.tied_embeddings else _param(
            self, "unembed", _fan_in_init(0, 1), (cfg.d_model, cfg.vocab_size),
            ("embed", "vocab"), cfg)
        if hidden:
            return x_BxLxD

        dt = cfg.compute_dtype
        x_NxD = x_BxLxD.reshape(b * length, cfg.d_model)
        # Logits in float32 whatever the compute type: bfloat16's 8-bit mantissa would round
        # the logsumexp of the loss and the differences between nearby logits.
        if unembed_DxV is None:
            logits_NxV = jax.lax.dot_general(x_NxD, embedding_VxD.astype(dt),
                                             (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
        else:
            logits_NxV = project(x_NxD, unembed_DxV, dt, jnp.float32)
        logits_BxLxV = logits_NxV.reshape(b, length, cfg.vocab_size)
        return constrain(logits_BxLxV, ("batch", "length", "vocab"))

    def _decode(self, inputs_BxT: Array, segment_ids: Array | None, positions: Array | None,
                cache: dict):
        """The next T tokens of every row through the layers, each layer reading and extending
        its keys and values in the cache instead of recomputing the sequence."""
        cfg = self.cfg
        b, t = inputs_BxT.shape
        slots = cache["valid"].shape[1]
        index = cache["index"]
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        embedding_VxD = _param(self, "embedding", nn.initializers.normal(cfg.d_model ** -0.5),
                               (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        table_VxD = constrain(embedding_VxD, (None, None))
        x_BxTxD = jnp.take(table_VxD, inputs_BxT, axis=0).astype(cfg.compute_dtype)
        # Slot s holds a key a query at slot q may see iff it was written by a real token
        # (nonzero segment) and s <= q: causal attention over the cache.
        valid_BxS = jax.lax.dynamic_update_slice(cache["valid"], segment_ids != 0, (0, index))
        query_slot_T = index + jnp.arange(t)
        causal_TxS = jnp.arange(slots)[None, :] <= query_slot_T[:, None]
        mask_BxTxS = valid_BxS[:, None, :] & causal_TxS[None]

        stack = nn.scan(_block(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                        length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        kv = {"key": cache["key"], "value": cache["value"]}
        x_BxTxD, kv = stack(cfg, name="layers")(x_BxTxD, mask_BxTxS, positions, kv, index)
        new_cache = {**kv, "valid": valid_BxS, "index": index + t}
        return self._logits(x_BxTxD, embedding_VxD), new_cache


def output_matrix(cfg: ModelConfig, params) -> Array:
    """The output projection in ``params``: the [V, D] embedding when tied, else [D, V]."""
    return nn.unbox(params["embedding"] if cfg.tied_embeddings else params["unembed"])


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    """An empty key/value cache of ``length`` slots for ``batch`` sequences: per layer (leading
    axis) keys and values, which slots hold a real token, and the next slot to write."""
    if not 0 < length <= cfg.max_len:
        raise ValueError(f"cache length {length} must be in [1, max_len={cfg.max_len}]")
    shape = (cfg.n_layers, batch, length, cfg.kv_heads, cfg.head_size)
    return {"key": jnp.zeros(shape, cfg.compute_dtype),
            "value": jnp.zeros(shape, cfg.compute_dtype),
            "valid": jnp.zeros((batch, length), bool),
            "index": jnp.zeros((), jnp.int32)}
