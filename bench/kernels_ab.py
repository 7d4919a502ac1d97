"""Speed of this tree's native CPU kernels against another build of them, in one process.

    python -m bench.kernels_ab OTHER.so [--weights int4] [--program decode] [--rounds 16]

Build the other library from another checkout (`python setup.py build_ext --inplace` there, then pass its
model/_cpu_kernels*.so). Both must take the same FFI arguments: only the C++ differs. The other build's
handlers are registered under other target names; the program is compiled once with each build's, and
the two run in turns, one run each (A B, B A, ...), so that both see the same swings of this VM's memory
speed (two processes of one build differed by up to 6% either way). Programs, on mini-mixtral's shapes:

  decode       DECODE tokens after a PROMPT-token prompt (tok/s)
  prefill      PREFILL tokens into an empty cache (tok/s)
  projections  the attention's q, k, v and o projections of LAYERS layers, chained (GB/s of weights)
  experts      a MoE layer's two chosen experts, w1 w3 then w2, of LAYERS layers, chained (GB/s)

The chained programs read ~130 MB of random weights, so that they come from memory as decode's do. An A/A
(this tree's library as OTHER, int4, 12 rounds) read 0.988 and 1.029 for decode, 0.990 for the experts:
decode's differences under ~3% are noise.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.run import DECODE, MINI_MIXTRAL, PREFILL, PROMPT, Greedy, prepare
from model import cpu_matmul, quantize

TARGETS = ("MATMUL_TARGET", "MOE_TARGET", "ATTENTION_TARGET", "GREEDY_TARGET")  # cpu_matmul's names
PROGRAMS = ("decode", "prefill", "projections", "experts")
CHAINED_BYTES = 128 << 20  # of weights, at least, a chained program reads
GROUP = 32  # int4 inputs per group


def use(build: str) -> None:
    """Make the programs traced from now on call build "A" (this tree's) or "B" (the other's)."""
    for name in TARGETS:
        setattr(cpu_matmul, name, getattr(cpu_matmul, name).removesuffix("_b") + ("_b" if build == "B" else ""))


def compiled_with(build: str, lower):
    """lower() (-> jax Lowered) traced with `build`'s targets, compiled."""
    use(build)
    jax.clear_caches()  # trace again, with this build's targets
    return lower().compile()


def model_runs(weights: str, program: str):
    """run(build) -> tok/s of one run of decode or prefill of mini-mixtral with that build's kernels."""
    mode = weights if weights in ("int8", "int4") else None
    ours = Greedy(prepare("mini", "bfloat16" if weights == "bfloat16" else "float32", mode)[1])
    gen = ours.gen
    if program == "decode":
        token, cache, seen = ours.prefill(PROMPT)
        args = (token, seen, ours.seed, np.int32(1), ours.sampling)
        programs = {b: compiled_with(b, lambda: gen.decode_program.lower(gen.model_def, gen.params, cache, *args))
                    for b in "AB"}

        def run(build: str) -> float:  # (as Greedy.step: the compiled decode call, step 1 of the seed's stream)
            return DECODE / ours.decode_seconds(lambda token, cache, seen: programs[build](
                gen.params, cache, token, seen, ours.seed, np.int32(1), ours.sampling)[1:])
    else:
        tokens = jax.device_put(np.asarray([ours.ids[:PREFILL]], np.int32))
        args = (tokens, np.int32(PREFILL), gen.seen_mask([]), ours.seed, ours.sampling)
        programs = {b: compiled_with(b, lambda: gen.prefill_program.lower(
            gen.model_def, gen.params, gen.new_cache(ours.engine.capacity), *args)) for b in "AB"}

        def run(build: str) -> float:
            cache = gen.new_cache(ours.engine.capacity)
            start = time.perf_counter()
            token, _ = programs[build](gen.params, cache, *args)
            token.block_until_ready()
            return PREFILL / (time.perf_counter() - start)
    return run


