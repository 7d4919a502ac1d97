"""Decode-time expert matmuls on a GPU: one Pallas kernel reads just the chosen experts' weights, in place.

XLA on a GPU runs a `cond` by copying its predicate to the host and waiting (~40 us each), and gathers
chosen experts by copying their weights first; for int8 weights it also writes a bfloat16 copy of each
before the matmul. This kernel does none of that: for each (slot, tile of output columns) it looks the
slot's expert up on the device and streams that expert's weights for the tile, accumulating in float32.
On the CPU it runs interpreted (tests only: the CPU's decode path uses conds).

    x [K, in], experts int32 [K], kernel [E, in, out] (or [E, out, in]: out_major),
    scale [E, out] (int8) -> float32 [K, out]:  out[j] = x[j] @ kernel[experts[j]] (* scale[experts[j]])

Two ways through, by weight type (one Mixtral-8x7B MoE layer, bench/expert_gemv.py; XLA's gather + dot
in brackets):
- 16-bit weights, [E, in, out]: the tensor cores multiply x, as row 0 of a 16-row tile (their smallest;
  zeros below), by [512, 64] weight tiles: 3.1-3.4 TB/s on an H200 (4.0 TB/s read bandwidth) [1.2],
  2.2 TB/s on an H100 (2.8) [0.85].
- int8 weights, out_major [E, out, in]: each program reads 8 output rows, 512 contiguous inputs at a
  time, widened to float32 and multiplied-added on the vector units: 1.65-1.85 TB/s on an H100 [0.7];
  1.3 when read in-major, through the tensor cores or not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

BLOCKS_IN = (512, 256, 128, 64, 32, 16)  # inputs folded per loop step, largest that divides `in` first
BLOCKS_OUT = (64, 32, 16)  # output columns per program, [E, in, out] layout
BLOCK_OUT_ROWS = 8  # output rows per program, out_major layout


def stores_out_major(dtype) -> bool:
    """Whether expert weights of this dtype are best stored [E, out, in] for this kernel."""
    return jnp.dtype(dtype) == jnp.int8


def _kernel(experts_ref, x_ref, w_ref, *rest, n_in: int, block_in: int, block_out: int, scaled: bool,
            out_major: bool):
    scale_ref, out_ref = rest if scaled else (None, rest[0])
    slot, tile = pl.program_id(0), pl.program_id(1)
    expert = experts_ref[slot]
    outs = pl.ds(tile * block_out, block_out)
    tensor_cores = not out_major and w_ref.dtype in (jnp.bfloat16, jnp.float16)

    def step(i, acc):
        ins = pl.ds(i * block_in, block_in)
        x = x_ref[slot, ins]  # [block_in]
        if out_major:
            w = w_ref[expert, outs, ins].astype(jnp.float32)  # [block_out, block_in]
            return acc + w * x.astype(jnp.float32)[None, :]
        w = w_ref[expert, ins, outs]  # [block_in, block_out]
        if tensor_cores:
            first_row = jax.lax.broadcasted_iota(jnp.int32, (16, block_in), 0) == 0
            x16 = jnp.where(first_row, jnp.broadcast_to(x[None, :], (16, block_in)), 0).astype(w.dtype)
            return acc + jnp.dot(x16, w, preferred_element_type=jnp.float32)  # [16, block_out], rows 1.. zero
        return acc + jnp.sum(x.astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0)

    acc_shape = (block_out, block_in) if out_major else (16, block_out) if tensor_cores else (block_out,)
    acc = jax.lax.fori_loop(0, n_in // block_in, step, jnp.zeros(acc_shape, jnp.float32))
    if out_major:
        acc = jnp.sum(acc, axis=1)
    elif tensor_cores:
        acc = jnp.sum(acc, axis=0)
    if scaled:
        acc = acc * scale_ref[expert, outs].astype(jnp.float32)
    out_ref[slot, outs] = acc


def _blocks(n_in: int, n_out: int, out_major: bool) -> tuple[int, int] | None:
    block_in = next((b for b in BLOCKS_IN if n_in % b == 0), None)
    outs = (BLOCK_OUT_ROWS,) if out_major else BLOCKS_OUT
    block_out = next((b for b in outs if n_out % b == 0), None)
    return None if block_in is None or block_out is None else (block_in, block_out)


def supported(n_in: int, n_out: int, dtype) -> bool:
    return _blocks(n_in, n_out, stores_out_major(dtype)) is not None


def expert_gemv(x: jax.Array, experts: jax.Array, kernel: jax.Array, scale: jax.Array | None = None,
                *, interpret: bool = False) -> jax.Array:
    """x [K, in] @ kernel[experts] (* scale[experts]) -> float32 [K, out]; the kernel is [E, in, out],
    or [E, out, in] where `stores_out_major(kernel.dtype)`."""
    K, n_in = x.shape
    out_major = stores_out_major(kernel.dtype)
    n_out = kernel.shape[1] if out_major else kernel.shape[2]
    block_in, block_out = _blocks(n_in, n_out, out_major)
    operands = (experts.astype(jnp.int32), x, kernel) + (() if scale is None else (scale,))
    return pl.pallas_call(
        functools.partial(_kernel, n_in=n_in, block_in=block_in, block_out=block_out, scaled=scale is not None,
                          out_major=out_major),
        out_shape=jax.ShapeDtypeStruct((K, n_out), jnp.float32),
        grid=(K, n_out // block_out),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
    )(*operands)
