"""Hardware reference figures measured in the running process (for MFU)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Best observed float32 FLOP/s of an n×n matmul on the default device."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
