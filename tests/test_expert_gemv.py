"""The GPU decode kernel (model/expert_gemv.py), run interpreted on the CPU against a plain einsum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.expert_gemv import expert_gemv, stores_out_major, supported

E, D, I = 4, 256, 96  # 96 columns: tiles of 32


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("experts", [[3, 1], [2, 2], [0, 3, 1]], ids=["two", "same-twice", "three"])
def test_matches_einsum_on_chosen_experts(dtype, experts):
    keys = jax.random.split(jax.random.key(len(experts)), 3)
    if dtype == "int8":
        kernel = jax.random.randint(keys[0], (E, D, I), -127, 128, jnp.int8)
        scale = jax.random.uniform(keys[1], (E, I), jnp.float32, 0.5, 1.5)
    else:
        kernel, scale = jax.random.normal(keys[0], (E, D, I), dtype), None
    x = jax.random.normal(keys[2], (len(experts), D), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32)
    chosen = jnp.array(experts)
    ref = jnp.einsum("kd,kdi->ki", x.astype(jnp.float32), kernel[chosen].astype(jnp.float32))
    if scale is not None:
        ref = ref * scale[chosen]
    stored = jnp.swapaxes(kernel, 1, 2) if stores_out_major(kernel.dtype) else kernel  # int8: [E, out, in]
    out = expert_gemv(x, chosen, stored, scale, interpret=True)
    assert out.shape == (len(experts), I) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_supported_shapes(dtype):
    assert supported(4096, 14336, dtype) and supported(14336, 4096, dtype)  # Mixtral-8x7B
    assert supported(64, 96, dtype)
    assert not supported(4096, 100, dtype)  # no tile divides 100 outputs
    assert not supported(100, 4096, dtype)  # nor 100 inputs
