"""Reading safetensors slice by slice (model/safetensors_io.py): every block a device may ask for is the
tensor's, read in place when its bytes follow each other and through a memory map otherwise; a `mapped`
block on a 64-byte boundary is the file mapped in memory."""

from __future__ import annotations

import itertools

import ml_dtypes
import numpy as np
import pytest

from model.safetensors_io import SafetensorsError, StreamingWriter, TensorFiles, TensorSpec
from tiny_model import mapped_file


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """(a folder with one safetensors file, its tensors as numpy arrays)."""
    folder = tmp_path_factory.mktemp("tensors")
    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((4, 6, 10)).astype(np.float32),
               "b": rng.standard_normal((3, 8)).astype(ml_dtypes.bfloat16),
               "q": rng.integers(0, 255, (5, 7), dtype=np.uint8)}
    writer = StreamingWriter(folder / "model.safetensors", [TensorSpec(n, t.dtype, t.shape) for n, t in tensors.items()])
    for t in tensors.values():
        writer.append(t)
    writer.close()
    return folder, tensors


def blocks(shape: tuple[int, ...]):
    """Every block that splits each dim into halves or keeps it whole, and a few single elements."""
    choices = [[slice(0, n), slice(0, n // 2), slice(n // 2, n), slice(1, 2)] for n in shape]
    return itertools.product(*choices)


@pytest.mark.parametrize("name", ["w", "b", "q"])
def test_every_block_is_the_tensors(stored, name):
    folder, tensors = stored
    files, tensor = TensorFiles(folder), tensors[name]
    for index in blocks(tensor.shape):
        block = files.read_slice(name, index)
        assert block.dtype == tensor.dtype and np.array_equal(block, tensor[index]), index
        assert block.ctypes.data % 64 == 0  # XLA's CPU client uses it in place
        swapped = files.read_slice(name, index, swap_last=True)
        assert np.array_equal(swapped, tensor[index].swapaxes(-1, -2)), index


def whole(tensor: np.ndarray) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in tensor.shape)


def test_mapped_blocks_on_64_byte_boundaries_are_the_file_in_memory(stored):
    """w's data starts on a 64-byte boundary (the header is padded so), and so does b's (w's 960 bytes
    are a multiple of 64); q follows b's 48 bytes, so a mapped read of it is a copy, as is a block of w
    that starts off a boundary."""
    folder, tensors = stored
    files = TensorFiles(folder)
    path = str(folder / "model.safetensors")
    for name, tensor in tensors.items():
        block = files.read_slice(name, whole(tensor), mapped=True)
        assert block.dtype == tensor.dtype and np.array_equal(block, tensor)
        assert block.ctypes.data % 64 == 0
        assert (mapped_file(block.ctypes.data) == path) == (name in ("w", "b")), name
        assert not block.flags.writeable or name == "q"
    rows = files.read_slice("w", (slice(1, 2),), mapped=True)  # starts 240 bytes into w
    assert np.array_equal(rows, tensors["w"][1:2]) and mapped_file(rows.ctypes.data) != path


@pytest.mark.parametrize("mapped", [False, True])
def test_a_truncated_file_is_reported(stored, tmp_path, mapped):
    folder, tensors = stored
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    files = TensorFiles(tmp_path)
    last = list(tensors)[-1]
    with pytest.raises(SafetensorsError, match="truncated"):
        files.read_slice(last, whole(tensors[last]), mapped=mapped)
    (tmp_path / "model.safetensors").write_bytes(data[:-1000])  # into w, the first tensor
    with pytest.raises(SafetensorsError, match="truncated"):
        TensorFiles(tmp_path).read_slice("w", whole(tensors["w"]), mapped=mapped)
