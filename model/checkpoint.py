"""Loading our checkpoint (its files: manifest.py) straight into device shards.

The tensors, their names, shapes and layout: weight_table.py. Quantized weights keep their name (int8,
or uint8 with two int4 per byte) and add their parameters (`<name>.scale`, ...; see quantize.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import quantize
from .config import MixtralConfig
from .linear import swap_spec, swapped_on_device
from .manifest import CheckpointError, verify
from .mixtral import Mixtral
from .safetensors_io import NUMPY_DTYPES, SafetensorsError, TensorFiles
from .sharding import make_mesh
from .weight_table import info_of, stored_out_major, swap_last, weight_table


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(index))


class CheckpointWeights:
    """Hands each weight to the model as a jax.Array already split into its device shards: every device
    reads only its own slice from disk (`jax.make_array_from_callback` + `TensorFiles.read_slice`); with
    several processes each reads only its own devices' slices. On a CPU a slice kept as stored (most of
    them) is the checkpoint file mapped in memory, used in place: loading reads nothing. Progress counts the checkpoint's bytes
    whose arrays are made (the same fraction on every process, however little of them it reads)."""

    def __init__(self, files: TensorFiles, config: MixtralConfig, mesh: Mesh,
                 on_progress: Callable[[float, str], None] | None = None, transpose_on_device: bool | None = None):
        self.files, self.config, self.mesh = files, config, mesh
        # a weight wanted in the other layout than the file's: each block transposed on the host as it is
        # read (numpy: ~1 GB/s), or on accelerators by the devices, after reading it as it is stored
        self.transpose_on_device = (mesh.devices.flat[0].platform != "cpu" if transpose_on_device is None
                                    else transpose_on_device)
        self.table = weight_table(config)
        self.on_progress = on_progress
        self.total = sum(f.stat().st_size for f in files.files())
        self.done = 0

    def _array(self, name: str, shape: tuple[int, ...], spec: tuple, rows: slice | None,
               convert: Callable[[np.ndarray], np.ndarray], dtype: np.dtype | None = None,
               packed_axis: int | None = None, stored_swapped: bool = False, swapped: bool = False) -> jax.Array:
        """A tensor whose [.., in, out] shape and spec are `shape` (as a format-1 checkpoint stores it:
        the weight table's, int4 values packed) and `spec`; `stored_swapped`: the file holds it with its
        last two dims swapped; `swapped`: so does the array made (each device's block transposed as it is
        read where the two differ). `rows` selects a range of the first dim; `dtype`: what `convert`
        gives (default: the dtype on disk); `packed_axis` is an axis stored at half length (int4 pairs)
        that `convert` doubles. Progress counts the bytes of the tensor (of its rows) once it is placed."""
        if swapped != stored_swapped and self.transpose_on_device and packed_axis is None:
            as_stored = self._array(name, shape, spec, rows, convert, dtype, packed_axis, stored_swapped, stored_swapped)
            return swapped_on_device(as_stored, NamedSharding(self.mesh, P(*(swap_spec(spec) if swapped else spec))))
        on_disk = swap_last(shape) if stored_swapped else tuple(shape)
        try:
            found = self.files.shape(name)
        except SafetensorsError as e:
            raise CheckpointError(f"{e}: the checkpoint does not match its config; convert it again") from None
        if tuple(found) != on_disk:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(found)}, its config says {on_disk}: "
                                  "the checkpoint does not match its config; convert it again")
        shape = list(shape)
        stored_dtype = self.files.dtype(name)
        read_bytes = int(np.prod(shape, dtype=np.int64)) * stored_dtype.itemsize
        if packed_axis is not None:
            shape[packed_axis] *= 2
        if rows is not None:
            read_bytes = read_bytes // shape[0] * (rows.stop - rows.start)
            shape[0] = rows.stop - rows.start
        if swapped:
            shape, spec = list(swap_last(shape)), swap_spec(spec)
        seen: dict[tuple, np.ndarray] = {}

        def read(index):
            index = _normalise(index, shape)
            key = tuple((s.start, s.stop) for s in index)
            if key not in seen:
                if swapped:  # to [.., in, out] coordinates
                    index = swap_last(index)
                if rows is not None:
                    index = (slice(index[0].start + rows.start, index[0].stop + rows.start),) + index[1:]
                if packed_axis is not None:
                    s = index[packed_axis]
                    index = index[:packed_axis] + (slice(s.start // 2, s.stop // 2),) + index[packed_axis + 1:]
                if stored_swapped:  # to the file's
                    index = swap_last(index)
                seen[key] = convert(self.files.read_slice(name, index, swap_last=swapped != stored_swapped, mapped=True))
            return seen[key]

        array = jax.make_array_from_callback(tuple(shape), NamedSharding(self.mesh, P(*spec)), read,
                                             dtype=stored_dtype if dtype is None else dtype)
        self.done += read_bytes
        if self.on_progress:
            self.on_progress(min(1.0, self.done / max(self.total, 1)), f"loading weights ({name})")
        return array

    def dense(self, name: str, spec: tuple, rows: slice | None = None, out_major: bool = False) -> jax.Array:
        """`out_major`: a 2-d weight with its dims swapped (the LM head, for the CPU kernels)."""
        dtype, info = NUMPY_DTYPES[self.config.dtype], info_of(self.table, name)
        return self._array(name, info.shape, spec, rows, lambda a: a.astype(dtype, copy=False), dtype,
                           stored_swapped=stored_out_major(info, self.config), swapped=out_major)

    def linear(self, name: str, spec: tuple, rows: slice | None = None, out_major: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        mode, info = self.config.quantization, info_of(self.table, name)
        if mode is None or not info.quantizable:
            return self.dense(name, spec, rows, out_major), ()
        stored_swapped = stored_out_major(info, self.config)
        _, values = quantize.stored_values(info.shape, mode)
        if out_major or mode == "int8":
            # out-major int4 is the [.., in/2, out] bytes (even input in the low nibble) swapped, as they are
            kernel = self._array(name, values, spec, rows, lambda a: a, stored_swapped=stored_swapped, swapped=out_major)
        else:
            kernel = self._array(name, values, spec, rows, quantize.unpack_int4, quantize.UNPACKED_INT4,
                                 packed_axis=len(spec) - 2, stored_swapped=stored_swapped)
        # int4's scales and offsets [.., in/group, out] swap with the values; int8's scales [.., out] have no `in`
        swaps = mode == "int4"
        params = tuple(self._array(f"{name}.{param}", quantize.param_shape(info.shape, mode, self.config.quant_group_size),
                                   quantize.param_spec(spec, mode), rows, lambda a: a,
                                   stored_swapped=stored_swapped and swaps, swapped=out_major and swaps)
                       for param in quantize.PARAMS[mode])
        return kernel, params


def load(ckpt_dir: str | Path, mesh: Mesh | None = None, *, dtype: str | None = None,
         on_progress: Callable[[float, str], None] | None = None, branchless: bool | None = None,
         cpu_kernels: bool | None = None) -> Mixtral:
    """Our converted checkpoint -> a Mixtral NNX module with its weights sharded over `mesh`
    (default: every device on the tensor-parallel axis). `dtype` overrides the checkpoint's;
    `branchless` the backend's choice of decode path, `cpu_kernels` of matmuls (see `Mixtral`). The
    checkpoint is verified first (`verify`: files not hashed since they changed are hashed now).
    `on_progress(fraction, what)` reports one fraction from 0 to 1 that never goes back: the verifying
    takes its first half when files are hashed, the loading the rest."""
    ckpt_dir = Path(ckpt_dir)
    hashed = False

    def verifying(fraction: float, what: str) -> None:
        nonlocal hashed
        hashed = True
        on_progress(fraction / 2, what)

    def loading(fraction: float, what: str) -> None:
        on_progress(0.5 + fraction / 2 if hashed else fraction, what)

    config = verify(ckpt_dir, on_progress=verifying if on_progress else None)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    mesh = mesh if mesh is not None else make_mesh()
    try:
        files = TensorFiles(ckpt_dir)
    except SafetensorsError as e:
        raise CheckpointError(f"{e}; convert the model again") from None
    with jax.set_mesh(mesh):
        return Mixtral(config, CheckpointWeights(files, config, mesh, loading if on_progress else None), mesh,
                       branchless, cpu_kernels)
