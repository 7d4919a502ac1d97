"""safetensors files, written tensor by tensor and read slice by slice.

Writing: every shape and dtype is known before any data is read (from the source headers), so the header
goes first and each tensor's bytes are appended as they are produced; memory stays bounded by the
largest chunk, and the sha256 of each file is computed on the way out (no second read).

Reading: `TensorFiles` opens a folder of safetensors (one file, or shards + `*.safetensors.index.json`)
and hands out lazy slices, so each device's shard is read straight from disk.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_CODES = {
    np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int32): "I32", np.dtype(np.int64): "I64",
}
NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}


ALIGNMENT = 64  # bytes: XLA's CPU client uses host memory that starts on such a boundary in place


class SafetensorsError(ValueError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class StreamingWriter:
    """One safetensors file: the header for `specs` first, then each tensor's bytes in order."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for s in specs:
            header[s.name] = {"dtype": _CODES[s.dtype], "shape": list(s.shape),
                              "data_offsets": [offset, offset + s.nbytes]}
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        # the data starts on a 64-byte boundary (after the 8-byte length), and so does every tensor whose
        # predecessors' sizes are multiples of 64 (all of a model's): XLA's CPU client can use such a
        # tensor in place, in the file mapped in memory (`TensorFiles.read_slice(..., mapped=True)`)
        raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self._specs = iter(specs)
        self._current: TensorSpec | None = None
        self._left = 0  # bytes still owed to the current tensor
        self._put(struct.pack("<Q", len(raw)) + raw)
        self._next_tensor()

    def _put(self, data) -> None:
        self._sha.update(data)
        self._file.write(data)

    def _next_tensor(self) -> None:
        while self._left == 0:
            self._current = next(self._specs, None)
            if self._current is None:
                return
            self._left = self._current.nbytes

    def append(self, chunk: np.ndarray) -> None:
        """The next bytes of the current tensor (C order, its dtype)."""
        if self._current is None:
            raise SafetensorsError("more data than the header announced")
        if chunk.dtype != self._current.dtype:
            raise SafetensorsError(f"{self._current.name}: got {chunk.dtype}, expected {self._current.dtype}")
        data = np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)  # bytes (bfloat16 has no buffer format)
        if len(data) > self._left:
            raise SafetensorsError(f"{self._current.name}: more bytes than its shape {self._current.shape}")
        self._put(data)
        self._left -= len(data)
        self._next_tensor()

    def close(self) -> str:
        """Finish the file; returns its sha256."""
        self._file.close()
        if self._current is not None:
            raise SafetensorsError(f"{self._current.name}: {self._left} bytes missing")
        return self._sha.hexdigest()

    def abort(self) -> None:
        self._file.close()


# A tensor to write: its spec and a function producing its data in C-order chunks.
Producer = Callable[[], Iterable[np.ndarray]]


