"""Linear layers and where their weights come from.

`Weights` is a source of weights already placed in their shards (checkpoint.CheckpointWeights reads
them from disk, bench/full_size.RandomWeights draws them on the devices); `Linear` holds one weight,
dense or weight-only quantized (quantize.py).
"""

from __future__ import annotations

from typing import Protocol

import jax
from flax import nnx

from . import quantize
from .config import MixtralConfig


class Weights(Protocol):
    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array: ...

    def linear(self, name: str, spec: tuple, rows: slice | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(kernel, quantization parameters: none for a dense kernel, see quantize.PARAMS)."""
        ...


class Linear(nnx.Module):
    """y = x @ W, W [in, out] dense or weight-only quantized (quantize.py)."""

    def __init__(self, weights: tuple[jax.Array, tuple[jax.Array, ...]], config: MixtralConfig):
        kernel, params = weights
        self.kernel = nnx.Param(kernel)
        self.qparams = nnx.List([nnx.Param(p) for p in params])
        self.quantization = config.quantization
        self.group = config.quant_group_size

    def arrays(self) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return self.kernel[...], tuple(p[...] for p in self.qparams)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, params = self.arrays()
        return quantize.matmul(x, kernel, params, self.quantization, self.group)
