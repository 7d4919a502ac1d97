"""The GPU decode kernel (model/expert_gemv.py), run interpreted on the CPU against a plain einsum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import quantize
from model.expert_gemv import Tiling, expert_gemv, pack_int4, supported

E, D, I = 4, 256, 96  # 96 columns: tiles of 32 (float), 8 rows (quantized)
GROUP = 32


def stored_weights(dtype: str, shape: tuple[int, ...], key) -> tuple[jax.Array, tuple, jax.Array]:
    """(kernel as the kernel reads it, its params, the float32 [E, in, out] weight it stands for)."""
    w = np.asarray(jax.random.normal(key, shape, jnp.float32))
    if dtype in ("bfloat16", "float32"):
        kernel = jnp.asarray(w, dtype)
        return kernel, (), kernel.astype(jnp.float32)
    q, params = quantize.quantize(w, dtype, GROUP)
    dense = jnp.asarray(quantize.dequantize_numpy(q, params, dtype, GROUP))
    if dtype == "int8":
        return jnp.swapaxes(jnp.asarray(q), 1, 2), (jnp.asarray(params[0]),), dense
    kernel = pack_int4(jnp.asarray(quantize.unpack_int4(q)))  # [E, out, in/2]
    return kernel, tuple(jnp.swapaxes(jnp.asarray(p), 1, 2) for p in params), dense


@pytest.mark.parametrize("dtype", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("experts", [[3, 1], [2, 2], [0, 3, 1]], ids=["two", "same-twice", "three"])
def test_matches_einsum_on_chosen_experts(dtype, experts):
    keys = jax.random.split(jax.random.key(len(experts)), 2)
    kernel, params, dense = stored_weights(dtype, (E, D, I), keys[0])
    x = jax.random.normal(keys[1], (len(experts), D), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    chosen = jnp.array(experts)
    ref = jnp.einsum("kd,kdi->ki", x.astype(jnp.float32), dense[chosen])
    out = expert_gemv(x, chosen, kernel, *params, interpret=True)
    assert out.shape == (len(experts), I) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_other_tilings_agree(dtype):
    """The tilings the sweep tries give the same numbers (bigger blocks, more rows per program)."""
    kernel, params, _ = stored_weights(dtype, (E, 512, 64), jax.random.key(5))
    x = jax.random.normal(jax.random.key(6), (2, 512), jnp.float32)
    chosen = jnp.array([1, 3])
    first = expert_gemv(x, chosen, kernel, *params, interpret=True)
    for tiling in (Tiling(256, 16), Tiling(512, 32, 8, 4)):
        np.testing.assert_allclose(np.asarray(expert_gemv(x, chosen, kernel, *params, tiling=tiling, interpret=True)),
                                   np.asarray(first), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "uint8"])
def test_supported_shapes(dtype):
    assert supported(4096, 14336, dtype, GROUP) and supported(14336, 4096, dtype, GROUP)  # Mixtral-8x7B
    assert supported(64, 96, dtype, GROUP)
    assert not supported(4096, 100, dtype, GROUP)  # no tile divides 100 outputs
    assert not supported(100, 4096, dtype, GROUP)  # nor 100 inputs
