"""Quantized linear layers on a GPU, through our Pallas kernels.

XLA multiplies by an int8 or int4 weight by widening it first (for int4 a bfloat16 copy of the whole
weight is written and read back), so on a GPU (`branchless`) quantized weights go through our kernels:
expert_gemv for one row (decode), grouped_matmul for many (prefill; one group). Both read the out-major
layout of linear.py: int8 [out, in]; int4 packed two per byte along the inputs, uint8 [out, in/2], with
scales and offsets [out, in/group].
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from . import expert_gemv, grouped_matmul
from .linear import out_major_specs
from .sharding import sum_over


def kernel_dtype(quantization: str | None, dtype) -> jnp.dtype:
    """The dtype the kernels see a weight in (int4: packed bytes)."""
    return jnp.dtype({"int8": jnp.int8, "int4": jnp.uint8}.get(quantization, dtype))


@dataclasses.dataclass(frozen=True)
class GpuKernels:
    """Where an out-major quantized weight lives, for the GPU kernels: static, hashable (an NNX static
    attribute). A `linear.Kernels`."""
    mesh: Mesh
    spec: tuple  # the checkpoint layout's [in, out] partition spec

    def supports(self, shape: tuple[int, ...], quantization: str | None, group: int) -> bool:
        """Quantized weights whose blocks (one per device) both kernels can tile."""
        if quantization is None:
            return False
        n_in, n_out = (n // (self.mesh.shape[axis] if axis else 1) for n, axis in zip(shape[-2:], self.spec[-2:]))
        dtype = kernel_dtype(quantization, None)
        return (expert_gemv.supported(n_in, n_out, dtype, group)
                and grouped_matmul.tiling_for(n_in, n_out, dtype, group) is not None)

    def matmul(self, x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], quantization: str | None,
               group: int) -> jax.Array:
        """x [..., in] @ the weight -> float32 [..., out]: each device multiplies by its block; a split
        input dim is summed over."""
        in_axis, out_axis = self.spec
        interpret = self.mesh.devices.flat[0].platform == "cpu"  # the kernels' tests run them interpreted
        lead, n_in = x.shape[:-1], x.shape[-1]
        rows = x.reshape(-1, n_in)
        n_rows = rows.shape[0]

        def local(rows, kernel, params):
            kernel, params = kernel[None], tuple(p[None] for p in params)  # one "expert"
            if n_rows == 1:
                out = expert_gemv.expert_gemv(rows, jnp.zeros(1, jnp.int32), kernel, *params, interpret=interpret)
            else:
                block = grouped_matmul.block_rows_for(n_rows)
                padded = -(-n_rows // block) * block
                rows = jnp.pad(rows, ((0, padded - n_rows), (0, 0)))
                out = grouped_matmul.grouped_matmul(rows, jnp.zeros(padded // block, jnp.int32), kernel, *params,
                                                    block_rows=block, interpret=interpret)[:n_rows]
            return sum_over(out, in_axis, self.mesh)

        out = jax.shard_map(local, mesh=self.mesh, in_specs=(P(), *out_major_specs(self.spec, quantization)),
                            out_specs=P(None, out_axis), check_vma=False)(rows, kernel, params)
        return out.reshape(*lead, out.shape[-1])
