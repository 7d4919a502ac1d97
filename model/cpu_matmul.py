"""Matmuls on the CPU through our native kernels (model/cpu_kernels), called by XLA inside the jitted
programs through its FFI: weights in float32, bfloat16, int8 or int4 stream at memory speed, where
XLA:CPU runs only float32 near it (bfloat16 ~1 GB/s, int8 ~0.3, int4 ~0.1 on one GEMV).

The kernels want each weight as [out, in] rows (`layout` does it once, at load):
    float32 / bfloat16  [..., out, in]
    int8                int8 [..., out, in], scale float32 [..., out]
    int4                uint8 [..., out, in/2] (input 2j in the low nibble of byte j, 2j + 1 in the high
                        one), each row's bytes interleaved (`interleave_int4`); scale, offset float16
                        [..., out, in/group]
(but for int4's interleave, the layouts of the GPU kernels for quantized weights, model/expert_gemv.py).
`matmul(x, kernel, params, group)` multiplies float activations by such a weight, inside jit and
inside shard_map (each device calls the kernel on its own shard). int8 / int4 weights take x rounded for
integer dot products: times many rows (prefill) to int16 per INT4_UNIT inputs (within 1.5e-5 of the
largest value there: 1.5x float32's multiply-adds a second on AVX512-VNNI); times a few rows (decode)
int8 to int16 per block of X16_BLOCK inputs, int4 to int8 per INT4_UNIT inputs (within 0.4% of the
largest, as llama.cpp's Q8 activations). Float32 and bfloat16 weights compute what the float32 weight
would (but bfloat16 times a few rows, on CPUs with AVX512-BF16: x split into two bfloat16 parts, within
2^-16): several times fewer instructions per weight.

The kernels come as a shared library built by `pip install` (setup.py; a C++ compiler is needed). If it is
missing or fails to load, `available()` is False, the model stays on XLA's matmuls, and `warn_once` says
so: quantized and bfloat16 models then run several times slower.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import quantize

LIBRARY = "_cpu_kernels"  # model/_cpu_kernels<EXTENSION_SUFFIX>, built by setup.py
MATMUL_TARGET = "mixtral_matmul"  # x times weights of any one type (their dtype says which)
MOE_TARGET = "mixtral_moe"  # a MoE layer's experts, in one call
ATTENTION_TARGET = "mixtral_attention"  # decode attention over the KV cache (cpu_attention.py)
GREEDY_TARGET = "mixtral_greedy"  # the greedy choice of a token (sampling.py)
ISAS = ("scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16")  # mixtral_cpu_isa()'s values
GEMV_MAX_ROWS = 4  # as in matmul.cc: more rows take the blocked GEMM kernel
X16_BLOCK = 64  # as in kernels.h: the int8 gemv rounds x to int16 per block of this many inputs
INT4_UNIT = 32  # as in kernels.h: int4 rows in units of this many inputs (the gemv rounds x to int8 per unit),
INT4_BLOCK_UNITS = 16  # interleaved in blocks of this many units; groups: whole units dividing a block
INTERLEAVE_BYTES = 16 << 20  # int4 values a thread interleaves at a time (`interleave_int4`)


@functools.cache
def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library with its FFI targets registered, or None and why not)."""
    here = Path(__file__).parent
    paths = [here / f"{LIBRARY}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return None, (f"the native CPU kernels were not built (no {LIBRARY}*.so in {here}); reinstall with "
                      "`pip install .` on a machine with a C++ compiler (g++ or clang++)")
    try:
        lib = ctypes.CDLL(str(path))
        for target in (MATMUL_TARGET, MOE_TARGET, ATTENTION_TARGET, GREEDY_TARGET):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    except (OSError, AttributeError) as e:
        return None, f"the native CPU kernels in {path} failed to load ({e}); reinstall with `pip install .`"
    return lib, ""


def available() -> bool:
    return _library()[0] is not None


def unavailable_reason() -> str:
    return _library()[1]


@functools.cache
def warn_once() -> None:
    """Say once, on stderr, that quantized / bfloat16 models will be slow on this CPU, and why."""
    if not available():
        print(f"mixtral-chat: warning: {unavailable_reason()}. Until then int8, int4 and bfloat16 models run "
              "on XLA's matmuls, several times slower than float32.", file=sys.stderr, flush=True)


def isa() -> str:
    """The instruction set the kernels run with (the best this CPU has, unless `set_isa` changed it)."""
    return ISAS[_library()[0].mixtral_cpu_isa()]


def set_isa(name: str) -> bool:
    """Run the kernels with `name` (one of ISAS) from now on, if this CPU has it; for tests and benchmarks."""
    return bool(_library()[0].mixtral_cpu_set_isa(ISAS.index(name)))


def supports(mode: str | None, group: int) -> bool:
    """Whether the kernels take weights of this quantization (int4: groups of 32, 64, ..., 512 inputs)."""
    return mode != "int4" or (group % INT4_UNIT == 0 and INT4_UNIT * INT4_BLOCK_UNITS % group == 0)


