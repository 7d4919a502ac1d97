"""Loading our checkpoint (its files: manifest.py) straight into device shards.

The tensors, their names, shapes and layout: weight_table.py. Quantized weights keep their name (int8,
or uint8 with two int4 per byte) and add their parameters (`<name>.scale`, ...; see quantize.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import cpu_matmul, quantize
from .config import MixtralConfig
from .manifest import CheckpointError, read_config, verify
from .safetensors_io import NUMPY_DTYPES, SafetensorsError, TensorFiles
from .sharding import make_mesh
from .weight_table import info_of, stored_out_major, swap_last, weight_table

if TYPE_CHECKING:  # (imports flax: a start whose weights plan is known makes the arrays without it)
    from .mixtral import Mixtral


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(index))


# What a weight's blocks go through once read (`Read.convert`): kept as stored, cast to the model's dtype,
# int4 pairs unpacked to one value per element (for XLA's matmuls) or out-major ones interleaved for the
# CPU kernels (each device's block alone, as its kernel call sees it).
CONVERTS: dict[str, Callable[[np.ndarray, np.dtype], np.ndarray]] = {
    "as stored": lambda a, dtype: a,
    "cast": lambda a, dtype: a.astype(dtype, copy=False),
    "unpack int4": lambda a, dtype: quantize.unpack_int4(a),
    "interleave int4": lambda a, dtype: cpu_matmul.interleave_int4(a),
}


@dataclasses.dataclass(frozen=True)
class Read:
    """How one array of the model is made from a checkpoint tensor (`CheckpointWeights.make`). `shape`
    and `spec` are the tensor's as a format-1 checkpoint stores it ([.., in, out], int4 values packed);
    `stored_swapped`: the file holds it with its last two dims swapped; `swapped`: so does the array
    made (each device's block transposed as it is read where the two differ); `rows`: a range of the
    first dim; `convert` (CONVERTS) gives `dtype` (None: the dtype on disk); `packed_axis`: an axis
    stored at half length (int4 pairs) that `convert` doubles. Plain data: a start keeps the list of its
    model's reads (`weights_plan`) so that the next makes the arrays without building the model."""
    name: str
    shape: tuple[int, ...]
    spec: tuple
    rows: tuple[int, int] | None = None
    convert: str = "as stored"
    dtype: str | None = None
    packed_axis: int | None = None
    stored_swapped: bool = False
    swapped: bool = False

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(data: dict) -> Read:
        def spec_item(axis):
            return tuple(axis) if isinstance(axis, list) else axis

        return Read(**{**data, "shape": tuple(data["shape"]), "spec": tuple(spec_item(a) for a in data["spec"]),
                       "rows": None if data["rows"] is None else tuple(data["rows"])})


class CheckpointWeights:
    """Hands each weight to the model as a jax.Array already split into its device shards: every device
    reads only its own slice from disk (`jax.make_array_from_callback` + `TensorFiles.read_slice`); with
    several processes each reads only its own devices' slices. On a CPU a slice kept as stored (all of
    them, on our CPU kernels) is the checkpoint file mapped in memory, used in place: loading reads
    nothing. Each array is made from a `Read` (`make`), once: `plan` lists how a model's arrays were
    made, and `make` of each read of that list makes them again without the model. Progress counts the
    checkpoint's bytes whose arrays are made (the same fraction on every process, however little of them
    it reads)."""

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
        self.made: dict[Read, jax.Array] = {}  # every array made, by how (asked again: the same array)

    def make(self, read: Read) -> jax.Array:
        """The array `read` describes, split over the mesh (made once; progress counts the bytes of the
        tensor, or of its rows, once it is placed)."""
        if read not in self.made:
            self.made[read] = self._make(read)
        return self.made[read]

    def _make(self, read: Read) -> jax.Array:
        name, spec = read.name, read.spec
        if read.swapped != read.stored_swapped and self.transpose_on_device and read.packed_axis is None:
            from .linear import swapped_on_device  # (imports flax: only accelerators transpose on the devices)

            as_stored = self._make(dataclasses.replace(read, swapped=read.stored_swapped))  # (not kept)
            wanted = swap_last(spec) if read.swapped else spec
            return swapped_on_device(as_stored, NamedSharding(self.mesh, P(*wanted)))
        on_disk = swap_last(read.shape) if read.stored_swapped else read.shape
        try:
            found = self.files.shape(name)
        except SafetensorsError as e:
            raise CheckpointError(f"{e}: the checkpoint does not match its config; convert it again") from None
        if tuple(found) != on_disk:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(found)}, its config says {on_disk}: "
                                  "the checkpoint does not match its config; convert it again")
        shape = list(read.shape)
        stored_dtype = self.files.dtype(name)
        dtype = stored_dtype if read.dtype is None else np.dtype(read.dtype)
        convert = CONVERTS[read.convert]
        read_bytes = int(np.prod(shape, dtype=np.int64)) * stored_dtype.itemsize
        if read.packed_axis is not None:
            shape[read.packed_axis] *= 2
        rows = None if read.rows is None else slice(*read.rows)
        if rows is not None:
            read_bytes = read_bytes // shape[0] * (rows.stop - rows.start)
            shape[0] = rows.stop - rows.start
        if read.swapped:
            shape, spec = list(swap_last(shape)), swap_last(spec)
        seen: dict[tuple, np.ndarray] = {}

        def block(index):
            index = _normalise(index, shape)
            key = tuple((s.start, s.stop) for s in index)
            if key not in seen:
                if read.swapped:  # to [.., in, out] coordinates
                    index = swap_last(index)
                if rows is not None:
                    index = (slice(index[0].start + rows.start, index[0].stop + rows.start),) + index[1:]
                if (axis := read.packed_axis) is not None:
                    s = index[axis]
                    index = index[:axis] + (slice(s.start // 2, s.stop // 2),) + index[axis + 1:]
                if read.stored_swapped:  # to the file's
                    index = swap_last(index)
                seen[key] = convert(self.files.read_slice(name, index, swap_last=read.swapped != read.stored_swapped,
                                                          mapped=True), dtype)
            return seen[key]

        array = jax.make_array_from_callback(tuple(shape), NamedSharding(self.mesh, P(*spec)), block, dtype=dtype)
        self.done += read_bytes
        if self.on_progress:
            self.on_progress(min(1.0, self.done / max(self.total, 1)), f"loading weights ({name})")
        return array

    def plan(self, arrays: list[jax.Array]) -> list[Read] | None:
        """How each of `arrays` was made (in their order), or None if one was not made here."""
        reads = {id(array): read for read, array in self.made.items()}
        plan = [reads.get(id(a)) for a in arrays]
        return None if None in plan else plan

    def dense(self, name: str, spec: tuple, rows: slice | None = None, out_major: bool = False) -> jax.Array:
        """`out_major`: a 2-d weight with its dims swapped (the LM head, for the CPU kernels)."""
        info = info_of(self.table, name)
        return self.make(Read(name, tuple(info.shape), tuple(spec), _rows(rows), "cast",
                              NUMPY_DTYPES[self.config.dtype].name, stored_swapped=stored_out_major(info, self.config),
                              swapped=out_major))

    def linear(self, name: str, spec: tuple, rows: slice | None = None, out_major: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        mode, info = self.config.quantization, info_of(self.table, name)
        if mode is None or not info.quantizable:
            return self.dense(name, spec, rows, out_major), ()
        stored_swapped = stored_out_major(info, self.config)
        _, values = quantize.stored_values(info.shape, mode)
        spec, rows = tuple(spec), _rows(rows)
        if out_major or mode == "int8":
            # out-major int4 is the [.., in/2, out] bytes (even input in the low nibble) swapped, as they are,
            # then interleaved: only the CPU kernels ask for int4 out-major (the GPU's lay it out on the devices)
            convert = "interleave int4" if mode == "int4" else "as stored"
            kernel = self.make(Read(name, tuple(values), spec, rows, convert, stored_swapped=stored_swapped,
                                    swapped=out_major))
        else:
            kernel = self.make(Read(name, tuple(values), spec, rows, "unpack int4",
                                    np.dtype(quantize.UNPACKED_INT4).name, packed_axis=len(spec) - 2,
                                    stored_swapped=stored_swapped))
        # int4's scales and offsets [.., in/group, out] swap with the values; int8's scales [.., out] have no `in`.
        # Cast to their dtype: int4's were float32 in checkpoints converted before they were float16 (a copy at
        # load; as stored, the cast is none)
        swaps = mode == "int4"
        param_shape = tuple(quantize.param_shape(info.shape, mode, self.config.quant_group_size))
        params = tuple(self.make(Read(f"{name}.{param}", param_shape, tuple(quantize.param_spec(spec, mode)), rows,
                                      "cast", quantize.PARAM_DTYPES[mode].name,
                                      stored_swapped=stored_swapped and swaps, swapped=out_major and swaps))
                       for param in quantize.PARAMS[mode])
        return kernel, params


def _rows(rows: slice | None) -> tuple[int, int] | None:
    return None if rows is None else (rows.start, rows.stop)


def maps_in_place(ckpt_dir: str | Path) -> bool:
    """Whether a CPU load uses the checkpoint's files mapped in memory instead of reading them: its tensors
    start on 64-byte boundaries, and its quantization parameters have the dtype the model takes (int4's
    float16). Checkpoints converted before either was so load through copies: converting again gets it."""
    try:
        files, config = TensorFiles(Path(ckpt_dir)), read_config(Path(ckpt_dir))
    except (SafetensorsError, CheckpointError):
        return False
    mode = config.quantization
    suffixes = tuple(f".{param}" for param in quantize.PARAMS.get(mode, ()))
    params = [name for name in files.names() if suffixes and name.endswith(suffixes)]
    return files.aligned() and all(files.dtype(name) == quantize.PARAM_DTYPES[mode] for name in params)


def load(ckpt_dir: str | Path, mesh: Mesh | None = None, *, dtype: str | None = None,
         on_progress: Callable[[float, str], None] | None = None, branchless: bool | None = None,
         cpu_kernels: bool | None = None) -> Mixtral:
    """Our converted checkpoint -> a Mixtral NNX module with its weights sharded over `mesh`
    (default: every device on the tensor-parallel axis). `dtype` overrides the checkpoint's;
    `branchless` the backend's choice of decode path, `cpu_kernels` of matmuls (see `Mixtral`). See
    `open_weights` for the checks and the progress reported."""
    return build(open_weights(ckpt_dir, mesh, dtype=dtype, on_progress=on_progress), branchless, cpu_kernels)


def build(weights: CheckpointWeights, branchless: bool | None = None, cpu_kernels: bool | None = None) -> Mixtral:
    """The model on these weights (arrays they made already are used again, not read again)."""
    from .mixtral import Mixtral

    with jax.set_mesh(weights.mesh):
        return Mixtral(weights.config, weights, weights.mesh, branchless, cpu_kernels)


def open_weights(ckpt_dir: str | Path, mesh: Mesh | None = None, *, dtype: str | None = None,
                 on_progress: Callable[[float, str], None] | None = None) -> CheckpointWeights:
    """Our converted checkpoint, ready to hand out its arrays split over `mesh`. The checkpoint is
    verified first (`verify`: files not hashed since they changed are hashed now). `on_progress(fraction,
    what)` reports one fraction from 0 to 1 that never goes back: the verifying takes its first half when
    files are hashed, making the arrays the rest."""
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
    return CheckpointWeights(files, config, mesh, loading if on_progress else None)
