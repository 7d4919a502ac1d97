"""Linear layers and where their weights come from.

`Weights` is a source of weights already placed in their shards (checkpoint.CheckpointWeights reads
them from disk, bench/full_size.RandomWeights draws them on the devices); `Linear` holds one weight,
dense or weight-only quantized (quantize.py).

Our kernels read weights out-major ([out, in], int4 packed along `in`; the CPU's int4 interleaved too):
on a CPU with the native kernels (cpu_matmul.py) every Linear, on a GPU the quantized ones (gpu_linear.py). Such a Linear lays its weight
out once at load (`out_major`) and multiplies through its `kernels` (`CpuKernels` here, `GpuKernels`
there), each device on its own shard; any other keeps the checkpoint's [in, out] for XLA's matmuls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import cpu_matmul, expert_gemv, quantize
from .config import MixtralConfig
from .sharding import sum_over
from .weight_table import swap_last

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


def out_major(matrix: Matrix, quantization: str | None, mesh: Mesh, spec: tuple) -> Matrix:
    """[..., in, out] (int4 as uint4), split by `spec` -> [..., out, in] (int4 packed two per byte along
    `in`, its scales and offsets [..., out, in/group]; int8 scales unchanged), split the same way: the
    layout of the CPU kernels and of the GPU's quantized kernels."""
    kernel, params = matrix
    sharding = NamedSharding(mesh, P(*swap_last(spec)))
    if quantization == "int4":
        return (_relayout(expert_gemv.pack_int4, sharding)(kernel),
                tuple(_relayout(_swap_last, sharding)(p) for p in params))
    return _relayout(_swap_last, sharding)(kernel), params


def out_major_specs(spec: tuple, quantization: str | None) -> tuple[P, tuple[P, ...]]:
    """Partition specs of an out-major weight and of its quantization parameters, from the checkpoint
    layout's [.., in, out] spec (int8 scales [.., out]; int4 scales and offsets [.., out, in/group])."""
    kernel = P(*swap_last(spec))
    if quantization is None:
        return kernel, ()
    return kernel, (kernel, kernel) if quantization == "int4" else (P(*quantize.param_spec(spec, quantization)),)


def _swap_last(a: jax.Array) -> jax.Array:
    return jnp.swapaxes(a, -1, -2)


def swapped_on_device(a: jax.Array, sharding: NamedSharding) -> jax.Array:
    """`a` with its last two dims swapped, placed by `sharding`, by the devices."""
    return _relayout(_swap_last, sharding)(a)


@functools.cache
def _relayout(fn, sharding: NamedSharding):
    """fn compiled once per placement of its result."""
    return jax.jit(fn, out_shardings=sharding)


@dataclasses.dataclass(frozen=True)
class CpuKernels:
    """Where an out-major weight lives, for the CPU kernels: static, hashable (an NNX static attribute)."""
    mesh: Mesh
    spec: tuple  # the checkpoint layout's [in, out] partition spec

    def matmul(self, x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], quantization: str | None,
               group: int) -> jax.Array:
        """x [..., in] @ the out-major weight -> float32 [..., out]: each device multiplies its shard of
        x by its shard of the weight; shards of the inputs are summed."""
        return cpu_matmuls(x, [(self, (kernel, params))], quantization, group)[0]

    def supports(self, shape: tuple[int, ...], quantization: str | None, group: int) -> bool:
        return True


def cpu_matmuls(x: jax.Array, weights: Sequence[tuple[CpuKernels, Matrix]], quantization: str | None,
                group: int) -> list[jax.Array]:
    """x [..., in] @ each out-major weight -> float32 [..., out_j], in one kernel call on each device
    (its shard of x times its shards of the weights; shards of the inputs summed). The weights share one
    type and one split of their inputs (`spec[-2]`). Float32 weights too: in decode our gemv streams them
    faster than XLA's matmul (alternating in one process, mini-mixtral 27.2 against 24.4 tok/s, the demo
    31.0 against 27.1; level where memory is slow), in prefill our gemm (326-339 tok/s against 263-273)."""
    mesh, split_in = weights[0][0].mesh, weights[0][0].spec[-2]
    lead = (None,) * (x.ndim - 1)

    def local(x, matrices):
        return sum_over(cpu_matmul.matmuls(x, matrices, group), split_in, mesh)

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(P(*lead, split_in), [out_major_specs(k.spec, quantization) for k, _ in weights]),
                         out_specs=[P(*lead, k.spec[-1]) for k, _ in weights], check_vma=False)(
        x, [matrix for _, matrix in weights])