def layout(kernel: np.ndarray, params: tuple[np.ndarray, ...], mode: str | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """A weight as stored in a checkpoint (kernel [..., in, out], int4 packed along `in`; params: int8 scale
    [..., out], int4 scale and offset [..., in/group, out]) -> the kernels' layout (module docstring)."""
    def swap(a):
        return np.ascontiguousarray(np.swapaxes(a, -1, -2))

    if mode == "int4":
        return interleave_int4(swap(kernel)), tuple(map(swap, params))
    return swap(kernel), params


def interleave_int4(packed: np.ndarray) -> np.ndarray:
    """Out-major int4 values, uint8 [..., out, in/2], as the kernels read them (kernels.h): each row in
    units of INT4_UNIT inputs (16 bytes, 4 chunks of 4), the units in blocks of INT4_BLOCK_UNITS (the last
    may be short), each block's bytes chunk-major: [units, 4 chunks, 4] -> [4 chunks, units, 4]. Rows are
    laid out alone: a device's block of a split weight is laid out as it is read (checkpoint.py), by
    several threads where it is large (numpy copies without the GIL; one thread: 4-9 GB/s)."""
    half = packed.shape[-1]
    units = half // (INT4_UNIT // 2)
    whole = units // INT4_BLOCK_UNITS
    words = np.ascontiguousarray(packed).reshape(-1, half).view(np.uint32)  # 4 bytes each: [rows, units * 4]
    out = np.empty_like(words)

    def rows(r: slice) -> None:
        n = len(words[r])
        for first, blocks, size in ((0, whole, INT4_BLOCK_UNITS), (whole * INT4_BLOCK_UNITS, 1, units % INT4_BLOCK_UNITS)):
            span = slice(4 * first, 4 * (first + blocks * size))  # whole blocks, then the short one (views: one copy)
            out[r, span].reshape(n, blocks, 4, size)[...] = words[r, span].reshape(n, blocks, size, 4).swapaxes(2, 3)

    step = max(1, INTERLEAVE_BYTES // max(half, 1))
    parts = [slice(r, r + step) for r in range(0, len(words), step)]
    if len(parts) > 1:
        with ThreadPoolExecutor(min(len(parts), os.cpu_count() or 1)) as pool:
            list(pool.map(rows, parts))
    else:
        rows(slice(None))
    return out.view(np.uint8).reshape(packed.shape)


def matmul(x: jax.Array, kernel: jax.Array, params: tuple[jax.Array, ...], group: int) -> jax.Array:
    """x [..., in] @ the weight (kernel in the kernels' layout, its dtype saying the type; params: int8
    scale, int4 scale and offset; int4 groups of `group` inputs) -> float32 [..., out]."""
    return matmuls(x, [(kernel, params)], group)[0]


def matmuls(x: jax.Array, weights: Sequence[tuple[jax.Array, tuple[jax.Array, ...]]], group: int) -> list[jax.Array]:
    """x [..., in] @ each of several weights of one type (`matmul`'s (kernel, params)) in one kernel call:
    x is prepared once and all their outputs are shared among the threads at once (the attention's q, k
    and v). -> float32 [..., out_j] for each."""
    if not available():
        raise RuntimeError(unavailable_reason())
    *lead, n_in = x.shape
    rows = x.reshape(-1, n_in).astype(jnp.float32)
    results = [jax.ShapeDtypeStruct((rows.shape[0], kernel.shape[-2]), jnp.float32) for kernel, _ in weights]
    ys = jax.ffi.ffi_call(MATMUL_TARGET, results)(
        rows, *(a for kernel, params in weights for a in _operands(kernel, params)), group=np.int64(group))
    return [y.reshape(*lead, y.shape[-1]) for y in ys]


def moe(x: jax.Array, logits: jax.Array, live: jax.Array, first: jax.Array, stacks: list[tuple], group: int,
        k: int) -> jax.Array:
    """A MoE layer's SwiGLU experts in one kernel call, routing included: x [N, D], the router's logits
    [N, E] (each live [N] token goes to its top k by softmax, renormalised: moe.route), the experts of
    this call global experts first, first + 1, ... (first: an int32 scalar) as stacks (w1, w3, w2) of E'
    experts each, each a (kernel, params) in the kernels' layout with a leading [E'] (w1, w3 [E', I, D],
    w2 [E', D, I]; read in place). Only experts some token chose run, each on all the tokens that chose it.
    -> float32 [N, D]: sum over this call's experts e of weight[:, e] * w2_e(silu(w1_e x) * w3_e x), x as
    `matmul` takes it."""
    if not available():
        raise RuntimeError(unavailable_reason())
    operands = [a for stack in stacks for kernel, params in stack for a in _operands(kernel, params)]
    return jax.ffi.ffi_call(MOE_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x.astype(jnp.float32), logits.astype(jnp.float32), live.astype(jnp.bool_), jnp.asarray(first, jnp.int32).reshape(1),
        *operands, group=np.int64(group), k=np.int64(k))


def _operands(kernel: jax.Array, params: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    """A weight's arrays as the kernels take them: int8's scale float32, int4's scale and offset float16
    (as loaded, the casts are none)."""
    mode = "int8" if kernel.dtype == jnp.int8 else "int4"
    return (kernel, *(p.astype(quantize.PARAM_DTYPES[mode]) for p in params))
