"""The decode attention kernel (model/cpu_kernels/attention.cc) against numpy: the new keys and values
written into the cache at their slots and nowhere else, then attention over it; caches in float32, bfloat16
and float16, batch rows starting at different slots, sliding windows, several queries, a query that sees
no slot, inside jit and split over 8 devices by kv heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from model import cpu_attention, cpu_matmul
from model.cpu_attention import CpuAttention
from model.kv_cache import loaded, stored
from model.sharding import make_mesh

pytestmark = pytest.mark.skipif(not cpu_matmul.available(), reason="the CPU kernels are not built")


def numpy_attention(q, k, v, q_slots, start, window):
    """q [B, KV, G, T, Dh], k [B, KV, Dh, S], v [B, KV, S, Dh] (float64) -> [B, KV, G, T, Dh]; a query that
    sees no slot gets zeros."""
    B, KV, G, T, Dh = q.shape
    S = v.shape[2]
    out = np.zeros(q.shape)
    slots = np.arange(S)
    for b in range(B):
        for t in range(T):
            seen = (slots >= start[b]) & (slots <= q_slots[t])
            if window:
                seen &= q_slots[t] - slots < window
            if not seen.any():
                continue
            s = np.einsum("kgd,kds->kgs", q[b, :, :, t], k[b][..., seen])
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, :, t] = np.einsum("kgs,ksd->kgd", p / p.sum(-1, keepdims=True), v[b][:, seen])
    return out


def case(dtype, q_slots, B=2, KV=3, G=2, Dh=40, S=700, seed=0):
    """Random q, new keys and values [B, T, KV, Dh] and cache (held as kv_cache stores it); and float64 q and
    the cache numpy expects after the new keys and values are written at q_slots."""
    rng = np.random.default_rng(seed)
    T = len(q_slots)
    q = rng.standard_normal((B, KV, G, T, Dh)).astype(np.float32)
    k_new, v_new = (rng.standard_normal((B, T, KV, Dh)).astype(dtype).astype(np.float32) for _ in range(2))
    k = (2 * rng.standard_normal((B, KV, Dh, S))).astype(dtype)
    v = rng.standard_normal((B, KV, S, Dh)).astype(dtype)
    held = [np.asarray(stored(jnp.asarray(a), dtype)) for a in (k, v)]
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    k64[..., q_slots] = k_new.transpose(0, 2, 3, 1)
    v64[:, :, q_slots] = v_new.transpose(0, 2, 1, 3)
    return q, k_new, v_new, *held, q.astype(np.float64), k64, v64


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("q_slots, start, window", [
    ([9], [0, 4], None),                   # decode early in a conversation, a left-padded row
    ([650], [0, 100], None),               # past one chunk of 512 slots
    ([699], [3, 0], 64),                   # the last slot, a sliding window
    ([520, 521, 522], [0, 521], None),     # several queries; row 1's first sees only itself
    ([5, 6], [6, 0], 3),                   # row 0's first query sees no slot
])
def test_the_kernel_matches_numpy(dtype, q_slots, start, window):
    q, k_new, v_new, k, v, q64, k64, v64 = case(dtype, q_slots)
    attend = jax.jit(cpu_attention.attention, static_argnames=("sliding_window", "dtype"))
    got, k_cache, v_cache = attend(q, k_new, v_new, k, v, np.array(q_slots, np.int32), np.array(start, np.int32),
                                   sliding_window=window, dtype=jnp.dtype(dtype))
    assert got.shape == q.shape and got.dtype == jnp.float32
    for cache, want in [(k_cache, k64), (v_cache, v64)]:  # bit for bit, the new slots and all the others
        assert cache.dtype == k.dtype and (np.asarray(loaded(cache, dtype)).astype(np.float64) == want).all()
    want = numpy_attention(q64, k64, v64, q_slots, start, window)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=5e-5)  # float32 sums of ~500 scores up to ~30


def test_each_device_attends_with_its_kv_heads():
    mesh = make_mesh((2, 4))  # kv heads split 4 ways, the expert axis holding copies
    q, k_new, v_new, k, v, q64, k64, v64 = case(np.float32, [300], B=1, KV=4, G=3, Dh=64, S=512, seed=1)
    attention = CpuAttention(mesh, (None, mesh.axis_names[1], None, None))  # sharding.cache_spec's
    got, k_cache, v_cache = jax.jit(lambda *a: attention(*a, sliding_window=None, dtype=jnp.float32))(
        q, k_new, v_new, k, v, np.array([300], np.int32), np.array([0], np.int32))
    assert (np.asarray(k_cache) == k64).all() and (np.asarray(v_cache) == v64).all()
    np.testing.assert_allclose(np.asarray(got, np.float64), numpy_attention(q64, k64, v64, [300], [0], None),
                               rtol=0, atol=5e-5)  # float32 sums of ~500 scores up to ~30
