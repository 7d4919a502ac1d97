"""Our checkpoint on disk, and loading it straight into device shards.

A checkpoint is a folder:
    config.json      MixtralConfig (ours, "format": "mixtral-chat")
    manifest.json    where it came from, dtype, quantization, and the size + sha256 of every file
    model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer files  tokenizer.model or tokenizer.json, tokenizer_config.json, generation_config.json

Tensor names: embed [V, D]; layers.{l}.{attn_norm, ffn_norm} [D]; layers.{l}.{wq [D, H*Dh], wk, wv
[D, KV*Dh], wo [H*Dh, D]}; layers.{l}.router [D, E]; layers.{l}.{w1, w3} [E, D, I], layers.{l}.w2
[E, I, D]; final_norm [D]; lm_head [D, V] (absent when tied to embed). Quantized weights keep their
name (int8, or uint8 with two int4 per byte) and add their parameters (`<name>.scale`, ...; see
quantize.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
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
    """manifest.json, checked for shape: a JSON object whose "files" maps plain file names to
    {"bytes": int, "sha256": 64 hex digits}."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is incomplete (no {MANIFEST}): the conversion did not finish; "
                              "convert it again") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); convert the model again") from None
    if problem := _manifest_problem(manifest):
        raise CheckpointError(f"{path} is damaged ({problem}); convert the model again")
    return manifest


def _manifest_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__} instead of an object"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return '"files" is not a table of file names'
    for name, entry in files.items():
        if Path(name).name != name or name in (".", ".."):
            return f"{name!r} is not a file name of the checkpoint folder"
        if not isinstance(entry, dict):
            return f"the entry of {name} is not an object"
        if not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool) or entry["bytes"] < 0:
            return f"the entry of {name} has no valid \"bytes\""
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"the entry of {name} has no valid \"sha256\""
    if not any(n.endswith(".safetensors") for n in files):
        return "it lists no weights"
    return None


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 16 << 20) -> str:
    """The file's sha256; `on_bytes(n)` after each chunk of n bytes read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes:
                on_bytes(len(block))
    return h.hexdigest()


def verify(ckpt_dir: Path, deep: bool = False,
           on_progress: Callable[[float, str], None] | None = None) -> MixtralConfig:
    """Check that every file the manifest lists is there with its size and its sha256.

    Hashing a checkpoint reads all of it (Mixtral-8x7B: ~90 GB, about a minute), so it is done once:
    `VERIFIED` records each file's size and mtime when its sha256 matched, and a file is hashed again
    only when its size or mtime changed since (`deep`: hash every file now). `on_progress(fraction,
    what)` reports the hashing. The config of a checkpoint that passes is returned; CheckpointError
    names the first damaged file otherwise."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}")
    config = read_config(ckpt_dir)
    files = read_manifest(ckpt_dir)["files"]
    stats = {}
    for name, info in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise _damaged(ckpt_dir, f"{name} is missing")
        stats[name] = path.stat()
        if stats[name].st_size != info["bytes"]:
            raise _damaged(ckpt_dir, f"{name} has {stats[name].st_size} bytes, expected {info['bytes']} (partial?)")
    record = {} if deep else _read_record(ckpt_dir)
    stale = [name for name, info in files.items() if record.get(name) != _fingerprint(stats[name], info)]
    total, done = sum(files[name]["bytes"] for name in stale), 0
    for name in stale:
        def hashed(n: int, name=name) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(done / max(total, 1), f"verifying {name}")

        if sha256_file(ckpt_dir / name, hashed) != files[name]["sha256"]:
            raise _damaged(ckpt_dir, f"{name} does not match its sha256 in {MANIFEST} (its bytes changed)")
        record[name] = _fingerprint(stats[name], files[name])
    if stale:
        _write_record(ckpt_dir, {name: record[name] for name in files})
    return config


VERIFIED = ".verified.json"
"""In a checkpoint dir: {file name: [size, mtime_ns, sha256]} of each file whose sha256 was checked."""


def _fingerprint(stat, info: dict) -> list:
    return [stat.st_size, stat.st_mtime_ns, info["sha256"]]