def write_sharded(out_dir: Path, tensors: list[tuple[TensorSpec, Producer]], *, prefix: str = "model",
                  max_file_bytes: int = 4 << 30, metadata: dict[str, str] | None = None,
                  on_tensor: Callable[[int, int, str], None] | None = None) -> dict[str, str]:
    """Write `tensors` into one file or several of at most `max_file_bytes` (plus an index json).

    Returns {file name: sha256}. `on_tensor(done, total, name)` is called after each tensor.
    """
    groups: list[list[tuple[TensorSpec, Producer]]] = [[]]
    size = 0
    for spec, producer in tensors:
        if groups[-1] and size + spec.nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append((spec, producer))
        size += spec.nbytes
    names = ([f"{prefix}.safetensors"] if len(groups) == 1 else
             [f"{prefix}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    hashes, weight_map, done = {}, {}, 0
    for name, group in zip(names, groups):
        writer = StreamingWriter(out_dir / name, [s for s, _ in group], metadata)
        try:
            for spec, producer in group:
                for chunk in producer():
                    writer.append(chunk)
                weight_map[spec.name] = name
                done += 1
                if on_tensor:
                    on_tensor(done, len(tensors), spec.name)
        except BaseException:
            writer.abort()
            raise
        hashes[name] = writer.close()
    if len(names) > 1:
        total = sum(s.nbytes for s, _ in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return hashes


_DTYPES = {code: dtype for dtype, code in _CODES.items()}


@dataclass(frozen=True)
class _Entry:
    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file


def _read_header(path: Path) -> dict[str, _Entry]:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:
                raise ValueError("header too large")
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as e:
        raise SafetensorsError(f"cannot read {path}: not a valid safetensors file ({e})") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        entries[name] = _Entry(path, _DTYPES[info["dtype"]], tuple(info["shape"]), 8 + length + info["data_offsets"][0])
    return entries


def _contiguous_span(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]] | None:
    """(the first element, the shape) of the block that `index` (one slice per dim, with start and
    stop) selects from a row-major array of `shape`, when its elements are contiguous there: one element
    along each dim before the last one cut. None otherwise."""
    ranges = [(s.start, s.stop) for s in index] + [(0, n) for n in shape[len(index):]]
    cut = max((d for d, (start, stop) in enumerate(ranges) if (start, stop) != (0, shape[d])), default=0)
    if any(stop - start != 1 for start, stop in ranges[:cut]):
        return None
    first, stride = 0, 1
    for (start, _), n in zip(reversed(ranges), reversed(shape)):
        first += start * stride
        stride *= n
    return first, tuple(stop - start for start, stop in ranges)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary: XLA's CPU client uses
    such memory in place (`jax.device_put` without a copy, ~10x faster for a model's weights)."""
    return _aligned(np.empty, shape, dtype, alignment)


def aligned_zeros(shape: tuple[int, ...], dtype: np.dtype, alignment: int = ALIGNMENT) -> np.ndarray:
    """`aligned_empty`, filled with zeros: a large one is pages the OS maps when they are first written,
    so making it, and handing it to XLA, touches none of its memory."""
    return _aligned(np.zeros, shape, dtype, alignment)


def _aligned(allocate, shape: tuple[int, ...], dtype: np.dtype, alignment: int) -> np.ndarray:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = allocate(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class TensorFiles:
    """The tensors of a folder of safetensors (one file, or shards + `*.safetensors.index.json`).

    Reads copy just what was asked for and keep nothing mapped, so resident memory is what the caller
    holds, not every page it has looked at (a streaming conversion, a sharded load); unless the caller
    asks for a `mapped` block (a model's weights, kept for as long as the model runs).
    """

    def __init__(self, folder: Path):
        folder = Path(folder)
        indexes = sorted(folder.glob("*.safetensors.index.json"))
        if indexes:
            try:
                files = sorted({folder / f for f in json.loads(indexes[0].read_text())["weight_map"].values()})
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise SafetensorsError(f"cannot read {indexes[0]}: {e}") from None
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise SafetensorsError(f"{folder} is missing {', '.join(missing)} (listed in {indexes[0].name})")
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                raise SafetensorsError(f"no .safetensors files in {folder}")
        self._entries: dict[str, _Entry] = {}
        self._maps: dict[Path, np.ndarray] = {}  # files mapped for `mapped` reads
        for f in files:
            self._entries.update(_read_header(f))

    def names(self) -> list[str]:
        return list(self._entries)

    def aligned(self) -> bool:
        """Whether every tensor starts on an ALIGNMENT boundary (so a `mapped` read of a whole one is the
        file in memory; files written before the writer padded its header are not)."""
        return all(e.offset % ALIGNMENT == 0 for e in self._entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise SafetensorsError(f"tensor {name!r} not found")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self._entry(name).shape[0] if self._entry(name).shape else 1)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 of the tensor's first dim (a contiguous byte range)."""
        e = self._entry(name)
        shape = (stop - start, *e.shape[1:]) if e.shape else ()
        row_bytes = int(np.prod(e.shape[1:], dtype=np.int64)) * e.dtype.itemsize
        count = int(np.prod(shape, dtype=np.int64))
        with open(e.path, "rb") as f:
            f.seek(e.offset + start * row_bytes)
            data = np.fromfile(f, dtype=e.dtype, count=count)
        if data.size != count:
            raise SafetensorsError(f"{e.path} is truncated: tensor {name} is incomplete")
        return data.reshape(shape)

    def read_slice(self, name: str, index: tuple[slice, ...], swap_last: bool = False,
                   mapped: bool = False) -> np.ndarray:
        """One block of the tensor (a device's shard). A block whose bytes follow each other in the file
        (a whole tensor, a range of rows) is read into place with one `readinto`; any other through a
        memory map opened and closed for this read, so only the block's pages are touched and none stay
        mapped. `swap_last`: the block with its last two dims swapped (copied once, in that order).
        `mapped`: a block whose bytes follow each other and start on an ALIGNMENT boundary comes as a
        read-only view of the file mapped in memory, which XLA's CPU client uses in place: nothing is
        read or copied until a program touches it, and its pages stay the OS's page cache (shared with
        any process that maps the file; dropped, not swapped, under memory pressure). The file stays
        mapped for as long as a view of it lives."""
        e = self._entry(name)
        span = None if swap_last else _contiguous_span(index, e.shape)
        if span is not None:
            first, shape = span
            start = e.offset + first * e.dtype.itemsize
            if mapped and start % ALIGNMENT == 0:
                nbytes = int(np.prod(shape, dtype=np.int64)) * e.dtype.itemsize
                whole = self._mapped(e.path)
                if len(whole) < start + nbytes:
                    raise SafetensorsError(f"{e.path} is truncated: tensor {name} is incomplete")
                return whole[start:start + nbytes].view(e.dtype).reshape(shape)
            block = aligned_empty(shape, e.dtype)
            with open(e.path, "rb", buffering=0) as f:
                f.seek(start)
                if f.readinto(memoryview(block.reshape(-1).view(np.uint8))) != block.nbytes:
                    raise SafetensorsError(f"{e.path} is truncated: tensor {name} is incomplete")
            return block
        mapped = np.memmap(e.path, dtype=e.dtype, mode="r", offset=e.offset, shape=e.shape)
        view = mapped[index].swapaxes(-1, -2) if swap_last else mapped[index]
        block = aligned_empty(view.shape, view.dtype)
        np.copyto(block, view)
        del mapped  # unmapped here: nothing else refers to it
        return block

    def _mapped(self, path: Path) -> np.ndarray:
        """The whole file as read-only bytes mapped in memory (once per file)."""
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._maps[path]

    def files(self) -> Iterator[Path]:
        return iter(sorted({e.path for e in self._entries.values()}))
