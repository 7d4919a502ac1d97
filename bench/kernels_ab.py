"""Decode speed of this tree's native CPU kernels against another build of them, in one process.

    python -m bench.kernels_ab OTHER.so [--weights int4] [--rounds 10]

Build the other library from another checkout (`python setup.py build_ext --inplace` there, then pass its
model/_cpu_kernels*.so). Both must take the same FFI arguments: only the C++ differs. The other build's
handlers are registered under other target names, and the decode step is compiled and timed with each in
turn, alternating (A B, B A, ...): both see the same swings of this VM's memory speed, which moved
decode in two processes by up to 6% either way (two processes of the same build: 1.001 and 0.993). In one
process, an A/A reads 0.98-1.00: this resolves ~1.5%. Each round is the best of two decodes of DECODE
tokens of mini-mixtral after a PROMPT-token prompt.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import jax

from bench.run import DECODE, Greedy, prepare
from model import cpu_matmul

TARGETS = ("MATMUL_TARGET", "MOE_TARGET", "ATTENTION_TARGET", "GREEDY_TARGET")  # cpu_matmul's names


def use(build: str) -> None:
    """Make the programs traced from now on call build "A" (this tree's) or "B" (the other's)."""
    for name in TARGETS:
        setattr(cpu_matmul, name, getattr(cpu_matmul, name).removesuffix("_b") + ("_b" if build == "B" else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the other build's _cpu_kernels*.so")
    parser.add_argument("--weights", default="int4", choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    if not cpu_matmul.available():
        raise SystemExit(cpu_matmul.unavailable_reason())
    other = ctypes.CDLL(args.other)
    for name in TARGETS:
        target = getattr(cpu_matmul, name)
        jax.ffi.register_ffi_target(target + "_b", jax.ffi.pycapsule(getattr(other, target)), platform="cpu")

    quantize = args.weights if args.weights in ("int8", "int4") else None
    ours = Greedy(prepare("mini", "bfloat16" if args.weights == "bfloat16" else "float32", quantize)[1])
    tok_s = {"A": [], "B": []}
    for round_ in range(args.rounds):
        for build in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
            use(build)
            jax.clear_caches()  # trace again, with this build's targets
            ours.decode_seconds()
            tok_s[build].append(DECODE / min(ours.decode_seconds(), ours.decode_seconds()))
    ratios = [b / a for a, b in zip(tok_s["A"], tok_s["B"])]
    for build, label in (("A", "this tree"), ("B", args.other)):
        print(f"{build} ({label}): median {statistics.median(tok_s[build]):.1f} tok/s, rounds "
              + " ".join(f"{v:.0f}" for v in tok_s[build]))
    print(f"B / A: median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f} ({args.weights} decode)")


if __name__ == "__main__":
    main()
