"""Mixtral in Flax NNX: RMSNorm, RoPE, GQA attention over a KV cache, top-k sparse MoE.

Shapes: B batch, T new tokens, S cache slots, D hidden, H query heads, KV kv heads, G = H / KV,
Dh head dim, E experts, A devices on the mesh's expert axis, I intermediate (per expert), V vocab.

The model is built from a `Weights` source (see checkpoint.py), which hands out arrays already placed in
their shards, so the full model never exists on one device or in host memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from .config import MixtralConfig
from .cpu_attention import MAX_QUERIES, CpuAttention
from .gpu_linear import GpuKernels
from .kv_cache import KVCache, loaded, stored
from .linear import CpuKernels, Linear, Weights, project, use_cpu_kernels
from .moe import MoE
from .sharding import cache_spec, check_mesh_fits, weight_specs
from .weight_table import swap_last

DECODE_FIRST_BLOCK = 256  # decode attention's first block of cache slots; each next one is twice as long
MASKED = -1e30  # score of a key a query must not see (finite: no inf - inf in the online softmax)


class RMSNorm(nnx.Module, pytree=False):
    def __init__(self, weight: jax.Array, eps: float):
        self.weight = nnx.Param(weight)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def rotary(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, Dh] for integer positions [B, T] (the rotate-half layout of HF checkpoints)."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, Dh]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def decode_blocks(capacity: int) -> list[tuple[int, int]]:
    """(first slot, size) of the blocks decode attention visits: 256, 512, 1024, ... slots, the last cut
    at the capacity."""
    blocks, first, size = [], 0, DECODE_FIRST_BLOCK
    while first < capacity:
        blocks.append((first, min(size, capacity - first)))
        first, size = first + size, 2 * size
    return blocks


def attend(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, q_slots: jax.Array, start: jax.Array,
           block: int, sliding_window: int | None, branchless: bool, dtype) -> jax.Array:
    """Causal attention of new queries over the cache, block by block with an online softmax.

    q [B, KV, G, T, Dh] (already scaled); k_cache [B, KV, Dh, S]; v_cache [B, KV, S, Dh], held as
    kv_cache.stored makes them from `dtype`; q_slots [T]
    the slot of each query; start [B] each row's first slot. Only the blocks up to the last query's
    slot are visited, except `branchless` (see `Mixtral`), which reads the whole cache in one block.
    Returns [B, KV, G, T, Dh] float32.
    """
    B, KV, G, T, Dh = q.shape
    S = v_cache.shape[2]

    def fold(carry, first, size: int, fresh_from):
        """Fold slots [first, first + size) into the running softmax, those before `fresh_from` masked."""
        m, l, acc = carry
        k = loaded(jax.lax.dynamic_slice_in_dim(k_cache, first, size, axis=3), dtype)  # [B, KV, Dh, size]
        v = loaded(jax.lax.dynamic_slice_in_dim(v_cache, first, size, axis=2), dtype)
        k_slots = first + jnp.arange(size)
        visible = (k_slots[None, :] <= q_slots[:, None]) & (k_slots >= fresh_from)[None, :]
        if sliding_window is not None:
            visible &= q_slots[:, None] - k_slots[None, :] < sliding_window
        visible = visible[None] & (k_slots[None, None, :] >= start[:, None, None])  # [B, T, size]
        s = jnp.einsum("bkgtd,bkds->bkgts", q, k, preferred_element_type=jnp.float32)
        s = jnp.where(visible[:, None, None], s, MASKED)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + p.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p, v.astype(jnp.float32))
        return m_new, l, acc

    def step(j, carry):
        """Block j of `block` slots; a last block that would run past the cache is read from S - block
        instead, and masks the slots the previous block covered."""
        return fold(carry, jnp.minimum(j * block, S - block), block, j * block)

    carry = (jnp.full((B, KV, G, T), MASKED, jnp.float32), jnp.zeros((B, KV, G, T), jnp.float32),
             jnp.zeros((B, KV, G, T, Dh), jnp.float32))
    if branchless:
        carry = fold(carry, 0, S, 0)
    elif T == 1:
        # Decode: a few blocks, each under a cond that skips it past the last written slot. (On XLA:CPU
        # a while loop first copies every array it reads, here the whole cache; a cond reads its
        # operands in place, but copies each block of K and V it slices for the matmuls.) Blocks double
        # in size, so a short conversation copies a short block; few blocks keep the program small.
        for first, size in decode_blocks(S):
            carry = jax.lax.cond(first <= q_slots[-1], functools.partial(fold, first=first, size=size, fresh_from=first),
                                 lambda c: c, carry)
    else:
        carry = jax.lax.fori_loop(0, (q_slots[-1] + block) // block, step, carry)
    _, l, acc = carry
    return acc / l[..., None]


def linear_layer(weights: Weights, name: str, spec: tuple, config: MixtralConfig, mesh: Mesh, branchless: bool,
                 cpu_kernels: bool) -> Linear:
    """The Linear of weight `name`: through the CPU kernels (read in their layout), the GPU's (quantized
    weights, laid out at load) or XLA's matmuls."""
    if cpu_kernels:
        return Linear(weights.linear(name, spec, out_major=True), config, CpuKernels(mesh, spec), laid_out=True)
    return Linear(weights.linear(name, spec), config, GpuKernels(mesh, spec) if branchless else None)


