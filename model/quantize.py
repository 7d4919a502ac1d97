"""Weight-only quantization of linear weights `w[..., in, out]` (y = x @ w).

- int8: one scale per output channel, `w ~= q * scale[..., None, :]`, q in [-127, 127].
- int4: one scale per group of `group` consecutive input rows, q in [-8, 7] (symmetric, like llama.cpp's
  Q4_0). On disk two values share a byte (`uint8 [..., in/2, out]`, even row in the low nibble); in
  device memory the array is `jnp.int4`, which XLA packs two per byte itself.

Embeddings, the router, norms and the LM head stay in the model dtype.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np

QUANTIZED_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2")


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [..., in, out] float -> (q int8 [..., in, out], scale float32 [..., out])."""
    w = w.astype(np.float32)
    scale = np.abs(w).max(axis=-2) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8)
    return q, scale


def quantize_int4(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """w [..., in, out] float -> (packed uint8 [..., in/2, out], scale float32 [..., in/group, out])."""
    *lead, n_in, n_out = w.shape
    if n_in % group:
        raise ValueError(f"int4: the input dim {n_in} is not a multiple of the group size {group}")
    grouped = w.astype(np.float32).reshape(*lead, n_in // group, group, n_out)
    scale = np.abs(grouped).max(axis=-2) / 7.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(grouped / scale[..., None, :]), -8, 7).astype(np.int8).reshape(*lead, n_in, n_out)
    return pack_int4(q), scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7], [..., in, out] -> uint8 [..., in/2, out] (even rows in the low nibble)."""
    u = q.astype(np.uint8) & 0x0F
    return u[..., 0::2, :] | (u[..., 1::2, :] << 4)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., in/2, out] -> ml_dtypes.int4 [..., in, out]."""
    low = (packed & 0x0F).astype(np.int8)
    high = (packed >> 4).astype(np.int8)
    low = np.where(low > 7, low - 16, low)
    high = np.where(high > 7, high - 16, high)
    *lead, half, n_out = packed.shape
    out = np.empty((*lead, 2 * half, n_out), np.int8)
    out[..., 0::2, :] = low
    out[..., 1::2, :] = high
    return out.astype(ml_dtypes.int4)


def dequantize_numpy(q: np.ndarray, scale: np.ndarray, quantization: str, group: int) -> np.ndarray:
    """The float32 weight a quantized one stands for (export, accuracy reports)."""
    if quantization == "int8":
        return q.astype(np.float32) * scale[..., None, :]
    values = unpack_int4(q).astype(np.float32)
    *lead, n_in, n_out = values.shape
    grouped = values.reshape(*lead, n_in // group, group, n_out) * scale[..., None, :]
    return grouped.reshape(*lead, n_in, n_out)


def matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array | None, quantization: str | None,
           group: int) -> jax.Array:
    """x [..., in] @ kernel [in, out], with the kernel dense or quantized as above."""
    if quantization is None:
        return x @ kernel
    if quantization == "int8":
        return (x @ kernel.astype(x.dtype)) * scale.astype(x.dtype)
    n_in, n_out = kernel.shape
    w = kernel.astype(x.dtype).reshape(n_in // group, group, n_out) * scale.astype(x.dtype)[:, None, :]
    return x @ w.reshape(n_in, n_out)


def scale_spec(kernel_spec: tuple, quantization: str) -> tuple:
    """Partition spec of a kernel's scales, from the kernel's."""
    if quantization == "int8":
        return kernel_spec[:-2] + kernel_spec[-1:]  # no input dim
    return kernel_spec  # int4: [..., in/group, out] splits like the kernel
