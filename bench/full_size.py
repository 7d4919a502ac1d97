"""Full-size Mixtral-8x7B with random weights on an accelerator, against the memory-bandwidth roofline.

    python -m bench.full_size --quantization int8      # an H100 (80 GB): int8 weights, bfloat16 activations
    python -m bench.full_size --dtype bfloat16         # an H200 (141 GB)
    python -m bench.full_size --config mini --dtype float32   # the script itself, on any machine, in seconds

The weights are drawn at random on the devices, each array made directly in its shards, so nothing
crosses the host and no checkpoint is needed; the programs are our engine's own (`model.generate`).
Measured, batch 1, greedy:
- the device's read bandwidth (a reduction over 4 GiB),
- decode tokens/s (128 tokens after a 32-token prompt; `--tokens-per-call 1,4` compares calls of 1 and 4
  tokens, the engine's choice by default) and the roofline: bandwidth / bytes one decoded
  token reads (`MixtralConfig.decode_bytes`),
- prefill tokens/s of a 512-token prompt,
- compile time of the decode step and of the 512-token prefill,
- device memory in use.
Prints a table and writes JSON (`--json PATH`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from bench.bandwidth import best_time
from bench.run import MINI_MIXTRAL
from model import linear, quantize
from model.config import MixtralConfig
from model.engine_api import SamplingParams
from model.generate import Generator
from model.mixtral import Mixtral
from model.sampling import SamplingArrays
from model.sharding import make_mesh, parse_mesh_shape
from model.weight_table import info_of, weight_table

MIXTRAL_8X7B = dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=32768)
CONFIGS = {"mixtral-8x7b": MIXTRAL_8X7B, "mini": dict(model_type="mixtral", **MINI_MIXTRAL)}
PROMPT, DECODE, PREFILL, CAPACITY = 32, 128, 512, 4096
WEIGHT_STD = 0.02


@functools.cache
def _drawer(kind: str, shape: tuple[int, ...], dtype, sharding: NamedSharding):
    """A compiled program drawing one array of `kind` straight into its shards (one per distinct shape)."""
    if kind == "ones":
        draw = lambda key: jnp.ones(shape, dtype)  # noqa: E731 (norm weights)
    elif kind == "normal":
        draw = lambda key: (WEIGHT_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)  # noqa: E731
    elif kind == "int8":
        draw = lambda key: jax.random.randint(key, shape, -127, 128, jnp.int8)  # noqa: E731
    elif kind == "uint4":
        draw = lambda key: jax.random.randint(key, shape, 0, 16, jnp.uint8).astype(jnp.uint4)  # noqa: E731
    else:  # "scale": positive, so that values * scale has about WEIGHT_STD
        draw = lambda key: jax.random.uniform(key, shape, dtype, 0.5, 1.5) * (WEIGHT_STD / 73)  # noqa: E731
    return jax.jit(draw, out_shardings=sharding)


class RandomWeights:
    """A `model.linear.Weights` source of random arrays (shapes, norms and what is quantized from
    model.weight_table), made on the devices in their shards."""

    def __init__(self, config: MixtralConfig, mesh, seed: int = 0):
        self.config, self.mesh = config, mesh
        self.table = weight_table(config)
        self.key, self.drawn = jax.random.key(seed), 0

    def _draw(self, kind: str, shape: tuple[int, ...], dtype, spec: tuple) -> jax.Array:
        self.drawn += 1
        return _drawer(kind, tuple(shape), dtype, NamedSharding(self.mesh, P(*spec)))(jax.random.fold_in(self.key, self.drawn))

    def _shape(self, name: str, rows: slice | None) -> tuple[int, ...]:
        shape = info_of(self.table, name).shape
        return shape if rows is None else (rows.stop - rows.start, *shape[1:])

    def dense(self, name: str, spec: tuple, rows: slice | None = None) -> jax.Array:
        return self._draw(info_of(self.table, name).init, self._shape(name, rows), self.config.dtype, spec)

    def linear(self, name: str, spec: tuple, rows: slice | None = None, out_major: bool = False
               ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        if out_major:  # drawn [in, out], laid out on the devices (int4 not interleaved: random bytes either way)
            mode = self.config.quantization if info_of(self.table, name).quantizable else None
            return linear.out_major(self.linear(name, spec, rows), mode, self.mesh, spec)
        mode, group = self.config.quantization, self.config.quant_group_size
        if mode is None or not info_of(self.table, name).quantizable:
            return self.dense(name, spec, rows), ()
        shape = self._shape(name, rows)
        param_spec, param_shape = quantize.param_spec(spec, mode), quantize.param_shape(shape, mode, group)
        param_dtype = quantize.PARAM_DTYPES[mode]
        if mode == "int8":
            return self._draw("int8", shape, jnp.int8, spec), (self._draw("scale", param_shape, param_dtype, param_spec),)
        scale = self._draw("scale", param_shape, param_dtype, param_spec)
        offset = -8 * scale  # values 0..15 centred on 0
        return self._draw("uint4", shape, jnp.uint4, spec), (scale, offset)


def read_bandwidth(nbytes: int = 4 << 30, repeats: int = 20) -> float:
    """Bytes/s the device reads: the best of `repeats` sums over an nbytes bfloat16 array."""
    x = jnp.ones((nbytes // 2 // 4096, 4096), jnp.bfloat16)
    return nbytes / best_time(jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32)), x, repeats=repeats)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def measure(config: MixtralConfig, mesh_shape: tuple[int, int] | None, tokens_per_call: Sequence[int] = (),
            profile_dir: str | None = None) -> dict:
    """The figures of the module's docstring; decode once for each count of `tokens_per_call` (default: the
    engine's, `Generator.tokens_per_call`), the first being the one reported as `decode_tok_s`."""
    bandwidth = read_bandwidth()
    mesh = make_mesh(mesh_shape)
    with jax.set_mesh(mesh):
        model, build_s = _timed(lambda: Mixtral(config, RandomWeights(config, mesh), mesh))
    gen = Generator(model)
    del model
    greedy = SamplingArrays.of(SamplingParams(temperature=0))
    seed = gen.seed(0)
    ids = jax.random.randint(jax.random.key(1), (PREFILL,), 3, config.vocab_size).tolist()

    def prefill(n):
        """-> ((token, cache, seen), seconds of the prefill alone: the cache is allocated before)."""
        cache, seen = jax.block_until_ready((gen.new_cache(CAPACITY), gen.seen_mask([])))
        (token, cache), seconds = _timed(lambda: gen.prefill(cache, ids[:n], seen, seed, greedy))
        return (token, cache, seen), seconds

    dispatch = []  # seconds the host took to enqueue each timed run of calls

    def decode(state, calls):
        token, cache, seen = state
        start = time.perf_counter()
        for _ in range(calls):
            _, token, cache, seen = gen.decode(cache, token, seen, seed, 1, greedy)
        dispatch.append(time.perf_counter() - start)
        return token, cache, seen

    state, compile_prefill_prompt_s = prefill(PROMPT)
    decodes = {}  # tokens a call -> (tokens/s, host ms to dispatch a token, compile seconds)
    for tokens in tokens_per_call or (gen.tokens_per_call,):
        gen.set_tokens_per_call(tokens)
        state, compile_s = _timed(lambda: decode(state, 1))
        state, _ = _timed(lambda: decode(state, 3))
        state, decode_s = _timed(lambda: decode(state, DECODE // tokens))
        made = DECODE // tokens * tokens
        decodes[tokens] = (made / decode_s, dispatch[-1] / made * 1e3, compile_s)
    if profile_dir:
        gen.set_tokens_per_call(next(iter(decodes)))
        print(profile_decode(gen, state, 16, profile_dir), flush=True)
    _, compile_prefill_s = prefill(PREFILL)
    prefill_s = min(prefill(PREFILL)[1] for _ in range(3))
    bytes_per_token = config.decode_bytes(PROMPT + DECODE)
    memory = jax.devices()[0].memory_stats() or {}
    decode_tps, decode_dispatch_ms, compile_decode_s = next(iter(decodes.values()))
    return {
        "device": f"{mesh.size} x {jax.devices()[0].device_kind}", "mesh": dict(mesh.shape),
        "dtype": config.dtype, "quantization": config.quantization,
        "weight_bytes": config.weight_bytes(), "bytes_per_token": bytes_per_token,
        "read_bandwidth_bytes_per_s": bandwidth, "roofline_tok_s": bandwidth / bytes_per_token,
        "decode_tok_s": decode_tps, "decode_ms_per_token": 1e3 / decode_tps,
        "decode_dispatch_ms_per_token": decode_dispatch_ms,
        "of_roofline": decode_tps / (bandwidth / bytes_per_token),
        "decode_by_tokens_per_call": {k: {"tok_s": tps, "dispatch_ms_per_token": ms, "compile_s": c}
                                      for k, (tps, ms, c) in decodes.items()},
        "prefill_tok_s": PREFILL / prefill_s, "build_s": build_s,
        "compile_decode_s": compile_decode_s, "compile_prefill_32_s": compile_prefill_prompt_s,
        "compile_prefill_512_s": compile_prefill_s - prefill_s,
        "peak_device_bytes": memory.get("peak_bytes_in_use"),
        "jax": jax.__version__,
    }


def profile_decode(gen: Generator, state, calls: int, trace_dir: str, top: int = 25) -> str:
    """A device-time breakdown of `calls` decode calls (from a profiler trace): the ops that took the most
    GPU time per token, and the GPU's busy time against the wall clock."""
    import glob
    import gzip

    greedy, seed = SamplingArrays.of(SamplingParams(temperature=0)), gen.seed(0)
    token, cache, seen = state
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(calls):
            _, token, cache, seen = gen.decode(cache, token, seen, seed, 1, greedy)
        token.block_until_ready()
        wall = time.perf_counter() - start
    trace = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True))[-1]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "/device:GPU" in str(e.get("args", {}).get("name", ""))}
    if not gpu_pids:
        names = {str(e.get("args", {}).get("name")) for e in events if e.get("name") == "process_name"}
        return f"decode profile: no GPU process in the trace (processes: {sorted(names)})"
    by_name: dict[str, float] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            by_name[e["name"]] = by_name.get(e["name"], 0.0) + e.get("dur", 0.0)
    busy, tokens = sum(by_name.values()), calls * gen.tokens_per_call
    lines = [f"decode profile: {tokens} tokens in calls of {gen.tokens_per_call}, wall {wall / tokens * 1e3:.2f} "
             f"ms/token, GPU ops {busy / tokens / 1e3:.2f} ms/token (summed over streams)"]
    for name, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {us / tokens:9.1f} us/token  {name[:110]}")
    return "\n".join(lines)


