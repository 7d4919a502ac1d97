"""Decode-time expert matmuls on a GPU: one Pallas kernel reads just the chosen experts' weights, in place.

XLA on a GPU runs a `cond` by copying its predicate to the host and waiting (~40 us each), and gathers
chosen experts by copying their weights first; for quantized weights it also writes a bfloat16 copy of
each before the matmul. This kernel does none of that: for each (slot, tile of output columns) it looks
the slot's expert up on the device and streams that expert's weights for the tile, accumulating in
float32. On the CPU it runs interpreted (tests only: the CPU's decode path uses conds).

    x [K, in], experts int32 [K], kernel [E, ...] -> float32 [K, out]:  out[j] = x[j] @ W[experts[j]]

Weight types and the layout each is stored in (`stores_out_major`):
- 16/32-bit floats, [E, in, out]: the tensor cores multiply x, as row 0 of a 16-row tile (their
  smallest; zeros below), by [block_in, block_out] weight tiles.
- int8, [E, out, in], with scale [E, out] (quantize.py's per-output-channel int8): each program reads
  `block_out` output rows, `block_in` contiguous inputs at a time, widened to float32 and multiplied-added
  on the vector units.
- int4, packed two per byte along the inputs, uint8 [E, out, in/2] (even input in the low nibble), with
  scale and offset [E, out, in/group] (quantize.py's int4: w = q * scale + offset): per group,
  sum(x * w) = scale * sum(x * q) + offset * sum(x), so the kernel multiplies the nibbles by the even and
  odd inputs and needs only each group's sum of x beside.
The tile sizes (`Tiling`) were chosen by `python -m bench.expert_gemv --sweep` on an H100.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


class Tiling(NamedTuple):
    block_in: int  # inputs folded per loop step
    block_out: int  # output columns (or rows, out-major) per program
    num_warps: int = 4
    num_stages: int = 3


TILINGS = {  # by weight type: the first that divides the shape
    "float": (Tiling(512, 64), Tiling(256, 32), Tiling(128, 16), Tiling(32, 16), Tiling(16, 16)),
    "int8": (Tiling(512, 8), Tiling(256, 8), Tiling(64, 8), Tiling(16, 8)),
    "int4": (Tiling(512, 8), Tiling(256, 8), Tiling(64, 8)),
}


def weight_type(dtype) -> str:
    dtype = jnp.dtype(dtype)
    return "int8" if dtype == jnp.int8 else "int4" if dtype == jnp.uint8 else "float"


def stores_out_major(dtype) -> bool:
    """Whether expert weights of this dtype are stored [E, out, in] for this kernel (quantized ones)."""
    return weight_type(dtype) != "float"


def pack_int4(q: jax.Array) -> jax.Array:
    """uint4 (or uint8 in [0, 15]) [..., in, out] -> the kernel's uint8 [..., out, in/2], even input low."""
    q = jnp.swapaxes(q.astype(jnp.uint8), -1, -2)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def as_matmul_operands(kernel: jax.Array, params: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """One expert's stored (kernel, params) -> the [in, out] layout quantize.matmul takes (the paths
    that do not run this kernel: tests, shapes it cannot tile)."""
    kind = weight_type(kernel.dtype)
    if kind == "float":
        return kernel, params
    if kind == "int8":
        return kernel.T, params
    nibbles = jnp.stack([kernel & 0xF, kernel >> 4], axis=-1).reshape(kernel.shape[0], -1)  # [out, in]
    return nibbles.T.astype(jnp.uint4), tuple(p.T for p in params)


def _float_kernel(experts_ref, x_ref, w_ref, out_ref, *, tiling: Tiling, n_in: int):
    slot, tile = pl.program_id(0), pl.program_id(1)
    expert, bi = experts_ref[slot], tiling.block_in
    outs = pl.ds(tile * tiling.block_out, tiling.block_out)
    tensor_cores = w_ref.dtype in (jnp.bfloat16, jnp.float16)

    def step(i, acc):
        x = x_ref[slot, pl.ds(i * bi, bi)]  # [block_in]
        w = w_ref[expert, pl.ds(i * bi, bi), outs]  # [block_in, block_out]
        if tensor_cores:
            first_row = jax.lax.broadcasted_iota(jnp.int32, (16, bi), 0) == 0
            x16 = jnp.where(first_row, jnp.broadcast_to(x[None, :], (16, bi)), 0).astype(w.dtype)
            return acc + jnp.dot(x16, w, preferred_element_type=jnp.float32)  # [16, block_out], rows 1.. zero
        return acc + jnp.sum(x.astype(jnp.float32)[:, None] * w.astype(jnp.float32), axis=0)

    acc = jax.lax.fori_loop(0, n_in // bi, step,
                            jnp.zeros((16, tiling.block_out) if tensor_cores else (tiling.block_out,), jnp.float32))
    out_ref[slot, outs] = jnp.sum(acc, axis=0) if tensor_cores else acc


def _int8_kernel(experts_ref, x_ref, w_ref, scale_ref, out_ref, *, tiling: Tiling, n_in: int):
    slot, tile = pl.program_id(0), pl.program_id(1)
    expert, bi = experts_ref[slot], tiling.block_in
    outs = pl.ds(tile * tiling.block_out, tiling.block_out)

    def step(i, acc):
        ins = pl.ds(i * bi, bi)
        w = w_ref[expert, outs, ins].astype(jnp.float32)  # [block_out, block_in]
        return acc + w * x_ref[slot, ins].astype(jnp.float32)[None, :]

    acc = jax.lax.fori_loop(0, n_in // bi, step, jnp.zeros((tiling.block_out, bi), jnp.float32))
    out_ref[slot, outs] = jnp.sum(acc, axis=1) * scale_ref[expert, outs].astype(jnp.float32)


def _int4_kernel(experts_ref, x_even_ref, x_odd_ref, x_group_ref, w_ref, scale_ref, offset_ref, out_ref, *,
                 tiling: Tiling, n_in: int, group: int):
    slot, tile = pl.program_id(0), pl.program_id(1)
    expert, bo = experts_ref[slot], tiling.block_out
    half, groups = tiling.block_in // 2, tiling.block_in // group  # packed bytes, groups per step
    outs = pl.ds(tile * bo, bo)

    def step(i, acc):
        pairs, gs = pl.ds(i * half, half), pl.ds(i * groups, groups)
        w = w_ref[expert, outs, pairs]  # uint8 [block_out, block_in / 2]
        low, high = (w & 0xF).astype(jnp.float32), (w >> 4).astype(jnp.float32)
        xq = low * x_even_ref[slot, pairs][None, :] + high * x_odd_ref[slot, pairs][None, :]
        xq = jnp.sum(xq.reshape(bo, groups, group // 2), axis=2)  # [block_out, groups]: sum(x * q) per group
        scale, offset = scale_ref[expert, outs, gs].astype(jnp.float32), offset_ref[expert, outs, gs].astype(jnp.float32)
        return acc + xq * scale + offset * x_group_ref[slot, gs][None, :]

    acc = jax.lax.fori_loop(0, n_in // tiling.block_in, step, jnp.zeros((bo, groups), jnp.float32))
    out_ref[slot, outs] = jnp.sum(acc, axis=1)


def dims(kernel: jax.Array) -> tuple[int, int]:
    """(in, out) of one expert of a stored kernel."""
    kind = weight_type(kernel.dtype)
    if kind == "float":
        return kernel.shape[1], kernel.shape[2]
    return kernel.shape[2] * (2 if kind == "int4" else 1), kernel.shape[1]


def tiling_for(n_in: int, n_out: int, dtype, group: int | None = None) -> Tiling | None:
    """The first of the type's tilings that divides (in, out), or None (the kernel cannot run it)."""
    def fits(t: Tiling) -> bool:
        if group is not None and weight_type(dtype) == "int4" and t.block_in % group:
            return False
        return n_in % t.block_in == 0 and n_out % t.block_out == 0
    return next((t for t in TILINGS[weight_type(dtype)] if fits(t)), None)


def supported(n_in: int, n_out: int, dtype, group: int | None = None) -> bool:
    return tiling_for(n_in, n_out, dtype, group) is not None


def expert_gemv(x: jax.Array, experts: jax.Array, kernel: jax.Array, *params: jax.Array,
                tiling: Tiling | None = None, interpret: bool = False) -> jax.Array:
    """x [K, in] @ W[experts] -> float32 [K, out], W stored as the module docstring says, `params` the
    quantization parameters (int8: scale; int4: scale, offset)."""
    K, n_in = x.shape
    kind = weight_type(kernel.dtype)
    n_out = dims(kernel)[1]
    experts = experts.astype(jnp.int32)
    if kind == "int4":
        scale, offset = params
        group = n_in // scale.shape[-1]
        tiling = tiling or tiling_for(n_in, n_out, kernel.dtype, group)
        x32 = x.astype(jnp.float32)
        operands = (experts, x32[:, 0::2], x32[:, 1::2], x32.reshape(K, -1, group).sum(axis=-1), kernel, scale, offset)
        body = functools.partial(_int4_kernel, group=group)
    else:
        tiling = tiling or tiling_for(n_in, n_out, kernel.dtype)
        operands = (experts, x, kernel, *params)
        body = _int8_kernel if kind == "int8" else _float_kernel
    return pl.pallas_call(
        functools.partial(body, tiling=tiling, n_in=n_in),
        out_shape=jax.ShapeDtypeStruct((K, n_out), jnp.float32),
        grid=(K, n_out // tiling.block_out),
        compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
        interpret=interpret,
    )(*operands)
