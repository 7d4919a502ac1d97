"""Decode attention on the CPU through our native kernel (model/cpu_kernels/attention.cc), called by
XLA inside the jitted decode step: each new query against the cache slots it sees, read in place.

XLA:CPU ran `mixtral.attend`'s decode as a cond per block of the cache, each copying its block of K and V
and multiplying them in small dots (~100 us a layer a token on mini-mixtral, a tenth of an int4 step).
Prefill (many queries) stays on XLA's blocked attention, whose dots are large enough to run well.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from . import cpu_matmul
from .kv_cache import storage_dtype

HELD = {"float32": 0, "bfloat16": 1, "float16": 2}  # the kernel's `half` attribute for a cache dtype
MAX_QUERIES = 4  # up to this many new tokens (decode) go through the kernel


@dataclasses.dataclass(frozen=True)
class CpuAttention:
    """Where the KV cache lives, for the kernel: static, hashable (an NNX static attribute)."""
    mesh: Mesh
    cache_spec: tuple  # K [B, KV, Dh, S] and V [B, KV, S, Dh] (sharding.cache_spec)

    def __call__(self, q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_slots: jax.Array, start: jax.Array,
                 sliding_window: int | None, dtype) -> jax.Array:
        """`mixtral.attend` for a few queries: q [B, KV, G, T, Dh] (scaled), the cache as kv_cache holds it
        in `dtype`, q_slots [T], start [B] -> float32 [B, KV, G, T, Dh]. Each device attends with its kv
        heads."""
        heads = self.cache_spec[1]

        def local(q, k_cache, v_cache, q_slots, start):
            return attention(q, k_cache, v_cache, q_slots, start, sliding_window, dtype)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(None, heads), P(*self.cache_spec), P(*self.cache_spec), P(), P()),
                             out_specs=P(None, heads), check_vma=False)(q, k_cache, v_cache, q_slots, start)


def attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_slots: jax.Array, start: jax.Array,
              sliding_window: int | None, dtype) -> jax.Array:
    """One device's kernel call (`CpuAttention.__call__`'s arguments)."""
    if not cpu_matmul.available():
        raise RuntimeError(cpu_matmul.unavailable_reason())
    B, KV, G, T, Dh = q.shape
    dtype = jnp.dtype(dtype)
    assert k_cache.dtype == storage_dtype(dtype), (k_cache.dtype, dtype)
    out = jax.ffi.ffi_call(cpu_matmul.ATTENTION_TARGET, jax.ShapeDtypeStruct((B, KV, G * T, Dh), jnp.float32))(
        q.astype(jnp.float32).reshape(B, KV, G * T, Dh), k_cache, v_cache, q_slots.astype(jnp.int32),
        start.astype(jnp.int32), window=np.int64(sliding_window or 0), half=np.int64(HELD[dtype.name]))
    return out.reshape(B, KV, G, T, Dh)
