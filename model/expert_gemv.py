"""Decode-time expert matmuls on a GPU: one Pallas kernel reads just the chosen experts' weights, in place.

XLA on a GPU runs a `cond` by copying its predicate to the host and waiting (~40 us each), and gathers
chosen experts by copying their weights first; for int8 weights it also writes a bfloat16 copy of each
before the matmul. This kernel does none of that: for each (slot, column tile) it looks the slot's expert
up on the device, streams that expert's [in, tile] weights (int8 or float) and multiplies in registers,
accumulating in float32. On the CPU it runs interpreted (tests only: the CPU's decode path uses conds).

    x [K, in], experts int32 [K], kernel [E, in, out], scale [E, out] (int8) -> float32 [K, out]
    out[j] = x[j] @ kernel[experts[j]] (* scale[experts[j]])
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Tile sizes, largest first: rows of `in` folded per loop step, output columns per program. Measured on
# an H200 (bench/expert_gemv.py, a layer of Mixtral-8x7B's experts, 4.0 TB/s read bandwidth), 512 x 64
# streams bfloat16 weights at 3.1-3.4 TB/s and int8 at 1.3-1.4 TB/s; XLA's gather + dot: 1.2 and 0.9.
BLOCKS_IN, BLOCKS_OUT = (512, 256, 128, 64, 32, 16), (64, 32, 16)


def _kernel(experts_ref, x_ref, w_ref, *rest, n_in: int, block_in: int, block_out: int, scaled: bool):
    scale_ref, out_ref = rest if scaled else (None, rest[0])
    slot, tile = pl.program_id(0), pl.program_id(1)
    expert = experts_ref[slot]
    cols = pl.ds(tile * block_out, block_out)
    # 16-bit weights go through the tensor cores: x as row 0 of a 16-row tile (their smallest), zeros
    # below. Others (int8, float32) are widened to float32 and multiplied-added on the vector units
    # (int8 through the tensor cores, also with float16 made by bit arithmetic, measured no faster).
    tensor_cores = w_ref.dtype in (jnp.bfloat16, jnp.float16)

    def step(i, acc):
        rows = pl.ds(i * block_in, block_in)
        x = x_ref[slot, rows]  # [block_in]
        w = w_ref[expert, rows, cols]  # [block_in, block_out]
        if tensor_cores:
            first_row = jax.lax.broadcasted_iota(jnp.int32, (16, block_in), 0) == 0
            x16 = jnp.where(first_row, jnp.broadcast_to(x[None, :], (16, block_in)), 0).astype(w.dtype)
            return acc + jnp.dot(x16, w, preferred_element_type=jnp.float32)  # [16, block_out], rows 1.. zero
        return acc + jnp.sum(x.astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0)

    acc = jax.lax.fori_loop(0, n_in // block_in, step,
                            jnp.zeros((16, block_out) if tensor_cores else (block_out,), jnp.float32))
    if tensor_cores:
        acc = jnp.sum(acc, axis=0)
    if scaled:
        acc = acc * scale_ref[expert, cols].astype(jnp.float32)
    out_ref[slot, cols] = acc


def _blocks(n_in: int, n_out: int) -> tuple[int, int] | None:
    block_in = next((b for b in BLOCKS_IN if n_in % b == 0), None)
    block_out = next((b for b in BLOCKS_OUT if n_out % b == 0), None)
    return None if block_in is None or block_out is None else (block_in, block_out)


def supported(n_in: int, n_out: int) -> bool:
    return _blocks(n_in, n_out) is not None


def expert_gemv(x: jax.Array, experts: jax.Array, kernel: jax.Array, scale: jax.Array | None = None,
                *, interpret: bool = False) -> jax.Array:
    """x [K, in] @ kernel[experts] [K, in, out] (* scale[experts] [K, out]) -> float32 [K, out]."""
    K, n_in = x.shape
    n_out = kernel.shape[-1]
    block_in, block_out = _blocks(n_in, n_out)
    operands = (experts.astype(jnp.int32), x, kernel) + (() if scale is None else (scale,))
    return pl.pallas_call(
        functools.partial(_kernel, n_in=n_in, block_in=block_in, block_out=block_out, scaled=scale is not None),
        out_shape=jax.ShapeDtypeStruct((K, n_out), jnp.float32),
        grid=(K, n_out // block_out),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
    )(*operands)
