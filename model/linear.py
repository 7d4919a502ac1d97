"""Linear layers and where their weights come from.

`Weights` is a source of weights already placed in their shards (checkpoint.CheckpointWeights reads
them from disk, bench/full_size.RandomWeights draws them on the devices); `Linear` holds one weight,
dense or weight-only quantized (quantize.py).
"""

from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx
from jax.sharding import Mesh

from . import gpu_linear, quantize
from .config import MixtralConfig


class Weights(Protocol):
    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array: ...

    def linear(self, name: str, spec: tuple, rows: slice | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(kernel, quantization parameters: none for a dense kernel, see quantize.PARAMS)."""
        ...


class Linear(nnx.Module):
    """y = x @ W, W [in, out] dense or weight-only quantized (quantize.py).

    `gpu_kernels` (a quantized weight on a GPU, given its mesh and [in, out] partition spec): W is kept
    in the layout of our Pallas kernels and multiplied through them (gpu_linear.py)."""

    def __init__(self, weights: tuple[jax.Array, tuple[jax.Array, ...]], config: MixtralConfig,
                 gpu_kernels: tuple[Mesh, tuple] | None = None):
        kernel, params = weights
        self.quantization = config.quantization
        self.group = config.quant_group_size
        self.gpu_kernels = gpu_kernels if gpu_kernels and self.quantization and gpu_linear.supported(
            *kernel.shape[-2:], self.quantization, self.group, *gpu_kernels) else None
        if self.gpu_kernels:
            kernel, params = gpu_linear.kernel_layout((kernel, params), self.quantization, *self.gpu_kernels)
        self.kernel = nnx.Param(kernel)
        self.qparams = nnx.List([nnx.Param(p) for p in params])

    def arrays(self) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return self.kernel[...], tuple(p[...] for p in self.qparams)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gpu_kernels:
            return gpu_linear.matmul(x, self.arrays(), self.quantization, *self.gpu_kernels).astype(x.dtype)
        kernel, params = self.arrays()
        return quantize.matmul(x, kernel, params, self.quantization, self.group)
