"""The KV cache: fixed capacity, in the model dtype, sharded by kv heads, updated in place.

A 16-bit float cache is held as the uint16 of its bits (`storage_dtype`): XLA:CPU computes bfloat16 in
float32, and an in-place update of a bfloat16 cache became a conversion of the whole cache to float32 and
back on every step (0.4 ms per layer per token on mini-mixtral); an update of integers writes just its
slots. `stored` and `loaded` convert at the two ends, for free (bitcasts).

Slots 0..capacity-1 hold keys/values in the order tokens were fed. Row b of a batch starts at slot
`start[b]` (left padding: earlier slots of that row are never attended to); token positions (for RoPE)
are `slot - start[b]`. `end` is the next slot to write. Nothing else is stored: the attention mask is
computed from these numbers on the fly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import MixtralConfig
from .safetensors_io import aligned_zeros
from .sharding import cache_spec

ATTENTION_BLOCK = 512  # attention walks the cache in blocks of this many slots


def storage_dtype(dtype) -> np.dtype:
    """What a cache of values in `dtype` holds."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


def stored(values: jax.Array, model_dtype) -> jax.Array:
    """Keys or values, rounded to the model dtype, as the cache holds them."""
    values = values.astype(model_dtype)
    storage = storage_dtype(model_dtype)
    return values if storage == values.dtype else jax.lax.bitcast_convert_type(values, storage)


def loaded(held: jax.Array, model_dtype) -> jax.Array:
    """Part of the cache as the model's keys or values."""
    return held if held.dtype == jnp.dtype(model_dtype) else jax.lax.bitcast_convert_type(held, model_dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k", "v", "end", "start"], meta_fields=["block"])
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, KV, Dh, S]: keys stored transposed, as the q.k product reads them
    v: tuple[jax.Array, ...]  # per layer [B, KV, S, Dh]
    end: jax.Array  # int32 []: slots [0, end) are written
    start: jax.Array  # int32 [B]: first slot of each row
    block: int  # attention block size, divides S

    @property
    def capacity(self) -> int:
        return self.v[0].shape[2]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def replace(self, **kw) -> KVCache:
        return dataclasses.replace(self, **kw)

    def rewind(self, end: int) -> KVCache:
        """Forget every slot from `end` on (they are overwritten by what is fed next). The new `end`
        keeps the old one's placement, so the compiled programs still match."""
        return self.replace(end=jax.device_put(np.int32(end), self.end.sharding))

    @staticmethod
    def block_for(capacity: int) -> int:
        return ATTENTION_BLOCK if capacity % ATTENTION_BLOCK == 0 else capacity

    @staticmethod
    def capacity_for(tokens: int) -> int:
        """The smallest valid capacity with room for `tokens` slots."""
        return tokens if tokens <= ATTENTION_BLOCK else -(-tokens // ATTENTION_BLOCK) * ATTENTION_BLOCK

    @staticmethod
    def create(config: MixtralConfig, mesh: Mesh, batch: int, capacity: int, start=None) -> KVCache:
        """An empty cache, inside a program (`start` may be traced); `capacity` must be a multiple of
        ATTENTION_BLOCK or at most one block."""
        sharding = NamedSharding(mesh, P(*cache_spec(config, mesh)))
        return KVCache._empty(config, batch, capacity, lambda shape: jnp.zeros(shape, storage_dtype(config.dtype), device=sharding),
                              jnp.zeros((), jnp.int32),
                              jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32))

    @staticmethod
    def allocate(config: MixtralConfig, mesh: Mesh, batch: int, capacity: int) -> KVCache:
        """An empty cache made from host zeros: no program to compile (a start that loads its programs
        from the executable cache compiles nothing). The zeros are copied into memory XLA owns: XLA's
        CPU client would use aligned host zeros in place, but it cannot donate memory it does not own,
        so the first program given such a cache would copy all of it before it ran (0.1 s on the demo,
        seconds for Mixtral's). Allocating costs that copy instead, where the caller chooses (the engine
        makes the next conversation's cache ahead of its turn). On an accelerator the first put is that
        copy already (from the host: ~0.5 GB of Mixtral's cache of 4,096 slots, tens of ms on an H200)."""
        sharding, replicated = NamedSharding(mesh, P(*cache_spec(config, mesh))), NamedSharding(mesh, P())
        dtype, on_cpu = storage_dtype(config.dtype), mesh.devices.flat[0].platform == "cpu"

        def zeros(shape):
            placed = jax.device_put(aligned_zeros(shape, dtype), sharding)
            return jax.device_put(placed, sharding, may_alias=False) if on_cpu else placed

        return KVCache._empty(config, batch, capacity, zeros, jax.device_put(np.int32(0), replicated),
                              jax.device_put(np.zeros((batch,), np.int32), replicated))

    @staticmethod
    def _empty(config: MixtralConfig, batch: int, capacity: int, zeros, end, start) -> KVCache:
        if capacity > ATTENTION_BLOCK and capacity % ATTENTION_BLOCK:
            raise ValueError(f"cache capacity {capacity} must be a multiple of {ATTENTION_BLOCK}")
        B, KV, Dh = batch, config.num_kv_heads, config.head_dim
        return KVCache(k=tuple(zeros((B, KV, Dh, capacity)) for _ in range(config.num_layers)),
                       v=tuple(zeros((B, KV, capacity, Dh)) for _ in range(config.num_layers)),
                       end=end, start=start, block=KVCache.block_for(capacity))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    @staticmethod
    def bytes_for(config: MixtralConfig, capacity: int, batch: int = 1) -> int:
        itemsize = jnp.dtype(config.dtype).itemsize
        return 2 * config.num_layers * batch * config.num_kv_heads * capacity * config.head_dim * itemsize
