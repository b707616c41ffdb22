"""Hardware reference figures measured in the running process (for MFU)."""

from __future__ import annotations

import functools
import resource
import time

import jax
import jax.numpy as jnp


@functools.cache
def matmul_peak_flops(n: int = 2048, repeats: int = 5, min_seconds: float = 1.0,
                      dtype: str = "float32") -> float:
    """Best observed FLOP/s of an n×n matmul of ``dtype`` operands on the default device.

    Runs at least ``repeats`` timed matmuls and at least ``min_seconds`` of them, so that thread
    pools and clock frequencies have settled before the best time is taken (a single cold
    measurement can read a third low, which would inflate every MFU divided by it).
    """
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best, count, start = float("inf"), 0, time.perf_counter()
    while count < repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
        count += 1
    return 2 * n**3 / best


def minor_faults() -> int:
    """Minor page faults of this process so far (first touches of memory)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