class Attention(nnx.Module, pytree=False):
    def __init__(self, config: MixtralConfig, weights: Weights, prefix: str, specs: dict, mesh: Mesh,
                 branchless: bool, cpu_kernels: bool):
        self.config, self.branchless = config, branchless

        def linear(name: str) -> Linear:
            return linear_layer(weights, f"{prefix}.{name}", specs[name], config, mesh, branchless, cpu_kernels)

        self.wq, self.wk, self.wv, self.wo = linear("wq"), linear("wk"), linear("wv"), linear("wo")
        self.cpu_attention = CpuAttention(mesh, cache_spec(config, mesh)) if cpu_kernels else None

    def __call__(self, x, cos, sin, k_cache, v_cache, q_slots, start, block):
        """x [B, T, D] -> ([B, T, D], updated k_cache, v_cache); the new keys/values go to slots q_slots."""
        c = self.config
        B, T, _ = x.shape
        G = c.num_heads // c.num_kv_heads
        q, k, v = project(x, [self.wq, self.wk, self.wv])
        q = apply_rotary(q.reshape(B, T, c.num_heads, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(B, T, c.num_kv_heads, c.head_dim), cos, sin)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim)
        q = q.reshape(B, T, c.num_kv_heads, G, c.head_dim).transpose(0, 2, 3, 1, 4) * (c.head_dim ** -0.5)
        if self.cpu_attention is not None and T <= MAX_QUERIES:  # decode: the kernel writes k and v too
            out, k_cache, v_cache = self.cpu_attention(q, k, v, k_cache, v_cache, q_slots, start, c.sliding_window,
                                                       c.dtype)
        else:
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, stored(k.transpose(0, 2, 3, 1), c.dtype), q_slots[0],
                                                          axis=3)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, stored(v.transpose(0, 2, 1, 3), c.dtype), q_slots[0],
                                                          axis=2)
            out = attend(q, k_cache, v_cache, q_slots, start, block, c.sliding_window, self.branchless, c.dtype)
        out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, c.num_heads * c.head_dim).astype(x.dtype)
        return self.wo(out), k_cache, v_cache


class Block(nnx.Module, pytree=False):
    def __init__(self, config: MixtralConfig, weights: Weights, layer: int, specs: dict, mesh: Mesh, branchless: bool,
                 cpu_kernels: bool):
        prefix = f"layers.{layer}"
        self.attn_norm = RMSNorm(weights.dense(f"{prefix}.attn_norm", specs["attn_norm"]), config.rms_norm_eps)
        self.attn = Attention(config, weights, prefix, specs, mesh, branchless, cpu_kernels)
        self.ffn_norm = RMSNorm(weights.dense(f"{prefix}.ffn_norm", specs["ffn_norm"]), config.rms_norm_eps)
        self.moe = MoE(config, weights, prefix, specs, mesh, branchless, cpu_kernels)

    def __call__(self, x, cos, sin, k_cache, v_cache, q_slots, start, block, live):
        with jax.named_scope("attention"):
            attn_out, k_cache, v_cache = self.attn(self.attn_norm(x), cos, sin, k_cache, v_cache, q_slots, start, block)
        h = x + attn_out
        with jax.named_scope("moe"):
            h = h + self.moe(self.ffn_norm(h), live)
        return h, k_cache, v_cache


