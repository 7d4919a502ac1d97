"""The GPU expert kernels against XLA's own ways, one Mixtral-8x7B MoE layer at a time.

    python -m bench.expert_gemv            # decode (expert_gemv) and prefill 512 (grouped_matmul)
    python -m bench.expert_gemv --sweep    # also try other tilings of each kernel, best first

Decode: each program runs LAYERS layers' worth of top-2 expert FFNs (SwiGLU: w1, w3, then w2), each
layer with its own weights, so nothing is served from the cache; reported per layer, with the bytes of
the two chosen experts over the time (XLA: gather the chosen experts, then dot).
Prefill: the FFNs of 512 tokens routed at random, rows grouped by expert (XLA: `jax.lax.ragged_dot`
on the weights widened to bfloat16), reported as tokens/s of one layer.
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp

from bench.bandwidth import best_time
from model import grouped_matmul as gm
from model.expert_gemv import Tiling, as_matmul_operands, expert_gemv, pack_int4
from model.grouped_matmul import GroupedRows, grouped_matmul

D, I, E, K = 4096, 14336, 8, 2  # Mixtral-8x7B
GROUP = 32
LAYERS = {"int8": 8, "int4": 8, "bfloat16": 4}
TOKENS = 512


def random_expert(key, dtype: str, n_in: int, n_out: int):
    """(stored kernel, *params) of E experts in the kernels' layout, weights of about 0.02."""
    k1, k2 = jax.random.split(key)
    if dtype == "bfloat16":
        return (jax.random.normal(k1, (E, n_in, n_out), jnp.bfloat16) * 0.02,)
    if dtype == "int8":
        return (jax.random.randint(k1, (E, n_out, n_in), -127, 128, jnp.int8),
                jnp.full((E, n_out), 0.02 / 73, jnp.float32))
    q = jax.random.randint(k1, (E, n_in, n_out), 0, 16, jnp.uint8)
    scale = jnp.full((E, n_out, n_in // GROUP), 0.02 / 4.6, jnp.float32)
    return pack_int4(q), scale, -8 * scale


def xla_gather(x, experts, kernel, *params):
    """XLA's way: the chosen experts' [in, out] weights gathered and widened, then one batched dot."""
    dense = jax.vmap(lambda e: _dense(kernel[e], tuple(p[e] for p in params), x.dtype))(experts)
    return jnp.einsum("ki,kio->ko", x, dense, preferred_element_type=jnp.float32)


def _dense(kernel, params, dtype):
    """One stored expert -> its [in, out] weight in `dtype`."""
    kernel, params = as_matmul_operands(kernel, params)
    if not params:
        return kernel.astype(dtype)
    if len(params) == 1:
        return (kernel.astype(jnp.float32) * params[0][None, :]).astype(dtype)
    scale, offset = params
    n_in, n_out = kernel.shape
    w = kernel.astype(jnp.float32).reshape(n_in // GROUP, GROUP, n_out) * scale[:, None] + offset[:, None]
    return w.reshape(n_in, n_out).astype(dtype)


def relative_error(a, b) -> float:
    return float(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)).max() / jnp.abs(b.astype(jnp.float32)).max())


def decode_seconds(gemv, layers, x) -> float:
    @jax.jit
    def run(x, layers):
        for experts, w1, w3, w2 in layers:
            xk = jnp.broadcast_to(x, (K, D))
            h = (jax.nn.silu(gemv(xk, experts, *w1)) * gemv(xk, experts, *w3)).astype(x.dtype)
            x = (x + gemv(h, experts, *w2).sum(axis=0, keepdims=True) * 1e-3).astype(x.dtype)
        return x

    return best_time(run, x, layers, repeats=10) / len(layers)


def decode_table(sweep: bool, only: tuple[str, ...] = ()) -> None:
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    print(f"\n{jax.devices()[0].device_kind}; one MoE layer of Mixtral-8x7B, batch-1 decode, top-{K} of {E}")
    print("| weights | XLA gather + dot | expert_gemv |\n|---|---|---|")
    for dtype, n_layers in LAYERS.items():
        if only and dtype not in only:
            continue
        layers = [(jax.random.choice(next(keys), E, (K,), replace=False), random_expert(next(keys), dtype, D, I),
                   random_expert(next(keys), dtype, D, I), random_expert(next(keys), dtype, I, D))
                  for _ in range(n_layers)]
        x = jax.random.normal(next(keys), (1, D), jnp.bfloat16)
        chosen_bytes = 3 * K * D * I * {"bfloat16": 2, "int8": 1, "int4": 0.5}[dtype]
        cells = []
        for gemv in (xla_gather, expert_gemv):
            seconds = decode_seconds(gemv, layers, x)
            cells.append(f"{seconds * 1e3:.3f} ms ({chosen_bytes / seconds / 1e12:.2f} TB/s)")
        experts, w1 = layers[0][:2]
        error = relative_error(expert_gemv(x.repeat(K, 0), experts, *w1), xla_gather(x.repeat(K, 0), experts, *w1))
        print(f"| {dtype} | {cells[0]} | {cells[1]} (error {error:.1e}) |", flush=True)
        if sweep:
            results = []
            blocks_out = (64, 128, 32) if dtype == "bfloat16" else (8, 16, 32, 4)
            for bi, bo, warps, stages in itertools.product((512, 1024, 2048), blocks_out[:3], (4, 8), (3, 4)):
                tiling = Tiling(bi, bo, warps, stages)
                try:
                    seconds = decode_seconds(lambda *a, t=tiling: expert_gemv(*a, tiling=t), layers[:2], x)
                except Exception as e:  # noqa: BLE001 (a tiling the compiler refuses: report, go on)
                    print(f"  {tiling}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                results.append((seconds, tiling))
            for seconds, tiling in sorted(results)[:6]:
                print(f"  {tiling}: {seconds * 1e3:.3f} ms ({chosen_bytes / seconds / 1e12:.2f} TB/s)", flush=True)
        del layers


def prefill_table(sweep: bool) -> None:
    keys = iter(jax.random.split(jax.random.key(1), 100))
    print(f"\none MoE layer, prefill of {TOKENS} tokens (top-{K} of {E}, routed at random), tokens/s")
    print("| weights | XLA ragged_dot (bfloat16) | grouped_matmul |\n|---|---|---|")
    x = jax.random.normal(next(keys), (TOKENS, D), jnp.bfloat16)
    top_e = jax.random.randint(next(keys), (TOKENS, K), 0, E)
    top_w = jnp.full((TOKENS, K), 0.5, jnp.float32)
    for dtype in LAYERS:
        w1, w3, w2 = (random_expert(next(keys), dtype, n_in, n_out) for n_in, n_out in ((D, I), (D, I), (I, D)))

        def ours(x, w1, w3, w2, tiling=None):
            rows = GroupedRows.of(top_w, top_e, E, (tiling or gm.TILING).block_rows)
            xr = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[rows.token_of]
            block_rows = rows.token_of.shape[0] // rows.tile_expert.shape[0]
            mm = lambda h, w: grouped_matmul(h, rows.tile_expert, *w, block_rows=block_rows, tiling=tiling)  # noqa: E731
            h = (jax.nn.silu(mm(xr, w1)) * mm(xr, w3)).astype(x.dtype)
            return jnp.zeros((TOKENS + 1, D), jnp.float32).at[rows.token_of].add(mm(h, w2) * rows.weight_of[:, None])

        def xla(x, w1, w3, w2):
            dense = [jax.vmap(lambda k, *p: _dense(k, p, jnp.bfloat16))(*w) for w in (w1, w3, w2)]
            order = jnp.argsort(top_e.reshape(-1))
            sizes = jnp.zeros(E, jnp.int32).at[top_e.reshape(-1)].add(1)
            xr = x[order // K]
            h = jax.nn.silu(jax.lax.ragged_dot(xr, dense[0], sizes)) * jax.lax.ragged_dot(xr, dense[1], sizes)
            return jax.lax.ragged_dot(h.astype(x.dtype), dense[2], sizes)

        args = (x, w1, w3, w2)
        cells = [f"{TOKENS / best_time(jax.jit(fn), *args, repeats=5):.0f}" for fn in (xla, ours)]
        order = jnp.argsort(top_e.reshape(-1))
        ours_summed = jax.jit(ours)(*args)[:TOKENS]  # summed per token: compare with the ragged rows summed too
        xla_summed = jnp.zeros((TOKENS, D), jnp.float32).at[order // K].add(jax.jit(xla)(*args).astype(jnp.float32) * 0.5)
        print(f"| {dtype} | {cells[0]} | {cells[1]} (error {relative_error(ours_summed, xla_summed):.1e}) |", flush=True)
        if sweep:
            results = []
            for rows, bo, bi, warps, stages in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (3,)):
                tiling = gm.Tiling(rows, bo, bi, warps, stages)
                try:
                    results.append((best_time(jax.jit(functools.partial(ours, tiling=tiling)), *args, repeats=3), tiling))
                except Exception as e:  # noqa: BLE001
                    print(f"  {tiling}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            for seconds, tiling in sorted(results)[:6]:
                print(f"  {tiling}: {TOKENS / seconds:.0f} tok/s", flush=True)
        del args, w1, w3, w2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time other tilings of each kernel")
    parser.add_argument("--decode-only", nargs="*", metavar="DTYPE", help="only the decode table (of these dtypes)")
    args = parser.parse_args()
    decode_table(args.sweep, tuple(args.decode_only or ()))
    if args.decode_only is None:
        prefill_table(args.sweep)


if __name__ == "__main__":
    main()
