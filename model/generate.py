"""The compiled programs of a loaded model: prefill in length buckets and one decode step.

The model is split once (`nnx.split`) and plain `jax.jit` functions take its parameters, the KV cache
(donated: updated in place) and the sampling settings as device values. Programs: one prefill per bucket
in `PREFILL_BUCKETS`, one decode step; a conversation that grows never compiles anything new.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .engine_api import SamplingParams
from .executables import ExecutableCache, fingerprint
from .kv_cache import KVCache
from .mixtral import Mixtral, ModelDef
from .sampling import SamplingArrays, sample

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
PREFILL_CHUNK = PREFILL_BUCKETS[-1]  # longer inputs are fed in chunks of this many tokens


def bucket_for(n: int) -> int:
    return next(b for b in PREFILL_BUCKETS if b >= n)


def chunk_buckets(n: int) -> list[int]:
    """The buckets a prefill of n tokens runs: full chunks, then the rest."""
    return [bucket_for(min(PREFILL_CHUNK, n - first)) for first in range(0, n, PREFILL_CHUNK)]


# The programs that have run, by (model shape, program name): jit compiles each once.
_compiled: set[tuple[ModelDef, str]] = set()


def _program_name(program: str, cache: KVCache | None = None, *, capacity: int | None = None, batch: int = 1) -> str:
    """A program and the shapes it was compiled for: 'decode, cache 4608 x 1'."""
    if cache is not None:
        capacity, batch = cache.capacity, cache.batch
    return f"{program}, cache {capacity} x {batch}"


@functools.partial(jax.jit, static_argnames=("model_def",), donate_argnames=("cache",))
def _prefill_step(model_def: ModelDef, params, cache: KVCache, tokens, num_new, seen, key,
                  sampling: SamplingArrays):
    logits, cache = model_def.merge(params).forward(tokens, cache, num_new, last_only=True)
    return sample(logits, seen, key, sampling), cache


@functools.partial(jax.jit, static_argnames=("model_def",), donate_argnames=("cache", "seen"))
def _decode_step(model_def: ModelDef, params, cache: KVCache, token, seen, key, sampling: SamplingArrays):
    logits, cache = model_def.merge(params).forward(token[:, None], cache, 1, last_only=True)
    next_token = sample(logits, seen, key, sampling)
    seen = seen.at[jnp.arange(seen.shape[0]), next_token].set(True)
    return next_token, cache, seen


class Generator:
    """Runs one model: `prefill` feeds tokens and samples the next one, `decode` feeds one token per row.

    With `executables` (an ExecutableCache) each program is loaded from disk when it was compiled
    before, by any process, for this same model and devices: no tracing, no compiling."""

    def __init__(self, model: Mixtral, executables: ExecutableCache | None = None):
        self.config, self.mesh = model.config, model.mesh
        self.model_def, self.params = ModelDef.split(model)
        self._replicated = NamedSharding(self.mesh, P())
        # jax refuses sub-byte arrays (int4 weights left to XLA's matmuls) as arguments of a program
        # compiled through `lower().compile()` ("layouts that disagree"): such a model compiles as usual
        if any(a.dtype in (jnp.int4, jnp.uint4) for a in jax.tree.leaves(self.params)):
            executables = None
        self.executables = executables
        self._fingerprint = fingerprint(self.config.to_json(), self.params, self.mesh) if executables else ""
        self._loaded: dict[str, jax.stages.Compiled] = {}  # programs from the executable cache, by name

    def _run(self, step, program: str, *args):
        """step(model_def, params, *args), the compiled program named `program` (which names everything
        about the args' shapes); through the executable cache when there is one."""
        if self.executables is None:
            return step(self.model_def, self.params, *args)
        compiled = self._loaded.get(program)
        if compiled is None:
            compiled = self._loaded[program] = self.executables.load_or_compile(
                self._fingerprint, program, list(self.mesh.devices.flat),
                lambda: step.lower(self.model_def, self.params, *args))
        return compiled(self.params, *args)

    # --- host side --------------------------------------------------------------------------------
    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        with jax.set_mesh(self.mesh):
            return KVCache.create(self.config, self.mesh, batch, capacity)

    def seen_mask(self, token_ids: Sequence[int]) -> jax.Array:
        """bool [1, V]: the tokens the repetition penalty applies to."""
        seen = np.zeros((1, self.config.vocab_size), bool)
        seen[0, np.asarray(token_ids, np.int64)] = True
        return jax.device_put(seen, self._replicated)

    def prefill(self, cache: KVCache, token_ids: Sequence[int], seen: jax.Array, key: jax.Array,
                sampling: SamplingArrays) -> tuple[jax.Array, KVCache]:
        """Feed token_ids (one row) at the cache's end, in chunks padded to a bucket; returns the sampled
        next token (device int32 [1]) and the cache. The caller keeps end + bucket <= capacity."""
        assert len(token_ids) > 0
        next_token = None
        for first, bucket in zip(range(0, len(token_ids), PREFILL_CHUNK), chunk_buckets(len(token_ids))):
            chunk = token_ids[first:first + PREFILL_CHUNK]
            padded = np.zeros((1, bucket), np.int32)
            padded[0, :len(chunk)] = chunk
            tokens = jax.device_put(padded, self._replicated)
            program = _program_name(f"prefill {bucket}", cache)
            next_token, cache = self._run(_prefill_step, program, cache, tokens, jnp.int32(len(chunk)), seen, key,
                                          sampling)
            _compiled.add((self.model_def, program))
        return next_token, cache

    def decode(self, cache: KVCache, token: jax.Array, seen: jax.Array, key: jax.Array,
               sampling: SamplingArrays) -> tuple[jax.Array, KVCache, jax.Array]:
        program = _program_name("decode", cache)
        result = self._run(_decode_step, program, cache, token, seen, key, sampling)
        _compiled.add((self.model_def, program))
        return result

    def greedy(self, token_ids: Sequence[int], n: int, capacity: int = 1024) -> list[int]:
        """The n greedy tokens after token_ids, in a fresh cache (for checks and benchmarks: the engine
        streams its turns instead)."""
        cache = self.new_cache(capacity)
        greedy = SamplingArrays.of(SamplingParams(temperature=0))
        seen, key = self.seen_mask([]), jax.random.key(0)
        token, cache = self.prefill(cache, token_ids, seen, key, greedy)
        out = [int(token[0])]
        while len(out) < n:
            token, cache, seen = self.decode(cache, token, seen, key, greedy)
            out.append(int(token[0]))
        return out

    def will_compile(self, n_tokens: int, capacity: int) -> bool:
        """Whether a turn prefilling n_tokens (then decoding) in one row compiles a program first."""
        programs = {_program_name(f"prefill {b}", capacity=capacity) for b in chunk_buckets(n_tokens)}
        programs.add(_program_name("decode", capacity=capacity))
        if self.executables is not None:
            return any(p not in self._loaded and not self.executables.has(self._fingerprint, p) for p in programs)
        return any((self.model_def, p) not in _compiled for p in programs)

    def warm_up(self, capacity: int) -> None:
        """Compile (or load) every program now, so no turn waits for the compiler."""
        for _ in self.warm_up_steps(capacity):
            pass

    def warm_up_steps(self, capacity: int) -> Iterator[str]:
        """Compile (or load) the programs one at a time, yielding after each: the smallest prefill bucket
        and the decode step first (what a short first message needs), then the bigger buckets. A caller
        can serve a turn between two steps."""
        sampling = SamplingArrays.of(SamplingParams())
        key = jax.random.key(0)

        def prefill(bucket: int):
            return self.prefill(self.new_cache(capacity), [0] * bucket, self.seen_mask([]), key, sampling)

        first, *rest = PREFILL_BUCKETS
        token, cache = prefill(first)
        yield f"prefill {first}"
        self.decode(cache, token, self.seen_mask([]), key, sampling)[0].block_until_ready()
        del token, cache  # no cache kept alive between steps
        yield "decode"
        for bucket in rest:
            prefill(bucket)[0].block_until_ready()
            yield f"prefill {bucket}"
