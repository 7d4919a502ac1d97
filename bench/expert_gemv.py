"""The expert_gemv kernel against XLA's own way (gather the chosen experts, then dot), on a GPU.

    python -m bench.expert_gemv          # one Mixtral-8x7B MoE layer, batch-1 decode, int8 and bfloat16

Each program runs LAYERS layers' worth of top-2 expert FFNs (SwiGLU: w1, w3, then w2), each layer with
its own weights, so nothing is served from the cache; reported per layer, with the bytes of the two
chosen experts over the time.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from model.expert_gemv import expert_gemv, stores_out_major

D, I, E, K = 4096, 14336, 8, 2  # Mixtral-8x7B
LAYERS = {"int8": 8, "bfloat16": 4}


def xla_gather(x, experts, kernel, scale):
    w = kernel[experts].astype(x.dtype)  # [K, in, out]: XLA copies the chosen experts first
    out = jnp.einsum("ki,kio->ko", x, w, preferred_element_type=jnp.float32)
    return out if scale is None else out * scale[experts]


def ours(x, experts, kernel, scale):
    return expert_gemv(x, experts, kernel, scale)


def per_layer_seconds(gemv, layers, x) -> float:
    @jax.jit
    def run(x, layers):
        for experts, (w1, s1), (w3, s3), (w2, s2) in layers:
            xk = jnp.broadcast_to(x, (K, D))
            h = (jax.nn.silu(gemv(xk, experts, w1, s1)) * gemv(xk, experts, w3, s3)).astype(x.dtype)
            x = (x + gemv(h, experts, w2, s2).sum(axis=0, keepdims=True) * 1e-3).astype(x.dtype)
        return x

    run(x, layers).block_until_ready()
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        run(x, layers).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best / len(layers)


def main() -> None:
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    print(f"{jax.devices()[0].device_kind}; one MoE layer of Mixtral-8x7B, batch-1 decode, top-{K} of {E}")
    print("| weights | XLA gather + dot | expert_gemv |\n|---|---|---|")
    for dtype, n_layers in LAYERS.items():
        def weight(shape, out):
            if dtype == "int8":
                return (jax.random.randint(next(keys), shape, -127, 128, jnp.int8),
                        jnp.full((E, out), 1e-4, jnp.float32))
            return jax.random.normal(next(keys), shape, jnp.bfloat16) * 0.02, None

        layers = [(jax.random.choice(next(keys), E, (K,), replace=False),
                   weight((E, D, I), I), weight((E, D, I), I), weight((E, I, D), D)) for _ in range(n_layers)]
        x = jax.random.normal(next(keys), (1, D), jnp.bfloat16)
        chosen_bytes = 3 * K * D * I * jnp.dtype(dtype).itemsize
        cells = []
        for gemv in (xla_gather, ours):
            if gemv is ours and stores_out_major(dtype):  # the kernel's layout: [E, out, in]
                layers = [(e, *((jnp.swapaxes(w, 1, 2), s) for w, s in mats)) for e, *mats in layers]
            seconds = per_layer_seconds(gemv, layers, x)
            cells.append(f"{seconds * 1e3:.3f} ms ({chosen_bytes / seconds / 1e12:.2f} TB/s)")
        print(f"| {dtype} | {cells[0]} | {cells[1]} |", flush=True)
        del layers


if __name__ == "__main__":
    main()
