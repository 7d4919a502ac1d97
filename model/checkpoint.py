"""Our checkpoint on disk, and loading it straight into device shards.

A checkpoint is a folder:
    config.json      MixtralConfig (ours, "format": "mixtral-chat")
    manifest.json    where it came from, dtype, quantization, and the size + sha256 of every file
    model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer files  tokenizer.model or tokenizer.json, tokenizer_config.json, generation_config.json

The tensors, their names, shapes and layout: weight_table.py. Quantized weights keep their name (int8,
or uint8 with two int4 per byte) and add their parameters (`<name>.scale`, ...; see quantize.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import quantize
from .config import ConfigError, MixtralConfig
from .errors import UserError
from .mixtral import Mixtral
from .safetensors_io import NUMPY_DTYPES, SafetensorsError, TensorFiles
from .sharding import make_mesh
from .weight_table import info_of, weight_table

CONFIG, MANIFEST = "config.json", "manifest.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


class CheckpointError(UserError):
    """A checkpoint that is missing, partial or corrupt; the message says which file and what to do."""


def read_config(ckpt_dir: Path) -> MixtralConfig:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a mixtral-chat checkpoint (no {CONFIG}); "
                              "convert a Hugging Face folder with `mixtral-chat convert HF_DIR OUT_DIR`")
    try:
        return MixtralConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_manifest(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is incomplete (no {MANIFEST}): the conversion did not finish; "
                              "convert it again") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); convert the model again") from None


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(ckpt_dir: Path, deep: bool = False) -> MixtralConfig:
    """Check that every file the manifest lists is there with its size (and, if `deep`, its sha256)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}")
    config = read_config(ckpt_dir)
    files = read_manifest(ckpt_dir).get("files", {})
    problems = []
    for name, info in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != info["bytes"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, expected {info['bytes']} (partial?)")
        elif deep and sha256_file(path) != info["sha256"]:
            problems.append(f"{name} is corrupt (sha256 mismatch)")
    if not any(n.endswith(".safetensors") for n in files):
        problems.append("the manifest lists no weights")
    if problems:
        raise CheckpointError(f"checkpoint {ckpt_dir} is damaged: " + "; ".join(problems))
    return config


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(index))


class CheckpointWeights:
    """Hands each weight to the model as a jax.Array already split into its device shards: every device
    reads only its own slice from disk (`jax.make_array_from_callback` + `TensorFiles.read_slice`)."""

    def __init__(self, files: TensorFiles, config: MixtralConfig, mesh: Mesh,
                 on_progress: Callable[[float, str], None] | None = None):
        self.files, self.config, self.mesh = files, config, mesh
        self.table = weight_table(config)
        self.on_progress = on_progress
        self.total = sum(f.stat().st_size for f in files.files())
        self.done = 0

    def _array(self, name: str, expected: tuple[int, ...], spec: tuple, rows: slice | None,
               convert: Callable[[np.ndarray], np.ndarray], packed_axis: int | None = None) -> jax.Array:
        """`expected`: the tensor's shape on disk (from the weight table); `rows` selects a range of the
        first dim; `packed_axis` is an axis stored at half length on disk (int4 pairs) that `convert` doubles."""
        try:
            shape = list(self.files.shape(name))
        except SafetensorsError as e:
            raise CheckpointError(f"{e}: the checkpoint does not match its config; convert it again") from None
        if tuple(shape) != tuple(expected):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(shape)}, its config says {tuple(expected)}: "
                                  "the checkpoint does not match its config; convert it again")
        if packed_axis is not None:
            shape[packed_axis] *= 2
        if rows is not None:
            shape[0] = rows.stop - rows.start
        seen: dict[tuple, np.ndarray] = {}

        def read(index):
            index = _normalise(index, shape)
            key = tuple((s.start, s.stop) for s in index)
            if key not in seen:
                if rows is not None:
                    index = (slice(index[0].start + rows.start, index[0].stop + rows.start),) + index[1:]
                if packed_axis is not None:
                    s = index[packed_axis]
                    index = index[:packed_axis] + (slice(s.start // 2, s.stop // 2),) + index[packed_axis + 1:]
                part = self.files.read_slice(name, index)
                self.done += part.nbytes
                seen[key] = convert(part)
            return seen[key]

        array = jax.make_array_from_callback(tuple(shape), NamedSharding(self.mesh, P(*spec)), read)
        if self.on_progress:
            self.on_progress(min(1.0, self.done / max(self.total, 1)), name)
        return array

    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array:
        dtype = NUMPY_DTYPES[self.config.dtype]
        return self._array(name, info_of(self.table, name).shape, spec, rows, lambda a: a.astype(dtype, copy=False))

    def linear(self, name: str, spec: tuple, rows: slice | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        mode, info = self.config.quantization, info_of(self.table, name)
        if mode is None or not info.quantizable:
            return self.dense(name, spec, rows), ()
        _, stored = quantize.stored_values(info.shape, mode)
        if mode == "int8":
            kernel = self._array(name, stored, spec, rows, lambda a: a)
        else:
            kernel = self._array(name, stored, spec, rows, quantize.unpack_int4, packed_axis=len(spec) - 2)
        param_shape = quantize.param_shape(info.shape, mode, self.config.quant_group_size)
        params = tuple(self._array(f"{name}.{param}", param_shape, quantize.param_spec(spec, mode), rows, lambda a: a)
                       for param in quantize.PARAMS[mode])
        return kernel, params


def load(ckpt_dir: str | Path, mesh: Mesh | None = None, *, dtype: str | None = None,
         on_progress: Callable[[float, str], None] | None = None, branchless: bool | None = None,
         cpu_kernels: bool | None = None) -> Mixtral:
    """Our converted checkpoint -> a Mixtral NNX module with its weights sharded over `mesh`
    (default: every device on the tensor-parallel axis). `dtype` overrides the checkpoint's;
    `branchless` the backend's choice of decode path, `cpu_kernels` of matmuls (see `Mixtral`)."""
    ckpt_dir = Path(ckpt_dir)
    config = verify(ckpt_dir)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    mesh = mesh if mesh is not None else make_mesh()
    try:
        files = TensorFiles(ckpt_dir)
    except SafetensorsError as e:
        raise CheckpointError(f"{e}; convert the model again") from None
    with jax.set_mesh(mesh):
        return Mixtral(config, CheckpointWeights(files, config, mesh, on_progress), mesh, branchless, cpu_kernels)
