"""Decode attention on the CPU through our native kernel (model/cpu_kernels/attention.cc), called by
XLA inside the jitted decode step: the new keys and values written into the cache, then each new query
against the cache slots it sees, read in place.

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
from .kv_cache import storage_dtype, stored

HELD = {"float32": 0, "bfloat16": 1, "float16": 2}  # the kernel's `half` attribute for a cache dtype
MAX_QUERIES = 4  # up to this many new tokens (decode) go through the kernel


@dataclasses.dataclass(frozen=True)
class CpuAttention:
    """Where the KV cache lives, for the kernel: static, hashable (an NNX static attribute)."""
    mesh: Mesh
    cache_spec: tuple  # K [B, KV, Dh, S] and V [B, KV, S, Dh] (sharding.cache_spec)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 q_slots: jax.Array, start: jax.Array, sliding_window: int | None, dtype) -> tuple[jax.Array, ...]:
        """The cache updated with the new keys and values, then `mixtral.attend` for a few queries: q [B, KV,
        G, T, Dh] (scaled), k and v [B, T, KV, Dh] (rotated keys, values), the cache as kv_cache holds it in
        `dtype`, q_slots [T] (consecutive), start [B] -> (float32 [B, KV, G, T, Dh], k_cache, v_cache). Each
        device attends with its kv heads."""
        heads = self.cache_spec[1]

        def local(q, k, v, k_cache, v_cache, q_slots, start):
            return attention(q, k, v, k_cache, v_cache, q_slots, start, sliding_window, dtype)

        cache = P(*self.cache_spec)
        new = P(None, None, heads)  # the new keys and values [B, T, KV, Dh]
        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(None, heads), new, new, cache, cache, P(), P()),
                             out_specs=(P(None, heads), cache, cache), check_vma=False)(
            q, k, v, k_cache, v_cache, q_slots, start)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_slots: jax.Array,
              start: jax.Array, sliding_window: int | None, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One device's kernel call (`CpuAttention.__call__`'s arguments). The caches come back in the same
    buffers where XLA can (a donated cache in a decode step): the kernel writes just the new slots."""
    if not cpu_matmul.available():
        raise RuntimeError(cpu_matmul.unavailable_reason())
    B, KV, G, T, Dh = q.shape
    dtype = jnp.dtype(dtype)
    assert k_cache.dtype == storage_dtype(dtype), (k_cache.dtype, dtype)
    new_k, new_v = (stored(a.transpose(0, 2, 1, 3), dtype) for a in (k, v))  # [B, KV, T, Dh]
    out, k_cache, v_cache = jax.ffi.ffi_call(
        cpu_matmul.ATTENTION_TARGET, (jax.ShapeDtypeStruct((B, KV, G * T, Dh), jnp.float32),
                                      jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                                      jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)),
        input_output_aliases={3: 1, 4: 2})(
        q.astype(jnp.float32).reshape(B, KV, G * T, Dh), new_k, new_v, k_cache, v_cache, q_slots.astype(jnp.int32),
        start.astype(jnp.int32), window=np.int64(sliding_window or 0), half=np.int64(HELD[dtype.name]))
    return out.reshape(B, KV, G, T, Dh), k_cache, v_cache
