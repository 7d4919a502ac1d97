"""The compiled programs of a loaded model: prefill in length buckets and one decode step.

The model is split once (`nnx.split`) and plain `jax.jit` functions take its parameters, the KV cache
(donated: updated in place) and the sampling settings as device values. Programs: one prefill per bucket
in `PREFILL_BUCKETS`, one decode program (`tokens_per_call` steps a call); a conversation that grows never
compiles anything new.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import MixtralConfig
from .engine_api import SamplingParams
from .executables import ExecutableCache, layout_digest
from .kv_cache import KVCache
from .sampling import SamplingArrays, sample

if TYPE_CHECKING:  # (imports flax: a start whose programs are all cached never does; see engine.py)
    from .mixtral import Mixtral, ModelDef

PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512)
PREFILL_CHUNK = PREFILL_BUCKETS[-1]  # longer inputs are fed in chunks of this many tokens
READY_CHUNK_MIN = 64  # chunks of a program already compiled, rather than compile a bigger one (chunk_buckets)
DECODE_RUN = 4  # tokens a decode call samples, for a model whose steps are short (tokens_per_call)
DECODE_RUN_BYTES = 1 << 30  # ... that reads fewer bytes than this a token


def bucket_for(n: int) -> int:
    return next(b for b in PREFILL_BUCKETS if b >= n)


def chunk_buckets(n: int, ready: Collection[int] = ()) -> list[int]:
    """The buckets a prefill of n tokens runs, one per chunk: chunks of PREFILL_CHUNK tokens, the rest
    in its bucket. Unless some of those programs are not `ready` (compiled, or in the executable cache)
    while a bucket of READY_CHUNK_MIN tokens or more is: then chunks of the largest ready bucket and the
    rest in the smallest ready one that holds it, so that a conversation resumed after a restart
    prefills its history through the programs its last turns used, compiling nothing."""
    full = [bucket_for(min(PREFILL_CHUNK, n - first)) for first in range(0, n, PREFILL_CHUNK)]
    if set(full) <= set(ready) or max(ready, default=0) < READY_CHUNK_MIN:
        return full
    chunk = max(ready)
    chunks, rest = divmod(n, chunk)
    return [chunk] * chunks + ([min(b for b in ready if b >= rest)] if rest else [])


# The programs that have run through jit (not the executable cache), by (model shape, program name): jit
# compiles each once.
_compiled: set[tuple[ModelDef, str]] = set()


def program_name(program: str, cache: KVCache | None = None, *, capacity: int | None = None, batch: int = 1) -> str:
    """A program and the shapes it was compiled for: 'decode, cache 4608 x 1' (the executable cache's
    name for it)."""
    if cache is not None:
        capacity, batch = cache.capacity, cache.batch
    return f"{program}, cache {capacity} x {batch}"


def seed_data(seed: int) -> np.ndarray:
    """uint32 [2]: the raw data of the random key of `seed` (< 2**64), made on the host (jax.random.key
    would compile a program); the programs fold each step's number into it."""
    return np.array([seed >> 32 & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def _step_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(seed), step)


def _sample(m: Mixtral, logits, seen, key, sampling: SamplingArrays) -> jax.Array:
    return sample(logits, seen, key, sampling, m.branchless, m.mesh if m.cpu_kernels else None)


def _prefill_step(model_def: ModelDef, params, cache: KVCache, tokens, num_new, seen, seed,
                  sampling: SamplingArrays):
    m = model_def.merge(params)
    logits, cache = m.forward(tokens, cache, num_new, last_only=True)
    return _sample(m, logits, seen, _step_key(seed, 0), sampling), cache


def _decode_step(model_def: ModelDef, params, cache: KVCache, token, seen, seed, step,
                 sampling: SamplingArrays):
    m = model_def.merge(params)
    logits, cache = m.forward(token[:, None], cache, 1, last_only=True)
    next_token = _sample(m, logits, seen, _step_key(seed, step), sampling)
    seen = seen.at[jnp.arange(seen.shape[0]), next_token].set(True)
    return next_token, cache, seen


def _decode_steps(model_def: ModelDef, params, cache: KVCache, token, seen, seed, step, sampling: SamplingArrays,
                tokens: int):
    """`tokens` decode steps: feed token [B], sample the next one (step `step` of the seed's stream), feed
    it, ... -> (the sampled tokens int32 [B, tokens], the last of them [B], cache, seen)."""
    if tokens == 1:
        last, cache, seen = _decode_step(model_def, params, cache, token, seen, seed, step, sampling)
        return last[:, None], last, cache, seen

    # The weights go round the loop through an optimization barrier, so that XLA moves no work on them out
    # of it: it gathers a 16-bit embedding in float32 on XLA:CPU, and the conversion of the whole table,
    # moved out of the loop, ran once a call (mini-mixtral's bfloat16 decode 0.62x; in the loop it is one
    # row's, as in a single step). They are read in place all the same (no copies).
    def one(i, carry):
        made, token, cache, seen, params = carry
        params = jax.lax.optimization_barrier(params)
        token, cache, seen = _decode_step(model_def, params, cache, token, seen, seed, step + i, sampling)
        return made.at[:, i].set(token), token, cache, seen, params

    made = jnp.zeros((token.shape[0], tokens), jnp.int32)
    made, token, cache, seen, _ = jax.lax.fori_loop(0, tokens, one, (made, token, cache, seen, params))
    return made, token, cache, seen


@functools.cache
def _decode_steps_of(tokens: int):
    """_decode_steps of `tokens` steps, one function per count (a jit's cache is its function's)."""
    return functools.partial(_decode_steps, tokens=tokens)


def tokens_per_call(config: MixtralConfig, platform: str) -> int:
    """Tokens a decode call samples: DECODE_RUN on a CPU for a model that reads less than DECODE_RUN_BYTES a
    token (a step of a few milliseconds, of which handing the program its ~250-900 arrays and the host's
    part of each token were a tenth: against one token a call, in one process, mini-mixtral's int4 decode
    8-13% faster, its int8 7-11%, the int4 demo 10-11%, float32 and bfloat16, whose steps are longer, level
    to 4%), else 1: a large model's steps are long, and each token is shown as soon as it is made."""
    return DECODE_RUN if platform == "cpu" and config.decode_bytes(0) < DECODE_RUN_BYTES else 1


def decode_program_name(tokens: int, cache: KVCache | None = None, *, capacity: int | None = None) -> str:
    """The decode program of `tokens` tokens a call, as `program_name` names it: 'decode 4, cache 4608 x 1'
    ('decode' alone for one token)."""
    return program_name("decode" if tokens == 1 else f"decode {tokens}", cache, capacity=capacity)


# XLA:CPU's YNNPACK dot fusions run XLA's float32 matmuls fast, but a program sets each of them up on its
# first run (~0.2 s of the int4 demo's first turn, for the attention's dots alone). Where our kernels
# multiply by every weight (any model on a CPU with them) they bring no speed (bench: prefill and decode as
# fast or faster without): those models' programs are compiled without them.
NO_YNN_FUSIONS = (("xla_cpu_experimental_ynn_fusion_type", ""),)


@functools.cache
def _program(step, donated: tuple[str, ...], xla_options: tuple[tuple[str, str], ...]):
    """`step` jit-compiled with these XLA options (one jit per step and options: its own cache of
    programs, by model shape)."""
    return jax.jit(step, static_argnames=("model_def",), donate_argnames=donated,
                   compiler_options=dict(xla_options) or None)


class Generator:
    """Runs one model: `prefill` feeds tokens and samples the next one, `decode` feeds one token per row.

    With `executables` (an ExecutableCache) each program is loaded from disk when it was compiled
    before, by any process, for this same model and devices: no tracing, no compiling."""

    def __init__(self, model: Mixtral, executables: ExecutableCache | None = None):
        from .mixtral import ModelDef  # (already imported with the model)

        model_def, params = ModelDef.split(model)
        self._start(model.config, model.mesh, model.cpu_kernels, params, executables)
        self._model_def = model_def

    @classmethod
    def of_arrays(cls, config: MixtralConfig, mesh: Mesh, cpu_kernels: bool, params: list[jax.Array],
                  build: Callable[[], Mixtral], executables: ExecutableCache) -> Generator:
        """A generator on `params`, the arrays of the model `build()` makes (in `ModelDef.split`'s order),
        without building it: the model is built the first time a program must be traced (never, on a
        start whose programs are all in the executable cache)."""
        generator = cls.__new__(cls)
        generator._start(config, mesh, cpu_kernels, params, executables)
        generator._model_def, generator._build = None, build
        return generator

    def _start(self, config: MixtralConfig, mesh: Mesh, cpu_kernels: bool, params: list[jax.Array],
               executables: ExecutableCache | None) -> None:
        self.config, self.mesh, self.params = config, mesh, params
        self._xla_options = NO_YNN_FUSIONS if cpu_kernels else ()
        self.prefill_program = _program(_prefill_step, ("cache",), self._xla_options)
        self.set_tokens_per_call(tokens_per_call(config, mesh.devices.flat[0].platform))
        self._replicated = NamedSharding(mesh, P())
        # jax refuses sub-byte arrays (int4 weights left to XLA's matmuls) as arguments of a program
        # compiled through `lower().compile()` ("layouts that disagree"): such a model compiles as usual
        if any(a.dtype in (jnp.int4, jnp.uint4) for a in params):
            executables = None
        self.executables = executables
        self._layout = layout_digest(params) if executables else ""
        self._loaded: dict[str, jax.stages.Compiled] = {}  # programs from the executable cache, by name

    def set_tokens_per_call(self, tokens: int) -> None:
        """Sample `tokens` tokens a decode call from now on (`tokens_per_call` chooses; benchmarks compare)."""
        self.tokens_per_call = tokens
        self.decode_program = _program(_decode_steps_of(tokens), ("cache", "seen"), self._xla_options)

    @property
    def model_def(self) -> ModelDef:
        """The model's static half (built now if the generator was made `of_arrays`)."""
        if self._model_def is None:
            from .mixtral import ModelDef

            self._model_def, params = ModelDef.split(self._build())
            if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
                raise RuntimeError("the model built does not hold the arrays made for it")  # (a bug)
        return self._model_def

    def _run(self, step, program: str, *args):
        """step(model_def, params, *args), the compiled program named `program` (which names everything
        about the args' shapes); through the executable cache when there is one."""
        if self.executables is None:
            result = step(self.model_def, self.params, *args)
            _compiled.add((self.model_def, program))  # (jit's own cache holds it)
            return result
        compiled = self._loaded.get(program)
        if compiled is None:
            compiled = self._loaded[program] = self.executables.get(
                program, self._layout, lambda: step.lower(self.model_def, self.params, *args))
        return compiled(self.params, *args)

    def load_soon(self, program: str) -> None:
        """Start deserializing this program in the background, if it is in the executable cache and not
        loaded yet."""
        if self.executables is not None and program not in self._loaded:
            self.executables.start_loading([program])

    # --- host side --------------------------------------------------------------------------------
    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        return KVCache.allocate(self.config, self.mesh, batch, capacity)

    def seed(self, seed: int) -> jax.Array:
        """The random stream of a turn: uint32 [2] on the devices (`seed_data`)."""
        return jax.device_put(seed_data(seed), self._replicated)

    def seen_mask(self, token_ids: Sequence[int]) -> jax.Array:
        """bool [1, V]: the tokens the repetition penalty applies to."""
        seen = np.zeros((1, self.config.vocab_size), bool)
        seen[0, np.asarray(token_ids, np.int64)] = True
        return jax.device_put(seen, self._replicated)

    def prefill(self, cache: KVCache, token_ids: Sequence[int], seen: jax.Array, seed: jax.Array,
                sampling: SamplingArrays) -> tuple[jax.Array, KVCache]:
        """Feed token_ids (one row) at the cache's end, in chunks padded to a bucket; returns the next
        token (device int32 [1], sampled with step 0 of `seed`'s stream) and the cache. The caller keeps
        end + bucket <= capacity."""
        assert len(token_ids) > 0
        next_token, first = None, 0
        for bucket in chunk_buckets(len(token_ids), self.ready_buckets(cache.capacity)):
            chunk = token_ids[first:first + bucket]
            first += len(chunk)
            next_token, cache = self._prefill_chunk(cache, chunk, bucket, seen, seed, sampling)
        return next_token, cache

    def _prefill_chunk(self, cache: KVCache, chunk: Sequence[int], bucket: int, seen: jax.Array, seed: jax.Array,
                       sampling: SamplingArrays) -> tuple[jax.Array, KVCache]:
        padded = np.zeros((1, bucket), np.int32)
        padded[0, :len(chunk)] = chunk
        program = program_name(f"prefill {bucket}", cache)
        return self._run(self.prefill_program, program, cache, jax.device_put(padded, self._replicated),
                         np.int32(len(chunk)), seen, seed, sampling)

    def decode(self, cache: KVCache, token: jax.Array, seen: jax.Array, seed: jax.Array, step: int,
               sampling: SamplingArrays) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
        """Feed token [1] and sample the next `tokens_per_call` tokens, feeding each but the last, with steps
        `step` (> 0), `step + 1`, ... of `seed`'s stream. -> (those tokens [1, tokens_per_call], the last
        of them [1] (what the next call feeds), cache, seen)."""
        program = decode_program_name(self.tokens_per_call, cache)
        return self._run(self.decode_program, program, cache, token, seen, seed, np.int32(step), sampling)

    def greedy(self, token_ids: Sequence[int], n: int, capacity: int = 1024) -> list[int]:
        """The n greedy tokens after token_ids, in a fresh cache (for checks and benchmarks: the engine
        streams its turns instead)."""
        cache = self.new_cache(capacity)
        greedy = SamplingArrays.of(SamplingParams(temperature=0))
        seen, seed = self.seen_mask([]), self.seed(0)
        token, cache = self.prefill(cache, token_ids, seen, seed, greedy)
        out = [int(np.asarray(token)[0])]
        while len(out) < n:
            made, token, cache, seen = self.decode(cache, token, seen, seed, len(out), greedy)
            out.extend(int(t) for t in np.asarray(made)[0])
        return out[:n]

    def _ready(self, program: str) -> bool:
        """Whether the program runs without being compiled first."""
        if self.executables is not None:
            return program in self._loaded or self.executables.has(program)
        return (self.model_def, program) in _compiled

    def ready_buckets(self, capacity: int) -> set[int]:
        """The prefill buckets whose programs for a one-row cache of `capacity` are ready."""
        return {b for b in PREFILL_BUCKETS if self._ready(program_name(f"prefill {b}", capacity=capacity))}

    def turn_programs(self, n_tokens: int, capacity: int) -> list[str]:
        """The programs a turn prefilling n_tokens (then decoding) in one row runs, in that order."""
        prefills = [program_name(f"prefill {b}", capacity=capacity)
                    for b in chunk_buckets(n_tokens, self.ready_buckets(capacity))]
        return [*dict.fromkeys(prefills), decode_program_name(self.tokens_per_call, capacity=capacity)]

    def will_compile(self, n_tokens: int, capacity: int) -> bool:
        """Whether a turn prefilling n_tokens (then decoding) in one row compiles a program first."""
        return not all(self._ready(p) for p in self.turn_programs(n_tokens, capacity))

    def warm_up(self, capacity: int) -> None:
        """Compile (or load) every program now, so no turn waits for the compiler."""
        for _ in self.warm_up_steps(capacity):
            pass

    def warm_up_steps(self, capacity: int) -> Iterator[str]:
        """Compile (or load) the programs one at a time, yielding after each: the prefill bucket of
        READY_CHUNK_MIN tokens first (with it, a prompt of any length is prefilled without compiling:
        `chunk_buckets`; and a turn's first token needs its prefill only), then the decode step (every
        turn needs it, and it takes the longest to compile), then the other buckets smallest first. A
        caller can serve a turn between two steps."""
        sampling = SamplingArrays.of(SamplingParams())
        seed, token = self.seed(0), jax.device_put(np.zeros(1, np.int32), self._replicated)

        def prefill(bucket: int) -> str:
            self._prefill_chunk(self.new_cache(capacity), [0] * bucket, bucket, self.seen_mask([]), seed,
                                sampling)[0].block_until_ready()
            return f"prefill {bucket}"

        yield prefill(READY_CHUNK_MIN)
        self.decode(self.new_cache(capacity), token, self.seen_mask([]), seed, 1, sampling)[0].block_until_ready()
        yield "decode"
        for bucket in PREFILL_BUCKETS:
            if bucket != READY_CHUNK_MIN:
                yield prefill(bucket)
