"""Choosing the next token on device: greedy, temperature, top-k, top-p, repetition penalty, seeded.

The settings travel as device scalars (`SamplingArrays`), so changing them never recompiles. Sorting the
whole vocabulary costs ~9 ms per token on a 2-core CPU, so the stochastic path first takes the
`CANDIDATES` most likely tokens (~0.1 ms) and applies top-k / top-p / the draw among them: exact for
top_k <= CANDIDATES, and otherwise it leaves out only the far tail (the tokens past the 256th).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from . import cpu_matmul
from .engine_api import SamplingParams

CANDIDATES = 256


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["temperature", "top_k", "top_p", "repetition_penalty"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    temperature: jax.Array  # float32 []; 0 = greedy
    top_k: jax.Array  # int32 []; 0 = no cut
    top_p: jax.Array  # float32 []
    repetition_penalty: jax.Array  # float32 []; 1 = off

    @staticmethod
    def of(p: SamplingParams) -> SamplingArrays:
        """Copied from the host (no program to compile)."""
        return SamplingArrays(*jax.device_put((np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p),
                                               np.float32(p.repetition_penalty))))


def validate(p: SamplingParams) -> None:
    """Raise ValueError with a clear message for settings that make no sense."""
    if not p.temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {p.temperature}")
    if not 0 < p.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {p.top_k}")
    if not p.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    if p.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF semantics: a seen token's logit is divided by the penalty if positive, multiplied if negative."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalized, logits)


def first_largest(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last dim (the first of equal largest values) in two plain reductions, which
    XLA:CPU vectorizes: its argmax, a reduction of (value, index) pairs, took 135 us over 32000 logits.
    -> int32 [...]."""
    V = logits.shape[-1]
    largest = logits.max(axis=-1, keepdims=True)
    first = jnp.min(jnp.where(logits == largest, jnp.arange(V, dtype=jnp.int32), V), axis=-1)
    return jnp.minimum(first, V - 1)  # (NaN logits: no value equals the largest)


def native_greedy(logits: jax.Array, seen: jax.Array, penalty: jax.Array, mesh: Mesh) -> jax.Array:
    """`first_largest(penalize_repeats(logits, seen, penalty))` in one call of our CPU kernel
    (cpu_kernels/greedy.cc: ~3 us a token against XLA:CPU's reductions' ~55), on every device of `mesh` with
    the whole rows. -> int32 [B]."""
    if not cpu_matmul.available():
        raise RuntimeError(cpu_matmul.unavailable_reason())

    def local(logits, seen, penalty):
        return jax.ffi.ffi_call(cpu_matmul.GREEDY_TARGET, jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32))(
            logits.astype(jnp.float32), seen.astype(jnp.bool_), penalty.astype(jnp.float32))

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P()), out_specs=P(), check_vma=False)(
        logits, seen, penalty)


def sample(logits: jax.Array, seen: jax.Array, key: jax.Array, s: SamplingArrays, branchless: bool,
           kernel_mesh: Mesh | None = None) -> jax.Array:
    """logits float32 [B, V], seen bool [B, V] (tokens of the conversation so far) -> token ids int32 [B].
    `branchless` (on a GPU, see mixtral.Mixtral) computes the greedy and the stochastic choice, then
    selects: a cond on a GPU waits for the host, which then cannot run ahead of the device. On a CPU a
    cond runs only the one asked for (the stochastic path's top-k of 32000 logits: ~0.15 ms a token).
    `kernel_mesh` (the mesh of a model on our CPU kernels) takes the greedy choice through them."""
    def greedy(key):
        if kernel_mesh is not None:
            return native_greedy(logits, seen, s.repetition_penalty, kernel_mesh)
        return first_largest(penalize_repeats(logits, seen, s.repetition_penalty))

    def stochastic(key):
        penalized = penalize_repeats(logits, seen, s.repetition_penalty)
        values, ids = jax.lax.top_k(penalized, min(CANDIDATES, logits.shape[-1]))  # [B, C], descending
        values = values / jnp.maximum(s.temperature, 1e-6)  # (temperature 0 takes the greedy token below)
        rank = jnp.arange(values.shape[-1])
        values = jnp.where((s.top_k > 0) & (rank >= s.top_k), -jnp.inf, values)
        probs = jax.nn.softmax(values, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # keep a token while the mass before it < top_p
        values = jnp.where(mass_before < s.top_p, values, -jnp.inf)
        choice = jax.random.categorical(key, values, axis=-1)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    if branchless:
        return jnp.where(s.temperature > 0, stochastic(key), greedy(key))
    return jax.lax.cond(s.temperature > 0, stochastic, greedy, key)
