"""The GPU prefill kernel (model/grouped_matmul.py), run interpreted on the CPU against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.grouped_matmul import GroupedRows, Tiling, grouped_matmul
from test_expert_gemv import stored_weights

E, D, I = 4, 64, 96


def test_rows_are_grouped_by_expert_in_whole_tiles():
    top_e = jnp.array([[2, 0], [2, 1], [0, 2], [E, E]])  # the last token is padding (not routed)
    top_w = jnp.array([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]])
    rows = GroupedRows.of(top_w, top_e, E, block_rows=2)
    assert rows.token_of.shape == (8 + E * 2,)
    # expert 0: tokens 0, 2 (one tile); expert 1: token 1 + a padding row; expert 2: tokens 0, 1, 2 (two tiles)
    np.testing.assert_array_equal(rows.tile_expert, [0, 1, 2, 2, -1, -1, -1, -1])
    np.testing.assert_array_equal(rows.token_of[:8], [0, 2, 1, 4, 0, 1, 2, 4])
    np.testing.assert_allclose(rows.weight_of[:8], [0.4, 0.9, 0.3, 0, 0.6, 0.7, 0.1, 0])
    assert (np.asarray(rows.token_of[8:]) == 4).all() and (np.asarray(rows.weight_of[8:]) == 0).all()


@pytest.mark.parametrize("dtype", ["int8", "int4", "bfloat16", "float32"])
def test_matches_numpy(dtype):
    kernel, params, dense = stored_weights(dtype, (E, D, I), jax.random.key(3))
    block_rows = 16
    tile_expert = jnp.array([2, 0, -1, 3, 2])
    x = jax.random.normal(jax.random.key(4), (len(tile_expert) * block_rows, D),
                          jnp.bfloat16 if dtype != "float32" else jnp.float32)
    out = grouped_matmul(x, tile_expert, kernel, *params, block_rows=block_rows, tiling=Tiling(16, 32, 32),
                         interpret=True)
    experts = np.repeat(np.asarray(tile_expert), block_rows)
    ref = np.einsum("rd,rdi->ri", np.asarray(x, np.float32), np.asarray(dense)[np.maximum(experts, 0)])
    ref[experts < 0] = 0
    tolerance = 2e-2 if dtype != "float32" else 2e-5  # quantized tiles are widened to the activations' bfloat16
    np.testing.assert_allclose(np.asarray(out), ref, rtol=tolerance, atol=tolerance * np.abs(ref).max())