def random_weight(rng, shape: tuple[int, ...], weights: str):
    """Random weights [..., in, out] in the kernels' layout and type: (kernel, params)."""
    w = rng.standard_normal(shape, np.float32) * 0.02
    if weights in ("float32", "bfloat16"):
        return jnp.asarray(cpu_matmul.layout(w.astype(jnp.dtype(weights)), (), None)[0]), ()
    q, params = quantize.quantize(w, weights, GROUP)
    kernel, params = cpu_matmul.layout(np.asarray(q), tuple(np.asarray(p) for p in params), weights)
    return jnp.asarray(kernel), tuple(map(jnp.asarray, params))


def chained_runs(weights: str, program: str):
    """run(build) -> GB/s of weights of one run (the best of 3) of the projections' or the experts' chain."""
    D, I, heads, kv_heads = (MINI_MIXTRAL[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                        "num_key_value_heads"))
    kv = D // heads * kv_heads
    rng = np.random.default_rng(0)
    if program == "projections":
        def layer():
            return [random_weight(rng, shape, weights) for shape in ((D, D), (D, kv), (D, kv), (D, D))]

        def chain(x, layers):
            for wq, wk, wv, wo in layers:
                q, k, v = cpu_matmul.matmuls(x, [wq, wk, wv], GROUP)
                x = x + cpu_matmul.matmul(q * jnp.tile(k + v, heads // kv_heads), *wo, GROUP)
            return x
    else:
        def layer():  # the two experts chosen, as a stack of two (w1, w3, w2)
            return [random_weight(rng, shape, weights) for shape in ((2, D, I), (2, D, I), (2, I, D))]

        logits, live = jnp.zeros((1, 2), jnp.float32), jnp.ones((1,), bool)

        def chain(x, layers):
            for stack in layers:
                x = x + cpu_matmul.moe(x, logits, live, 0, [tuple(stack)], GROUP, 2)
            return x
    layers = [layer()]
    per_layer = sum(a.nbytes for a in jax.tree.leaves(layers[0]))
    layers += [layer() for _ in range(-(-CHAINED_BYTES // per_layer) - 1)]
    x = jnp.asarray(rng.standard_normal((1, D), np.float32)).astype(jnp.bfloat16).astype(jnp.float32)
    programs = {b: compiled_with(b, lambda: jax.jit(lambda *a: chain(*a)).lower(x, layers)) for b in "AB"}

    def run(build: str) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            programs[build](x, layers).block_until_ready()
            best = min(best, time.perf_counter() - start)
        return per_layer * len(layers) / best / 1e9
    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="the other build's _cpu_kernels*.so")
    parser.add_argument("--weights", default="int4", choices=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--program", default="decode", choices=PROGRAMS)
    parser.add_argument("--rounds", type=int, default=16)
    args = parser.parse_args(argv)
    if not cpu_matmul.available():
        raise SystemExit(cpu_matmul.unavailable_reason())
    other = ctypes.CDLL(args.other)
    for name in TARGETS:
        target = getattr(cpu_matmul, name)
        jax.ffi.register_ffi_target(target + "_b", jax.ffi.pycapsule(getattr(other, target)), platform="cpu")

    run = (model_runs if args.program in ("decode", "prefill") else chained_runs)(args.weights, args.program)
    unit = "tok/s" if args.program in ("decode", "prefill") else "GB/s"
    for build in "AB":  # (first runs: pages faulted in, caches warm)
        run(build)
    speed = {"A": [], "B": []}
    for round_ in range(args.rounds):
        for build in ("A", "B") if round_ % 2 == 0 else ("B", "A"):
            speed[build].append(run(build))
    ratios = [b / a for a, b in zip(speed["A"], speed["B"])]
    for build, label in (("A", "this tree"), ("B", args.other)):
        print(f"{build} ({label}): median {statistics.median(speed[build]):.1f} {unit}, rounds "
              + " ".join(f"{v:.0f}" for v in speed[build]))
    print(f"B / A: median {statistics.median(ratios):.3f}, mean {statistics.mean(ratios):.3f} "
          f"({args.weights} {args.program}; > 1: B faster)")


if __name__ == "__main__":
    main()
