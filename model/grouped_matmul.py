"""Prefill-time expert matmuls on a GPU: rows grouped by expert, one Pallas kernel for all the groups.

Prefill routes N tokens to k experts each. The rows (token copies) are sorted by expert and each
expert's rows padded to a whole number of `block_rows` tiles, so every row tile belongs to one expert:

    x [R, in], tile_expert int32 [R / block_rows] (-1: an unused tile) -> float32 [R, out]
    out[rows of tile m] = x[rows of tile m] @ W[tile_expert[m]]

Each program computes one (row tile, column tile) block through the tensor cores, reading its expert's
weights in place in the same stored layouts as the decode kernel (expert_gemv.py: floats [E, in, out];
int8 [E, out, in] + scale [E, out]; int4 uint8 [E, out, in/2] + scale, offset [E, out, in/group]),
quantized tiles widened to the activations' dtype on the way. No host round trip and no per-expert
loop: the grid is static (R bounds the padded rows), so the whole prefill stays one program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .expert_gemv import dims, weight_type


class Tiling(NamedTuple):
    block_rows: int
    block_out: int
    block_in: int
    num_warps: int = 4
    num_stages: int = 3


TILING = Tiling(64, 128, 64)
SMALL = Tiling(16, 16, 32)  # for shapes the default does not divide (tests' tiny models)


def _transposed_dot(x, w):
    """x [m, k] @ w[n, k].T -> float32 [m, n]."""
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _kernel(tile_expert_ref, *refs, kind: str, tiling: Tiling, n_in: int, group: int | None):
    out_ref = refs[-1]
    m, n = pl.program_id(0), pl.program_id(1)
    expert = tile_expert_ref[m]
    rows, outs = pl.ds(m * tiling.block_rows, tiling.block_rows), pl.ds(n * tiling.block_out, tiling.block_out)
    bk = tiling.block_in

    @pl.when(expert < 0)
    def _():
        out_ref[rows, outs] = jnp.zeros((tiling.block_rows, tiling.block_out), jnp.float32)

    @pl.when(expert >= 0)
    def _():
        if kind == "float":
            x_ref, w_ref = refs[:2]

            def step(i, acc):
                ins = pl.ds(i * bk, bk)
                return acc + jnp.dot(x_ref[rows, ins], w_ref[expert, ins, outs].astype(x_ref.dtype),
                                     preferred_element_type=jnp.float32)
        elif kind == "int8":
            x_ref, w_ref, scale_ref = refs[:3]

            def step(i, acc):
                ins = pl.ds(i * bk, bk)
                return acc + _transposed_dot(x_ref[rows, ins], w_ref[expert, outs, ins].astype(x_ref.dtype))
        else:
            x_even_ref, x_odd_ref, w_ref, scale_ref, offset_ref = refs[:5]
            half, groups = bk // 2, bk // group

            def step(i, acc):
                pairs, gs = pl.ds(i * half, half), pl.ds(i * groups, groups)
                w = w_ref[expert, outs, pairs]  # uint8 [block_out, block_in / 2]
                scale = scale_ref[expert, outs, gs].astype(jnp.float32)[:, :, None]  # [block_out, groups, 1]
                offset = offset_ref[expert, outs, gs].astype(jnp.float32)[:, :, None]

                def widen(q):  # nibbles [block_out, block_in / 2] -> weights in the activations' dtype
                    q = q.astype(jnp.float32).reshape(tiling.block_out, groups, group // 2)
                    return (q * scale + offset).reshape(tiling.block_out, half).astype(x_even_ref.dtype)

                return (acc + _transposed_dot(x_even_ref[rows, pairs], widen(w & 0xF))
                        + _transposed_dot(x_odd_ref[rows, pairs], widen(w >> 4)))

        acc = jax.lax.fori_loop(0, n_in // bk, step, jnp.zeros((tiling.block_rows, tiling.block_out), jnp.float32))
        if kind == "int8":
            acc = acc * scale_ref[expert, outs].astype(jnp.float32)[None, :]
        out_ref[rows, outs] = acc


def block_rows_for(rows: int) -> int:
    """Rows per tile for about `rows` rows in all: the default tile's, or the small one's for few rows
    (where most of a big tile would be padding)."""
    return TILING.block_rows if rows >= 256 else SMALL.block_rows


def tiling_for(n_in: int, n_out: int, dtype, group: int | None = None) -> Tiling | None:
    for t in (TILING, SMALL):
        if n_in % t.block_in == 0 and n_out % t.block_out == 0 and (
                weight_type(dtype) != "int4" or t.block_in % group == 0):
            return t
    return None


def grouped_matmul(x: jax.Array, tile_expert: jax.Array, kernel: jax.Array, *params: jax.Array,
                   block_rows: int, tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """x [R, in] (rows grouped by expert in tiles of block_rows) @ W[tile_expert] -> float32 [R, out]."""
    R = x.shape[0]
    kind = weight_type(kernel.dtype)
    n_in, n_out = dims(kernel)
    group = n_in // params[0].shape[-1] if kind == "int4" else None
    tiling = (tiling or tiling_for(n_in, n_out, kernel.dtype, group))._replace(block_rows=block_rows)
    if kind == "int4":
        operands = (x[:, 0::2], x[:, 1::2], kernel, *params)
    else:
        operands = (x, kernel, *params)
    return pl.pallas_call(
        functools.partial(_kernel, kind=kind, tiling=tiling, n_in=n_in, group=group),
        out_shape=jax.ShapeDtypeStruct((R, n_out), jnp.float32),
        grid=(R // block_rows, n_out // tiling.block_out),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
    )(tile_expert.astype(jnp.int32), *operands)


class GroupedRows(NamedTuple):
    """Prefill routing for `grouped_matmul`: the N * k (token, expert) assignments laid out in rows
    grouped by expert, each expert's rows padded to whole tiles: R = N * k (rounded up to a tile) + E * block_rows
    rows bound them."""
    token_of: jax.Array  # int32 [R]: the token of each row (N: a padding row, reading a zero row)
    weight_of: jax.Array  # float32 [R]: its routing weight (0 for padding rows)
    tile_expert: jax.Array  # int32 [R / block_rows]: each row tile's expert, -1 past the last used tile

    @staticmethod
    def of(top_w: jax.Array, top_e: jax.Array, num_experts: int, block_rows: int) -> GroupedRows:
        """From the router's choices (weights [N, k], experts [N, k]; expert E = not routed)."""
        N, k = top_e.shape
        E = num_experts
        R = -(-N * k // block_rows) * block_rows + E * block_rows
        flat_e = top_e.reshape(-1)
        order = jnp.argsort(flat_e, stable=True)
        sorted_e = flat_e[order]
        counts = jnp.zeros(E + 1, jnp.int32).at[flat_e].add(1)[:E]
        padded = (counts + block_rows - 1) // block_rows * block_rows
        padded_start = jnp.cumsum(padded) - padded
        start = jnp.cumsum(counts) - counts
        routed = sorted_e < E
        e = jnp.minimum(sorted_e, E - 1)
        row = jnp.where(routed, padded_start[e] + jnp.arange(N * k) - start[e], R)  # R: dropped
        token_of = jnp.full(R, N, jnp.int32).at[row].set((order // k).astype(jnp.int32), mode="drop")
        weight_of = jnp.zeros(R, jnp.float32).at[row].set(top_w.reshape(-1)[order], mode="drop")
        tile_first_row = jnp.arange(R // block_rows) * block_rows
        tile_expert = jnp.searchsorted(jnp.cumsum(padded), tile_first_row, side="right").astype(jnp.int32)
        return GroupedRows(token_of, weight_of, jnp.where(tile_expert < E, tile_expert, -1))