class Kernels(Protocol):
    """Our matmul kernels for one out-major weight (`CpuKernels`, gpu_linear.GpuKernels): static, hashable."""
    mesh: Mesh
    spec: tuple  # the checkpoint layout's [in, out] partition spec

    def supports(self, shape: tuple[int, ...], quantization: str | None, group: int) -> bool:
        """Whether they can multiply by a weight of this [in, out] shape (each device by its block)."""
        ...

    def matmul(self, x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], quantization: str | None,
               group: int) -> jax.Array:
        """x [..., in] @ the weight -> float32 [..., out]."""
        ...


class Weights(Protocol):
    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array: ...

    def linear(self, name: str, spec: tuple, rows: slice | None = None, out_major: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """(kernel, quantization parameters: none for a dense kernel, see quantize.PARAMS), [.., in, out]
        split by `spec`, or with `out_major` as the CPU kernels take them (`out_major`'s layout, int4 values
        interleaved: cpu_matmul.py; read so, without a relayout on the devices, where the source can)."""
        ...


class Linear(nnx.Module, pytree=False):
    """y = x @ W, W dense or weight-only quantized (quantize.py): [in, out] for XLA's matmuls, or
    out-major for our kernels (`kernels` given and able to tile W: laid out here, once, unless the
    weights come `laid_out` already, as `Weights.linear(..., out_major=True)` hands them out)."""

    def __init__(self, weights: Matrix, config: MixtralConfig, kernels: Kernels | None = None, laid_out: bool = False):
        kernel, params = weights
        self.quantization = config.quantization if params else None  # a dense weight has no parameters
        self.group = config.quant_group_size
        if kernels is not None and not kernels.supports(kernel.shape, self.quantization, self.group):
            kernels = None
        self.kernels = kernels
        if kernels is not None and not laid_out:
            kernel, params = out_major(weights, self.quantization, kernels.mesh, kernels.spec)
        self.kernel = nnx.Param(kernel)
        self.qparams = nnx.List([nnx.Param(p) for p in params])

    def arrays(self) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        return self.kernel[...], tuple(p[...] for p in self.qparams)

    def float32(self, x: jax.Array) -> jax.Array:
        """x [..., in] @ W -> float32 [..., out] (the LM head's logits)."""
        kernel, params = self.arrays()
        if self.kernels is not None:
            return self.kernels.matmul(x, kernel, params, self.quantization, self.group)
        if self.quantization is None:
            return jnp.matmul(x, kernel, preferred_element_type=jnp.float32)
        return quantize.matmul(x.astype(jnp.float32), kernel, params, self.quantization, self.group)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, params = self.arrays()
        if self.kernels is not None:
            return self.kernels.matmul(x, kernel, params, self.quantization, self.group).astype(x.dtype)
        return quantize.matmul(x, kernel, params, self.quantization, self.group)


def project(x: jax.Array, linears: Sequence[Linear]) -> list[jax.Array]:
    """x [..., in] @ each Linear's weight -> [..., out_j] in x's dtype: in one call of the CPU kernels where
    all of them multiply there alike (the attention's q, k and v: x prepared once, one pass over the
    threads instead of three: mini-mixtral's int4 decode 8% faster, alternating in one process), else one
    by one."""
    kernels = [linear.kernels for linear in linears]
    if all(isinstance(k, CpuKernels) for k in kernels) and len(
            {(k.mesh, k.spec[-2], linear.quantization, linear.kernel.dtype) for k, linear in zip(kernels, linears)}) == 1:
        ys = cpu_matmuls(x, [(k, linear.arrays()) for k, linear in zip(kernels, linears)], linears[0].quantization,
                         linears[0].group)
        return [y.astype(x.dtype) for y in ys]
    return [linear(x) for linear in linears]
