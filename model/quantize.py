"""Weight-only quantization of linear weights `w[..., in, out]` (y = x @ w).

- int8: one scale per output channel, `w ~= q * scale[..., None, :]`, q in [-127, 127].
- int4: per group of `group` consecutive input rows, a float16 scale and offset (the group's minimum),
  `w ~= q * scale + offset`, q in [0, 15] (asymmetric, like llama.cpp's Q4_1: a group whose values are
  all positive still gets 16 levels; float16 parameters as Q4_1's, 4 bytes a group of 32 where float32's
  took 8: a sixth of int4's bytes). On disk two values share a byte (`uint8 [..., in/2, out]`, even
  row in the low nibble); in device memory the array is `jnp.uint4`, which XLA packs two per byte.
  Checkpoints converted before kept float32 parameters: they load cast to float16 (checkpoint.py).

A quantized weight keeps its name for the values and adds one tensor per parameter
(`<name>.scale`, `<name>.offset`), in `PARAMS[mode]` order. Which weights are quantized: the
`quantizable` ones of weight_table.py (the linear layers and an untied LM head; embeddings, the router
and norms stay in the model dtype).
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

PARAMS = {"int8": ("scale",), "int4": ("scale", "offset")}  # the tensors beside a quantized weight
PARAM_DTYPES = {"int8": np.dtype(np.float32), "int4": np.dtype(np.float16)}  # and their dtype
UNPACKED_INT4 = np.dtype(ml_dtypes.uint4)  # what `unpack_int4` gives


def stored_values(shape: tuple[int, ...], mode: str) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) on disk of the values of a quantized weight [..., in, out]."""
    if mode == "int8":
        return np.dtype(np.int8), tuple(shape)
    *lead, n_in, n_out = shape
    return np.dtype(np.uint8), (*lead, n_in // 2, n_out)  # two int4 per byte


def param_shape(shape: tuple[int, ...], mode: str, group: int) -> tuple[int, ...]:
    """Shape of each quantization parameter (PARAM_DTYPES) of a weight [..., in, out]."""
    *lead, n_in, n_out = shape
    return (*lead, n_out) if mode == "int8" else (*lead, n_in // group, n_out)


def quantize(w: np.ndarray, mode: str, group: int) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """w [..., in, out] float -> (values as stored on disk, parameters in PARAMS[mode] order and PARAM_DTYPES)."""
    w = w.astype(np.float32)
    if mode == "int8":
        scale = np.abs(w).max(axis=-2) / 127.0
        scale = np.where(scale == 0, 1.0, scale).astype(PARAM_DTYPES["int8"])
        return np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8), (scale,)
    *lead, n_in, n_out = w.shape
    if n_in % group:
        raise ValueError(f"int4: the input dim {n_in} is not a multiple of the group size {group}")
    grouped = w.reshape(*lead, n_in // group, group, n_out)
    low, high = grouped.min(axis=-2), grouped.max(axis=-2)
    # the parameters as stored (PARAM_DTYPES: float16), then each value's level against them
    dtype = PARAM_DTYPES["int4"]
    scale = np.where(high > low, (high - low) / 15.0, 1.0).astype(dtype)
    scale = np.where(scale == 0, 1.0, scale).astype(dtype)  # a range too small for a float16 step
    offset = low.astype(dtype)
    steps = (grouped - offset[..., None, :].astype(np.float32)) / scale[..., None, :].astype(np.float32)
    q = np.clip(np.rint(steps), 0, 15).astype(np.uint8)
    return pack_int4(q.reshape(*lead, n_in, n_out)), (scale, offset)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 15], [..., in, out] -> uint8 [..., in/2, out] (even rows in the low nibble)."""
    return q[..., 0::2, :] | (q[..., 1::2, :] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., in/2, out] -> ml_dtypes.uint4 [..., in, out]."""
    *lead, half, n_out = packed.shape
    out = np.empty((*lead, 2 * half, n_out), np.uint8)
    out[..., 0::2, :] = packed & 0x0F
    out[..., 1::2, :] = packed >> 4
    return out.astype(UNPACKED_INT4)


def dequantize_numpy(q: np.ndarray, params: tuple[np.ndarray, ...], mode: str, group: int) -> np.ndarray:
    """The float32 weight a quantized one stands for (export, accuracy reports)."""
    if mode == "int8":
        (scale,) = params
        return q.astype(np.float32) * scale[..., None, :]
    scale, offset = (p.astype(np.float32) for p in params)
    values = unpack_int4(q).astype(np.float32)
    *lead, n_in, n_out = values.shape
    grouped = values.reshape(*lead, n_in // group, group, n_out) * scale[..., None, :] + offset[..., None, :]
    return grouped.reshape(*lead, n_in, n_out)


def matmul(x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], mode: str | None,
           group: int) -> jax.Array:
    """x [..., in] @ kernel [in, out], with the kernel dense (mode None, no params) or quantized."""
    if mode is None:
        return x @ kernel
    if mode == "int8":
        (scale,) = params
        return (x @ kernel.astype(x.dtype)) * scale.astype(x.dtype)
    scale, offset = (p.astype(x.dtype)[:, None, :] for p in params)
    n_in, n_out = kernel.shape
    w = kernel.astype(x.dtype).reshape(n_in // group, group, n_out) * scale + offset
    return x @ w.reshape(n_in, n_out)


def param_spec(kernel_spec: tuple, mode: str) -> tuple:
    """Partition spec of a kernel's quantization parameters, from the kernel's."""
    if mode == "int8":
        return kernel_spec[:-2] + kernel_spec[-1:]  # no input dim
    return kernel_spec  # int4: [..., in/group, out] splits like the kernel
