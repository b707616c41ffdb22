"""Named model sizes, a size picker for scaling ladders, and exact parameter / FLOP counts.

Sizes are named by their non-embedding parameter count (the N of scaling laws), because the
embedding share depends on the vocabulary: with the bundled 8192-id vocabulary "nano" has ~0.1M
non-embedding parameters and ~0.6M in total.
"""

from __future__ import annotations

import dataclasses
import math

from loam.model.transformer import ModelConfig

# name -> (d_model, n_layers, n_heads, n_kv_heads, mlp_dim, max_len); ~ non-embedding params.
_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    "nano": (64, 2, 4, 4, 192, 1024),          # ~0.11M
    "micro": (96, 3, 3, 3, 256, 1024),         # ~0.33M
    "tiny": (128, 4, 4, 4, 512, 1024),         # ~1.05M
    "mini": (256, 4, 4, 4, 768, 1024),         # ~3.4M (the default job's model)
    "midi": (384, 6, 6, 6, 1024, 1024),        # ~10.6M (10x tiny: mixture-search targets)
    "small": (512, 6, 8, 8, 1408, 1024),       # ~19M
    "medium": (640, 10, 10, 10, 1728, 2048),   # ~50M
    "base": (768, 12, 12, 12, 2048, 2048),     # ~85M
    "large": (1024, 24, 16, 16, 2816, 2048),   # ~308M
    "1b": (2048, 16, 32, 8, 8192, 2048),       # ~0.97B, grouped-query (4 query heads per kv)
    # Llama-3-8B's shape: ~6.98B non-embedding; with its 128256-id vocabulary, untied, 8.03B.
    "8b": (4096, 32, 32, 8, 14336, 8192),
    # A reference point shared with GPT-style peers (vocab 16384, 6x384, 6 heads, MLP 4x, context
    # 256). Their MLP is two d x 4d matrices; the parameter- and FLOP-matched SwiGLU has three
    # d x 8d/3 ones, so the counts equal a bias-free GPT's without its position table:
    # 10,621,824 non-embedding, 16,913,280 in all (tied).
    "peer-a": (384, 6, 6, 6, 1024, 256),
}
SIZE_NAMES = tuple(_SIZES)


def get_size(name: str, vocab_size: int = 8192, **overrides) -> ModelConfig:
    """ModelConfig of a named size; ``overrides`` replace any field (e.g. remat=True)."""
    if name not in _SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {', '.join(_SIZES)}")
    d, n_layers, heads, kv_heads, mlp, max_len = _SIZES[name]
    cfg = ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=n_layers, n_heads=heads,
                      n_kv_heads=kv_heads, mlp_dim=mlp, max_len=max_len, tied_embeddings=True)
    return dataclasses.replace(cfg, **overrides)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of Transformer(cfg): total, non_embedding, embedding.

    ``embedding`` is the token embedding plus, when untied, the output projection.
    """
    d, h, kvh, k, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim
    per_layer = 2 * d + d * h * k + 2 * d * kvh * k + h * k * d + 3 * d * f
    non_embedding = cfg.n_layers * per_layer + d  # + final norm
    embedding = cfg.vocab_size * d * (1 if cfg.tied_embeddings else 2)
    return {"total": non_embedding + embedding, "non_embedding": non_embedding,
            "embedding": embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int, *, forward_only: bool = False) -> float:
    """Model FLOPs per trained token: 6 (N_non_embedding + V d) + 12 L (H K) T.

    The output projection V*d is counted whether or not it is tied to the embedding (its matmul
    runs either way); the embedding lookup is free. Attention is counted over the full T x T
    score matrix, which is what the einsum computes (masked entries included). Forward only is
    one third of that: 2 (N + V d) + 4 L (H K) T.
    """
    n = count_params(cfg)["non_embedding"] + cfg.vocab_size * cfg.d_model
    attn = cfg.n_layers * cfg.n_heads * cfg.head_size * seq_len
    forward = 2 * n + 4 * attn
    return float(forward if forward_only else 3 * forward)


def _default_mlp(d: int) -> int:
    return max(8, int(round(8 * d / 3 / 8)) * 8)


def _head_dim(d: int) -> int:
    return 64 if d >= 256 else 32 if d >= 64 and d % 32 == 0 else 16


def _non_embedding(d: int, n_layers: int, mlp: int) -> int:
    """Non-embedding parameters of a multi-head shape (what count_params gives pick_size's
    configs, with head_dim * n_heads = d)."""
    return n_layers * (2 * d + 4 * d * d + 3 * d * mlp) + d


def pick_size(target_non_embedding: float, vocab_size: int = 8192, *,
              aspect: tuple[float, float] = (64.0, 128.0), max_len: int = 1024,
              tied_embeddings: bool = True, **overrides) -> ModelConfig:
    """A ModelConfig whose non-embedding count lands within a few % of the target.

    Width and depth follow the usual aspect ratio d_model / n_layers in ``aspect``; d_model is a
    multiple of the head dim (64 from d=256 up, 32 or 16 below) and the SwiGLU width, a multiple
    of 8 between 2d and 4d, absorbs the remaining gap to the target.
    """
    if target_non_embedding < 1e4:
        raise ValueError(f"target {target_non_embedding:g} is below the smallest useful model "
                         "(~1e4 non-embedding parameters)")
    if not (aspect[0] > 0 and aspect[1] > 0):
        raise ValueError(f"aspect (d_model / n_layers bounds) must be positive, got {aspect}")
    best: tuple[tuple[float, float, float], int, int] | None = None
    for n_layers in range(1, 129):
        lo, hi = int(aspect[0] * n_layers / 4), int(aspect[1] * n_layers * 4)
        for d in range(max(16, lo - lo % 16), min(hi, 16384) + 1, 16):
            if d % _head_dim(d):
                continue
            ratio = d / n_layers
            off_aspect = max(0.0, math.log(aspect[0] / ratio), math.log(ratio / aspect[1]))
            # Distance the MLP width cannot close (to 1%), then aspect, then distance from the
            # default width.
            reach = max(0.0, math.log(_non_embedding(d, n_layers, 2 * d) / target_non_embedding),
                        math.log(target_non_embedding / _non_embedding(d, n_layers, 4 * d)))
            default_gap = abs(math.log(_non_embedding(d, n_layers, _default_mlp(d))
                                       / target_non_embedding))
            score = (round(reach, 2), off_aspect, default_gap)
            if best is None or score < best[0]:
                best = (score, d, n_layers)
    if best is None:
        raise ValueError(f"aspect={aspect} leaves no shape to pick from: the search takes 1-128 "
                         "layers and d_model in [aspect[0] * n_layers / 4, aspect[1] * n_layers "
                         "* 4] within [16, 16384]; use bounds nearer the default (64.0, 128.0)")
    _, d, n_layers = best
    cfg = ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=n_layers,
                      n_heads=d // _head_dim(d), mlp_dim=_default_mlp(d), max_len=max_len,
                      tied_embeddings=tied_embeddings)
    # Fit the MLP width to the remaining gap: each unit of mlp_dim is 3 d L parameters.
    rest = count_params(dataclasses.replace(cfg, mlp_dim=0))["non_embedding"]
    mlp = int(round((target_non_embedding - rest) / (3 * d * n_layers) / 8)) * 8
    mlp = min(max(mlp, 2 * d), 4 * d)
    return dataclasses.replace(cfg, mlp_dim=mlp, **overrides)