def table(r: dict) -> str:
    quant = r["quantization"] or "none"
    rows = [
        ("device", r["device"]), ("weights", f"{r['dtype']}, quantization {quant}, {r['weight_bytes'] / 1e9:.1f} GB"),
        ("read bandwidth", f"{r['read_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s"),
        ("bytes per decoded token", f"{r['bytes_per_token'] / 1e9:.2f} GB"),
        ("roofline", f"{r['roofline_tok_s']:.1f} tok/s"),
        ("decode (batch 1)", f"{r['decode_tok_s']:.1f} tok/s, {r['decode_ms_per_token']:.2f} ms/token, "
                             f"{r['of_roofline']:.2f} of the roofline"),
        ("host time to dispatch a decoded token", f"{r['decode_dispatch_ms_per_token']:.2f} ms"),
        *((f"decode, {k} token{'s' if k > 1 else ''} a call",
           f"{d['tok_s']:.1f} tok/s ({d['tok_s'] / r['roofline_tok_s']:.2f} of the roofline), "
           f"host {d['dispatch_ms_per_token']:.2f} ms a token, compiled in {d['compile_s']:.1f} s")
          for k, d in r["decode_by_tokens_per_call"].items() if len(r["decode_by_tokens_per_call"]) > 1),
        ("prefill 512", f"{r['prefill_tok_s']:.0f} tok/s"),
        ("compile: decode / prefill 32 / prefill 512", f"{r['compile_decode_s']:.1f} / {r['compile_prefill_32_s']:.1f} "
                                                       f"/ {r['compile_prefill_512_s']:.1f} s"),
        ("peak device memory", f"{(r['peak_device_bytes'] or 0) / 1e9:.1f} GB"),
    ]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="mixtral-8x7b", choices=list(CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--mesh", help="AxB (expert x model); default: every device on the model axis")
    parser.add_argument("--tokens-per-call", type=lambda s: [int(k) for k in s.split(",")], default=[],
                        help="decode with each of these tokens a call, e.g. 1,4 (default: the engine's)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--profile", metavar="DIR", help="also print where decode spends GPU time (trace in DIR)")
    args = parser.parse_args(argv)
    config = MixtralConfig.from_hf(CONFIGS[args.config], dtype=args.dtype, quantization=args.quantization)
    mesh_shape = parse_mesh_shape(args.mesh) if args.mesh else None
    result = {"config": args.config, **measure(config, mesh_shape, args.tokens_per_call, args.profile)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
