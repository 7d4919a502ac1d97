"""The native CPU matmul kernels (model/cpu_matmul.py) against XLA's, per weight type: GB/s of weights
read by one-row products (decode), GFLOP/s of 512-row products (prefill).

    python -m bench.cpu_matmul [--shape 4096x14336] [--rows 512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.bandwidth import best_time
from model import cpu_matmul, quantize

MODES = (("float32", None), ("bfloat16", None), ("int8", "int8"), ("int4", "int4"))
GROUP = 32
MATRICES = 3  # distinct weights per call, so that they do not sit in the cache


def weights(n_in: int, n_out: int, dtype: str, mode: str | None, seed: int):
    """(XLA's [in, out] kernel + params, the kernels' layout of the same weight)."""
    w = np.random.default_rng(seed).standard_normal((n_in, n_out), np.float32)
    if mode is None:
        w = w.astype(jnp.dtype(dtype))
        return (jnp.asarray(w), ()), (jnp.asarray(cpu_matmul.layout(w, (), None)[0]), ())
    q, params = quantize.quantize(w, mode, GROUP)
    xla_kernel = quantize.unpack_int4(q) if mode == "int4" else q
    kernel, kernel_params = cpu_matmul.layout(q, params, mode)
    return ((jnp.asarray(xla_kernel), tuple(map(jnp.asarray, params))),
            (jnp.asarray(kernel), tuple(map(jnp.asarray, kernel_params))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x14336", help="IN x OUT of each weight")
    parser.add_argument("--rows", type=int, default=512, help="activation rows of the prefill-like product")
    args = parser.parse_args(argv)
    n_in, n_out = map(int, args.shape.split("x"))
    print(f"kernels: {'ISA ' + cpu_matmul.isa() if cpu_matmul.available() else cpu_matmul.unavailable_reason()}")
    print(f"{'weights':<10}{'XLA GB/s':>10}{'ours GB/s':>11}{'XLA GFLOP/s':>13}{'ours GFLOP/s':>14}  ({args.rows} rows)")
    for dtype, mode in MODES:
        pairs = [weights(n_in, n_out, dtype, mode, seed) for seed in range(MATRICES)]
        nbytes = sum(a.nbytes for a in jax.tree.leaves([ours for _, ours in pairs]))
        row = [dtype]
        for rows in (1, args.rows):
            x = jnp.asarray(np.random.default_rng(9).standard_normal((rows, n_in), np.float32))
            if dtype == "bfloat16":  # as a bfloat16 model's activations are
                x = x.astype(jnp.bfloat16).astype(jnp.float32)
            xla = jax.jit(lambda x, ws: sum(quantize.matmul(x, k, p, mode, GROUP) for k, p in ws))
            ours = jax.jit(lambda x, ws: sum(cpu_matmul.matmul(x, k, p, GROUP) for k, p in ws))
            for fn, ws in ((xla, [p[0] for p in pairs]), (ours, [p[1] for p in pairs])):
                seconds = best_time(fn, x, ws, repeats=5 if rows == 1 else 2)
                row.append(nbytes / seconds / 1e9 if rows == 1 else 2 * rows * n_in * n_out * MATRICES / seconds / 1e9)
        print(f"{row[0]:<10}{row[1]:>10.1f}{row[2]:>11.1f}{row[3]:>13.1f}{row[4]:>14.1f}")


if __name__ == "__main__":
    main()