def _read_record(ckpt_dir: Path) -> dict:
    try:
        record = json.loads((ckpt_dir / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(ckpt_dir: Path, record: dict) -> None:
    """Best effort: a checkpoint on a read-only disk is verified again on its next use."""
    temporary = ckpt_dir / f"{VERIFIED}.tmp"
    try:
        temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
        temporary.replace(ckpt_dir / VERIFIED)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _damaged(ckpt_dir: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt_dir} is damaged: {problem}; install it again "
                           "(`mixtral-chat setup`) or convert it again (`mixtral-chat convert`)")


def vocabulary_problem(config: MixtralConfig, tokenizer_vocab_size: int, where: Path) -> str | None:
    """Why the tokenizer in `where` cannot go with the model: it makes ids past the embedding's rows."""
    if tokenizer_vocab_size > config.vocab_size:
        return (f"the tokenizer in {where} has {tokenizer_vocab_size} tokens but the model only "
                f"{config.vocab_size}: they do not belong together (use the model's own tokenizer)")
    return None


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(index))


class CheckpointWeights:
    """Hands each weight to the model as a jax.Array already split into its device shards: every device
    reads only its own slice from disk (`jax.make_array_from_callback` + `TensorFiles.read_slice`)."""

    def __init__(self, files: TensorFiles, config: MixtralConfig, mesh: Mesh,
                 on_progress: Callable[[float, str], None] | None = None):
        self.files, self.config, self.mesh = files, config, mesh
        self.on_progress = on_progress
        self.total = sum(f.stat().st_size for f in files.files())
        self.done = 0

    def _array(self, name: str, spec: tuple, rows: slice | None, convert: Callable[[np.ndarray], np.ndarray],
               packed_axis: int | None = None) -> jax.Array:
        """`rows` selects a range of the first dim; `packed_axis` is an axis stored at half length on disk
        (int4 pairs) that `convert` doubles."""
        try:
            shape = list(self.files.shape(name))
        except SafetensorsError as e:
            raise CheckpointError(f"{e}: the checkpoint does not match its config; convert it again") from None
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
            self.on_progress(min(1.0, self.done / max(self.total, 1)), f"loading weights ({name})")
        return array

    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array:
        dtype = NUMPY_DTYPES[self.config.dtype]
        return self._array(name, spec, rows, lambda a: a.astype(dtype, copy=False))

    def linear(self, name: str, spec: tuple, rows: slice | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        mode = self.config.quantization
        if mode is None or name.rsplit(".", 1)[-1] not in quantize.QUANTIZED_WEIGHTS:
            return self.dense(name, spec, rows), ()
        if mode == "int8":
            kernel = self._array(name, spec, rows, lambda a: a)
        else:
            kernel = self._array(name, spec, rows, quantize.unpack_int4, packed_axis=len(spec) - 2)
        params = tuple(self._array(f"{name}.{param}", quantize.param_spec(spec, mode), rows, lambda a: a)
                       for param in quantize.PARAMS[mode])
        return kernel, params


def load(ckpt_dir: str | Path, mesh: Mesh | None = None, *, dtype: str | None = None,
         on_progress: Callable[[float, str], None] | None = None, branchless: bool | None = None) -> Mixtral:
    """Our converted checkpoint -> a Mixtral NNX module with its weights sharded over `mesh`
    (default: every device on the tensor-parallel axis). `dtype` overrides the checkpoint's;
    `branchless` the backend's choice of decode path (see `Mixtral`). The checkpoint is verified
    first (`verify`: files not hashed since they changed are hashed now). `on_progress(fraction,
    what)` reports the verifying, then the loading, each from 0 to 1."""
    ckpt_dir = Path(ckpt_dir)
    config = verify(ckpt_dir, on_progress=on_progress)
    if dtype is not None:
        config = dataclasses.replace(config, dtype=dtype)
    mesh = mesh if mesh is not None else make_mesh()
    try:
        files = TensorFiles(ckpt_dir)
    except SafetensorsError as e:
        raise CheckpointError(f"{e}; convert the model again") from None
    with jax.set_mesh(mesh):
        return Mixtral(config, CheckpointWeights(files, config, mesh, on_progress), mesh, branchless)
