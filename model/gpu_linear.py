"""Quantized weights on a GPU: the layout the Pallas kernels read, and a linear layer through them.

XLA multiplies by an int8 or int4 weight by widening it first (for int4 a bfloat16 copy of the whole
weight is written and read back), so on a GPU (`branchless`) quantized weights go through our kernels:
expert_gemv for one row (decode), grouped_matmul for many (prefill; one group). Both read quantized
weights out-major: int8 [.., out, in]; int4 packed two per byte along the inputs, uint8 [.., out, in/2],
with scales and offsets [.., out, in/group].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import expert_gemv, grouped_matmul, quantize

Matrix = tuple[jax.Array, tuple[jax.Array, ...]]  # (kernel, quantization parameters)


def out_major_spec(spec: tuple) -> tuple:
    return spec[:-2] + (spec[-1], spec[-2])


def _swap_last(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


@functools.cache
def _relayout(fn, sharding: NamedSharding):
    """fn compiled once per placement of its result."""
    return jax.jit(fn, out_shardings=sharding)


def stored_specs(spec: tuple, mode: str | None) -> tuple[P, tuple[P, ...]]:
    """Partition specs of a quantized weight and its parameters in the kernels' layout, from the
    weight's [.., in, out] spec."""
    kernel = P(*out_major_spec(spec))
    if mode is None:  # a dense weight (the CPU kernels' layout)
        return kernel, ()
    return kernel, (kernel, kernel) if mode == "int4" else (P(*quantize.param_spec(spec, mode)),)


def kernel_layout(matrix: Matrix, mode: str, mesh: Mesh, spec: tuple) -> Matrix:
    """A quantized weight as quantize.py keeps it ([.., in, out], int4 as jnp.uint4, split by `spec`) ->
    the kernels' out-major layout, split the same way."""
    kernel, params = matrix
    stored = NamedSharding(mesh, P(*out_major_spec(spec)))
    if mode == "int4":
        return _relayout(expert_gemv.pack_int4, stored)(kernel), tuple(_relayout(_swap_last, stored)(p) for p in params)
    return _relayout(_swap_last, stored)(kernel), params


def kernel_dtype(mode: str | None, dtype) -> jnp.dtype:
    """The dtype the kernels see a weight in (int4: packed bytes)."""
    return jnp.dtype({"int8": jnp.int8, "int4": jnp.uint8}.get(mode, dtype))


def supported(n_in: int, n_out: int, mode: str, group: int, mesh: Mesh | None = None, spec: tuple = (None, None)) -> bool:
    """Whether both kernels can tile a weight [n_in, n_out] (each device's block of it, split by spec)."""
    n_in, n_out = (n // (mesh.shape[axis] if axis else 1) for n, axis in zip((n_in, n_out), spec[-2:]))
    dtype = kernel_dtype(mode, None)
    return expert_gemv.supported(n_in, n_out, dtype, group) and grouped_matmul.tiling_for(n_in, n_out, dtype, group) is not None


def matmul(x: jax.Array, matrix: Matrix, mode: str, mesh: Mesh, spec: tuple) -> jax.Array:
    """x [..., in] @ one weight in the kernels' layout, split over `mesh` as `spec` ([in, out] axes) says
    -> float32 [..., out]. Each device multiplies by its block; a split input dim is summed over."""
    kernel, params = matrix
    in_axis, out_axis = spec
    interpret = mesh.devices.flat[0].platform == "cpu"  # the kernels' tests run them interpreted
    lead, n_in = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n_in)
    n_rows = rows.shape[0]

    def local(rows, kernel, params):
        kernel, params = kernel[None], tuple(p[None] for p in params)  # one "expert"
        if n_rows == 1:
            out = expert_gemv.expert_gemv(rows, jnp.zeros(1, jnp.int32), kernel, *params, interpret=interpret)
        else:
            block = grouped_matmul.SMALL.block_rows if n_rows < 256 else grouped_matmul.TILING.block_rows
            padded = -(-n_rows // block) * block
            rows = jnp.pad(rows, ((0, padded - n_rows), (0, 0)))
            out = grouped_matmul.grouped_matmul(rows, jnp.zeros(padded // block, jnp.int32), kernel, *params,
                                                block_rows=block, interpret=interpret)[:n_rows]
        return jax.lax.psum(out, in_axis) if in_axis is not None else out

    out = jax.shard_map(local, mesh=mesh, in_specs=(P(), *stored_specs(spec, mode)),
                        out_specs=P(None, out_axis), check_vma=False)(rows, kernel, params)
    return out.reshape(*lead, out.shape[-1])
