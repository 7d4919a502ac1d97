"""Linear layers and where their weights come from.

`Weights` is a source of weights already placed in their shards (checkpoint.CheckpointWeights reads
them from disk, bench/full_size.RandomWeights draws them on the devices); `Linear` holds one weight,
dense or weight-only quantized (quantize.py).

On a CPU with the native kernels (cpu_matmul.py) a Linear keeps its weight out-major ([out, in], int4
packed along `in`), laid out once at load by `gpu_linear.kernel_layout` (the GPU kernels' layout), and multiplies through the kernels, each device
on its own shard (`CpuKernels`); elsewhere it keeps the checkpoint's [in, out] and runs on XLA's matmuls.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from . import cpu_matmul, gpu_linear, quantize
from .config import MixtralConfig

# A weight as a Weights source hands it out: (kernel [..., in, out], quantization parameters).
Matrix = tuple[jax.Array, tuple[jax.Array, ...]]


def use_cpu_kernels(mesh: Mesh, config: MixtralConfig) -> bool:
    """Whether a model on `mesh` runs its matmuls through the native CPU kernels. Where it cannot (they
    were not built, or failed to load), a quantized or bfloat16 model says once why it will be slow."""
    if mesh.devices.flat[0].platform != "cpu":
        return False
    if not cpu_matmul.available() and (config.quantization or config.dtype != "float32"):
        cpu_matmul.warn_once()
    return cpu_matmul.available() and cpu_matmul.supports(config.quantization, config.quant_group_size)


def out_major_matmul(x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], quantization: str | None,
                     group: int) -> jax.Array:
    """x [..., in] @ an out-major weight on one device, through the CPU kernels -> float32 [..., out];
    float32 weights times more than a few rows through XLA's matmul instead (faster than ours there)."""
    if kernel.dtype == jnp.float32 and math.prod(x.shape[:-1]) > cpu_matmul.GEMV_MAX_ROWS:
        return jnp.einsum("...i,oi->...o", x, kernel, preferred_element_type=jnp.float32)
    return cpu_matmul.matmul(x, kernel, params, quantization, group)


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """Where an out-major weight lives, for the CPU kernels: static, hashable (an NNX static attribute)."""
    mesh: Mesh
    spec: tuple  # the checkpoint layout's [in, out] partition spec

    def matmul(self, x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], quantization: str | None,
               group: int) -> jax.Array:
        """x [..., in] @ the out-major weight -> float32 [..., out]: each device multiplies its shard of
        x by its shard of the weight; shards of the inputs are summed."""
        split_in, split_out = self.spec[-2], self.spec[-1]
        lead = (None,) * (x.ndim - 1)

        def local(x, kernel, params):
            y = out_major_matmul(x, kernel, params, quantization, group)
            return y if split_in is None else jax.lax.psum(y, split_in)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(*lead, split_in), *gpu_linear.stored_specs(self.spec, quantization)),
                             out_specs=P(*lead, split_out), check_vma=False)(x, kernel, params)


class Weights(Protocol):
    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array: ...

    def linear(self, name: str, spec: tuple, rows: slice | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(kernel, quantization parameters: none for a dense kernel, see quantize.PARAMS)."""
        ...


class Linear(nnx.Module):
    """y = x @ W, W [in, out] dense or weight-only quantized (quantize.py).

    `gpu_kernels` (a quantized weight on a GPU, given its mesh and [in, out] partition spec): W is kept
    in the layout of our Pallas kernels and multiplied through them (gpu_linear.py). `cpu` (on a CPU with
    the native kernels): W is kept out-major, the same layout, and multiplied through them (cpu_matmul.py)."""

    def __init__(self, weights: Matrix, config: MixtralConfig, gpu_kernels: tuple[Mesh, tuple] | None = None,
                 cpu: CpuKernels | None = None):
        kernel, params = weights
        self.quantization = config.quantization if params else None  # a dense weight has no parameters
        self.group = config.quant_group_size
        self.gpu_kernels = gpu_kernels if gpu_kernels and self.quantization and gpu_linear.supported(
            *kernel.shape[-2:], self.quantization, self.group, *gpu_kernels) else None
        self.cpu = cpu
        if self.gpu_kernels or cpu:
            mesh, spec = self.gpu_kernels or (cpu.mesh, cpu.spec)
            kernel, params = gpu_linear.kernel_layout((kernel, params), self.quantization, mesh, spec)
        self.kernel = nnx.Param(kernel)
        self.qparams = nnx.List([nnx.Param(p) for p in params])

    def arrays(self) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return self.kernel[...], tuple(p[...] for p in self.qparams)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gpu_kernels:
            return gpu_linear.matmul(x, self.arrays(), self.quantization, *self.gpu_kernels).astype(x.dtype)
        kernel, params = self.arrays()
        if self.cpu is not None:
            return self.cpu.matmul(x, kernel, params, self.quantization, self.group).astype(x.dtype)
        return quantize.matmul(x, kernel, params, self.quantization, self.group)
