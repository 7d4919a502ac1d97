"""How fast this machine reads memory, as decode does: the bandwidth ceiling's numerator."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def best_time(fn, *args, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of a jitted fn, after one warm-up call."""
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(total_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of the fastest of two ways to stream `total_bytes` of float32 weights through the CPU:
    a reduction, and vector x matrix products over separate 14 MB matrices (decode's own pattern)."""
    n_matrices = total_bytes // (1024 * 3584 * 4)
    matrices = [jnp.full((1024, 3584), i, jnp.float32) for i in range(n_matrices)]
    x = jnp.ones((1, 1024), jnp.float32)
    matvec = jax.jit(lambda x, ms: sum(jnp.sum(x @ m) for m in ms))
    reduction = jax.jit(lambda ms: sum(jnp.sum(m) for m in ms))
    nbytes = sum(m.nbytes for m in matrices)
    seconds = min(best_time(matvec, x, matrices, repeats=repeats), best_time(reduction, matrices, repeats=repeats))
    return nbytes / seconds


if __name__ == "__main__":
    print(f"{read_bandwidth() / 1e9:.1f} GB/s")