class Mixtral(nnx.Module, pytree=False):
    """`branchless` (default: on GPUs) keeps data-dependent control flow out of the programs: XLA on a
    GPU runs each cond or loop iteration by copying its predicate to the host and waiting (~40 us; 384
    per token of Mixtral-8x7B), so attention reads the whole cache at once and the experts run in Pallas
    kernels (expert_gemv for decode, grouped_matmul for prefill). On the CPU a cond costs nothing and
    skips work.

    `cpu_kernels` (default: on CPUs where they loaded, unless branchless) runs the matmuls of the
    attention projections, the experts and the LM head through the native CPU kernels (cpu_matmul.py),
    their weights laid out for them at load, and decode attention too (cpu_attention.py); otherwise
    through XLA's."""

    def __init__(self, config: MixtralConfig, weights: Weights, mesh: Mesh, branchless: bool | None = None,
                 cpu_kernels: bool | None = None):
        check_mesh_fits(mesh, config)
        self.config, self.mesh = config, mesh
        branchless = mesh.devices.flat[0].platform == "gpu" if branchless is None else branchless
        self.branchless = branchless
        if cpu_kernels is None:
            cpu_kernels = not branchless and use_cpu_kernels(mesh, config)
        self.cpu_kernels = cpu_kernels
        specs = weight_specs(config, mesh)
        self.embed = nnx.Param(weights.dense("embed", specs["embed"]))
        self.layers = nnx.List([Block(config, weights, i, specs, mesh, branchless, cpu_kernels)
                                for i in range(config.num_layers)])
        self.final_norm = RMSNorm(weights.dense("final_norm", specs["final_norm"]), config.rms_norm_eps)
        # the LM head: [D, V] (out-major for our kernels), or the embedding [V, D] it is tied to
        lm_head_spec = swap_last(specs["embed"])
        self.tied_lm_head = CpuKernels(mesh, lm_head_spec) if config.tie_word_embeddings and cpu_kernels else None
        self.lm_head = None if config.tie_word_embeddings else linear_layer(
            weights, "lm_head", lm_head_spec, config, mesh, branchless, cpu_kernels)

    def forward(self, tokens: jax.Array, cache: KVCache, num_new: jax.Array | int,
                last_only: bool = False) -> tuple[jax.Array, KVCache]:
        """Feed tokens [B, T] into the cache at slots end .. end+T-1.

        Only the first `num_new` of the T tokens are real (the rest pad a length bucket; their slots are
        overwritten later and never seen by a real query). Returns float32 logits [B, T, V], or
        [B, V] for token num_new-1 when `last_only`, and the cache with end advanced by num_new.
        """
        c = self.config
        B, T = tokens.shape
        q_slots = cache.end + jnp.arange(T, dtype=jnp.int32)
        positions = q_slots[None, :] - cache.start[:, None]  # [B, T]
        live = jnp.arange(T) < num_new
        cos, sin = rotary(positions, c.head_dim, c.rope_theta)
        x = jnp.take(self.embed[...], tokens, axis=0)
        ks, vs = [], []
        for layer, k_cache, v_cache in zip(self.layers, cache.k, cache.v):
            x, k_cache, v_cache = layer(x, cos, sin, k_cache, v_cache, q_slots, cache.start, cache.block, live)
            ks.append(k_cache)
            vs.append(v_cache)
        if last_only:
            x = jax.lax.dynamic_index_in_dim(x, num_new - 1, axis=1, keepdims=False)  # [B, D]
        with jax.named_scope("lm_head"):
            logits = self._lm_head(self.final_norm(x))
        return logits, cache.replace(k=tuple(ks), v=tuple(vs), end=cache.end + num_new)

    def _lm_head(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> float32 logits [..., V]."""
        if self.lm_head is not None:
            return self.lm_head.float32(x)
        if self.tied_lm_head is not None:  # the embedding is [V, D]: out-major already
            return self.tied_lm_head.matmul(x, self.embed[...], (), None, 0)
        # contract with the embedding's D without transposing it (a copy)
        return jnp.einsum("...d,vd->...v", x, self.embed[...], preferred_element_type=jnp.float32)

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits float32 [B, T, V] for tokens int32 [B, T], no cache kept. Rows may be left-padded
        (attention_mask [B, T]: 0 for padding, then 1s). Compiled once per shape."""
        tokens = jnp.asarray(tokens, jnp.int32)
        mask = jnp.ones_like(tokens) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        model_def, params = ModelDef.split(self)
        return _logits_without_cache(model_def, params, tokens, mask)


class ModelDef:
    """The static half of a split model: programs are compiled once per model shape and shared by
    every Generator of that shape (a reloaded model, a second engine in tests). Hashing a GraphDef
    walks the whole module graph (~30 ms), and jit hashes static arguments on every call: the hash
    is computed once."""

    def __init__(self, graphdef: nnx.GraphDef, params_tree: jax.tree_util.PyTreeDef):
        self.graphdef, self.params_tree = graphdef, params_tree
        self._hash = hash((graphdef, params_tree))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, ModelDef) and self._hash == other._hash
                                 and (self.graphdef, self.params_tree) == (other.graphdef, other.params_tree))

    @staticmethod
    def split(model: Mixtral) -> tuple[ModelDef, list[jax.Array]]:
        """The static half and the arrays. Flattening an NNX State on every call costs ~10 ms of Python
        per step: the arrays come as a plain list (which flattens in C++)."""
        graphdef, params = nnx.split(model)
        return ModelDef(graphdef, jax.tree.structure(params)), jax.tree.leaves(params)

    def merge(self, params: list[jax.Array]) -> Mixtral:
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.params_tree, params))


@functools.partial(jax.jit, static_argnames=("model_def",))
def _logits_without_cache(model_def: ModelDef, params: list[jax.Array], tokens: jax.Array,
                          attention_mask: jax.Array) -> jax.Array:
    m = model_def.merge(params)
    B, T = tokens.shape
    cache = KVCache.create(m.config, m.mesh, B, KVCache.capacity_for(T), start=T - attention_mask.sum(axis=1))
    logits, _ = m.forward(tokens, cache, T)
    return logits
