"""The decode attention kernel (model/cpu_kernels/attention.cc) against numpy: caches in float32,
bfloat16 and float16, batch rows starting at different slots, sliding windows, several queries, a query
that sees no slot, inside jit and split over 8 devices by kv heads."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from model import cpu_attention, cpu_matmul
from model.cpu_attention import CpuAttention
from model.kv_cache import stored
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


def case(dtype, B=2, KV=3, G=2, T=1, Dh=40, S=700, seed=0):
    """Random q and cache (held as kv_cache stores it), and the float64 values the kernel reads."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, KV, G, T, Dh)).astype(np.float32)
    k = (2 * rng.standard_normal((B, KV, Dh, S))).astype(dtype)
    v = rng.standard_normal((B, KV, S, Dh)).astype(dtype)
    held = [np.asarray(stored(jnp.asarray(a), dtype)) for a in (k, v)]
    return q, *held, q.astype(np.float64), k.astype(np.float64), v.astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16], ids=["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("T, q_slots, start, window", [
    (1, [9], [0, 4], None),                   # decode early in a conversation, a left-padded row
    (1, [650], [0, 100], None),               # past one chunk of 512 slots
    (1, [699], [3, 0], 64),                   # the last slot, a sliding window
    (3, [520, 521, 522], [0, 521], None),     # several queries; row 1's first sees only itself
    (2, [5, 6], [6, 0], 3),                   # row 0's first query sees no slot
])
def test_the_kernel_matches_numpy(dtype, T, q_slots, start, window):
    q, k, v, q64, k64, v64 = case(dtype, T=T)
    attend = jax.jit(cpu_attention.attention, static_argnames=("sliding_window", "dtype"))
    got = attend(q, k, v, np.array(q_slots, np.int32), np.array(start, np.int32), sliding_window=window,
                 dtype=jnp.dtype(dtype))
    assert got.shape == q.shape and got.dtype == jnp.float32
    want = numpy_attention(q64, k64, v64, q_slots, start, window)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=5e-5)  # float32 sums of ~500 scores up to ~30


def test_each_device_attends_with_its_kv_heads():
    mesh = make_mesh((2, 4))  # kv heads split 4 ways, the expert axis holding copies
    q, k, v, q64, k64, v64 = case(np.float32, B=1, KV=4, G=3, Dh=64, S=512, seed=1)
    attention = CpuAttention(mesh, (None, mesh.axis_names[1], None, None))  # sharding.cache_spec's
    got = jax.jit(lambda *a: attention(*a, sliding_window=None, dtype=jnp.float32))(
        q, k, v, np.array([300], np.int32), np.array([0], np.int32))
    np.testing.assert_allclose(np.asarray(got, np.float64), numpy_attention(q64, k64, v64, [300], [0], None),
                               rtol=0, atol=5e-5)  # float32 sums of ~500 scores up to ~30
