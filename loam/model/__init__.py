"""The model: transformer, named sizes with parameter/FLOP counts, and sharding rules."""

from loam.model.sizes import SIZE_NAMES, count_params, flops_per_token, get_size, pick_size
from loam.model.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "SIZE_NAMES", "count_params", "flops_per_token",
           "get_size", "pick_size"]
