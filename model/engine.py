"""The conversation engine: chat turns in, streamed text out, each conversation's KV cache kept alive.

Every turn gets the WHOLE conversation. The engine encodes it and compares the ids with the ids already
in that conversation's cache: the common prefix is reused and only the rest is prefilled. A new turn
therefore costs its own tokens (previous reply + EOS + the new user block); regenerate, edit or delete
roll the cache back to where the conversations part (the cache just forgets slots past that point), and
a reply whose sampled ids are not the canonical encoding of its text is re-fed from where they differ.

Caches have a fixed capacity (context limit + one prefill chunk). Conversations beyond the memory budget
lose their cache (least recently used first) and rebuild it from their tokens on their next turn.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import checkpoint, cpu_matmul, manifest, sharding
from .chat_format import encode_chat
from .config import DEFAULT_CONTEXT
from .detokenize import StreamDecoder
from .engine_api import Compiling, ContextTrimmed, Event, SamplingParams, TextDelta, TurnDone
from .errors import UserError
from .executables import ExecutableCache, model_key
from .generate import PREFILL_CHUNK, Generator, decode_program_name, tokens_per_call
from .kv_cache import KVCache
from .sampling import SamplingArrays, validate
from .tokenizer import TokenizerError, load_tokenizer

DEFAULT_CACHE_BUDGET = 2 << 30  # bytes of KV caches kept across conversations


class EngineError(UserError):
    """A turn that cannot run (its message alone overflows the context, bad settings); user-facing."""


@dataclasses.dataclass
class _Conversation:
    tokens: list[int]  # the ids whose keys/values fill cache slots [0, len(tokens))
    cache: KVCache | None


def with_seed(sampling: SamplingParams) -> SamplingParams:
    """`sampling` with a seed: its own, or a fresh random one."""
    if sampling.seed is not None:
        return sampling
    return dataclasses.replace(sampling, seed=secrets.randbits(63))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _context(config, context_length: int | None) -> tuple[int, int]:
    """(tokens a conversation may hold, capacity of its KV cache: one prefill chunk more)."""
    limit = min(context_length or DEFAULT_CONTEXT, config.max_position_embeddings)
    return limit, KVCache.capacity_for(limit + PREFILL_CHUNK)


def _executables(directory: str | Path, config, mesh, context_length: int | None) -> ExecutableCache:
    """The executable cache of this model (`config` as it will load) on this mesh, already loading (in the
    background, while the weights load) the prefill programs the last start's first turn ran, or without
    that record the decode step. With it, the decode step loads once the first turn's prefill is done
    (`_turn`): loading it beside the prefill took the prefill's cores (~0.2 s of a warm first token)."""
    if mesh.devices.flat[0].platform == "cpu":
        cpu_matmul.available()  # the programs that call the native kernels load only once they are registered
    executables = ExecutableCache(directory, model_key(config.to_json(), mesh), list(mesh.devices.flat))
    decode = decode_program_name(tokens_per_call(config, mesh.devices.flat[0].platform),
                                 capacity=_context(config, context_length)[1])
    executables.start_loading([p for p in executables.first_turn() if p != decode] or [decode])
    return executables


def _load(ckpt_dir: Path, mesh, dtype: str | None, executables: ExecutableCache | None,
          on_progress: Callable[[float, str], None]) -> Generator:
    """The model's weights and programs. A start on our CPU kernels keeps, beside its programs, how its
    model made each array (`CheckpointWeights.plan`); the next start makes them so and builds no model
    (Flax's import and the build were ~0.5 s of a warm start): only a program to trace builds it."""
    weights = checkpoint.open_weights(ckpt_dir, mesh, dtype=dtype, on_progress=on_progress)
    record = executables.weights_plan() if executables is not None and cpu_matmul.available() else None
    try:
        plan = [checkpoint.Read.from_json(read) for read in record] if isinstance(record, list) else None
    except (TypeError, KeyError, ValueError):  # damaged: made again below
        plan = None
    if plan is not None:
        params = [weights.make(read) for read in plan]
        return Generator.of_arrays(weights.config, mesh, True, params, lambda: checkpoint.build(weights), executables)
    model = checkpoint.build(weights)
    generator = Generator(model, executables)
    if executables is not None and model.cpu_kernels and (made := weights.plan(generator.params)) is not None:
        executables.remember_weights_plan([read.to_json() for read in made])
    return generator


class Engine:
    """Loads a checkpoint and runs chat turns on it. Use from one thread at a time.

    `executable_cache`: a folder where compiled programs are kept (executables.py), so that the next
    engine on the same model and devices, in any process, neither traces nor compiles them."""

    def __init__(self, ckpt_dir: str | Path, *, mesh_shape: tuple[int, int] | None = None,
                 context_length: int | None = None, cache_budget_bytes: int = DEFAULT_CACHE_BUDGET,
                 dtype: str | None = None, warm_up: bool = False, executable_cache: str | Path | None = None,
                 on_progress: Callable[[float, str], None] | None = None):
        report = on_progress or (lambda fraction, what: None)
        ckpt_dir = Path(ckpt_dir)
        mesh = sharding.make_mesh(mesh_shape)
        stored = manifest.read_config(ckpt_dir)
        stored = dataclasses.replace(stored, dtype=dtype or stored.dtype)  # as the load will make it
        self._check_memory(stored, mesh, context_length)
        executables = _executables(executable_cache, stored, mesh, context_length) if executable_cache else None
        self.context_limit, self.capacity = _context(stored, context_length)
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, ckpt_dir)  # while the weights load
            self.generator = _load(ckpt_dir, mesh, dtype, executables, lambda f, what: report(0.8 * f, what))
        self.config = self.generator.config
        # An empty cache made ahead for the next new conversation, while idle (`prepare_next`; not while
        # loading: beside the first programs' loading it slowed a warm start more than it saved)
        self._spare: KVCache | None = None
        try:
            self.tokenizer = tokenizer.result()
        except TokenizerError as e:
            raise manifest.CheckpointError(f"{e}; convert the model again") from None
        if problem := manifest.vocabulary_problem(self.config, self.tokenizer.vocab_size, ckpt_dir):
            raise manifest.CheckpointError(problem)
        self.model_name = ckpt_dir.name
        self.device_summary = "; ".join([sharding.describe(mesh), *sharding.replicated(self.config, mesh)])
        self.max_cached_conversations = max(1, cache_budget_bytes // KVCache.bytes_for(self.config, self.capacity))
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()  # least recently used first
        self._busy = threading.Lock()
        self._preparing: Iterator[str] | None = None  # programs being prepared in idle time (prepare_next)
        self._first_turn = True  # no turn has run yet (the executable cache keeps what the first one runs)
        if warm_up:
            report(0.8, "compiling")
            self.warm_up()
        report(1.0, "ready")

    @staticmethod
    def _check_memory(config, mesh, context_length: int | None) -> None:
        """Refuse, before loading, a mesh whose devices cannot hold their share."""
        cache = KVCache.bytes_for(config, _context(config, context_length)[1])
        if problem := sharding.memory_problem(config, mesh, cache):
            raise sharding.MeshError(problem)

    def warm_up(self) -> None:
        """Compile every program now (each prefill bucket, the decode step, the host-side helpers of a
        turn), so that no turn waits for the compiler."""
        self.generator.warm_up(self.capacity)
        for _ in self.generate("__warm_up__", [{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=2, seed=0)):
            pass
        self.forget("__warm_up__")

    def prepare_next(self) -> bool:
        """Compile (or load from the executable cache) the next program a turn may need (the 64-token
        prefill, the decode step, the other buckets: `Generator.warm_up_steps`), after making the next
        new conversation's cache where
        the cache budget has room for it; False once there is nothing left to do. The app calls it while
        idle, so later turns never wait."""
        made_cache = self._spare is None and len(self._holders()) < self.max_cached_conversations
        if made_cache:
            self._spare = self.generator.new_cache(self.capacity)
        if self._preparing is None:
            self._preparing = self.generator.warm_up_steps(self.capacity)
        return next(self._preparing, None) is not None or made_cache

    # --- public API ---------------------------------------------------------------------------
    def count_tokens(self, messages: list[dict]) -> int:
        """Tokens of a conversation as the model sees it (one ending with a reply counts its EOS)."""
        return len(self._encode(messages, add_generation_prompt=messages[-1]["role"] != "assistant"))

    def forget(self, conversation_id: str) -> None:
        conv = self._conversations.pop(conversation_id, None)
        if conv is not None and conv.cache is not None and self._spare is None:
            self._spare = conv.cache.rewind(0)  # its memory, for the next new conversation

    def cached_tokens(self, conversation_id: str) -> int:
        """How many tokens of this conversation are in its KV cache (0 if it has none)."""
        conv = self._conversations.get(conversation_id)
        return len(conv.tokens) if conv and conv.cache is not None else 0

    def generate(self, conversation_id: str, messages: list[dict], sampling: SamplingParams,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """Answer the last user message of `messages` (the whole conversation), streaming events:
        maybe one ContextTrimmed, maybe one Compiling, TextDeltas, then exactly one TurnDone."""
        prompt, dropped = self.plan_turn(messages, sampling)
        if dropped:
            yield ContextTrimmed(dropped)
        yield from self.reply(conversation_id, prompt, sampling, should_stop)

    def plan_turn(self, messages: list[dict], sampling: SamplingParams) -> tuple[list[int], int]:
        """The prompt ids a turn feeds (the conversation, its oldest turns dropped if it does not fit
        with room for the reply) and how many messages were dropped; EngineError for bad settings."""
        try:
            validate(sampling)
        except ValueError as e:
            raise EngineError(str(e)) from None
        return self._fit(messages, reserve=min(sampling.max_new_tokens, self.context_limit // 4))

    def reply(self, conversation_id: str, prompt: list[int], sampling: SamplingParams,
              should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """The reply after `prompt` (ids from `plan_turn`): maybe one Compiling, TextDeltas, then exactly
        one TurnDone. `sampling.seed` None draws a fresh seed."""
        if not self._busy.acquire(blocking=False):
            raise EngineError("the engine is already generating a reply")
        try:
            yield from self._turn(conversation_id, prompt, with_seed(sampling), should_stop)
        finally:
            self._busy.release()

    # --- internals ------------------------------------------------------------------------------
    def _encode(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        try:
            return encode_chat(self.tokenizer, messages, self.tokenizer.chat_format, add_generation_prompt)
        except ValueError as e:
            raise EngineError(str(e)) from None

    def _fit(self, messages: list[dict], reserve: int) -> tuple[list[int], int]:
        """The prompt ids, dropping the oldest turns (never system messages or the last message) until
        `reserve` tokens are left for the reply. Returns (ids, number of messages dropped)."""
        budget = self.context_limit - reserve
        system = [m for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        dropped = 0
        while True:
            prompt = self._encode(system + turns[dropped:])
            if len(prompt) <= budget:
                return prompt, dropped
            # drop up to and including the next assistant reply, so the rest still starts with a user turn
            nxt = next((i for i in range(dropped, len(turns) - 1) if turns[i]["role"] == "assistant"), None)
            if nxt is None:
                raise EngineError(f"the message is too long: the conversation needs {len(prompt)} tokens but "
                                  f"the context holds {self.context_limit} (with {reserve} kept for the reply); "
                                  "shorten it or raise --context-length")
            dropped = nxt + 1

    def _conversation(self, conversation_id: str) -> _Conversation:
        """This conversation's state with a cache, evicting the least recently used cache if needed."""
        conv = self._conversations.pop(conversation_id, None) or _Conversation([], None)
        self._conversations[conversation_id] = conv  # most recently used
        if conv.cache is None:
            holders = self._holders()
            if self._spare is not None:
                conv.cache, self._spare = self._spare, None
            elif len(holders) >= self.max_cached_conversations:
                victim = holders[0]
                conv.cache, victim.cache, victim.tokens = victim.cache, None, []  # reuse its memory
            else:
                conv.cache = self.generator.new_cache(self.capacity)
            conv.tokens = []
        return conv

    def _holders(self) -> list[_Conversation]:
        """The conversations that hold a cache, least recently used first."""
        return [c for c in self._conversations.values() if c.cache is not None]

    def _turn(self, conversation_id, prompt: list[int], sampling: SamplingParams, should_stop) -> Iterator[Event]:
        started = time.perf_counter()
        conv = self._conversation(conversation_id)
        reuse = min(common_prefix(conv.tokens, prompt), len(prompt) - 1)  # feed at least one token
        if self.generator.will_compile(len(prompt) - reuse, self.capacity):
            yield Compiling()
        if self._first_turn and self.generator.executables is not None:  # what the next start loads first
            self.generator.executables.remember_first_turn(self.generator.turn_programs(len(prompt) - reuse, self.capacity))
        self._first_turn = False
        cache, conv.cache, conv.tokens = conv.cache, None, []  # donated below: invalid if a step fails
        cache = cache.rewind(reuse)
        seed = self.generator.seed(sampling.seed)  # `reply` gave every turn one (with_seed)
        arrays = SamplingArrays.of(sampling)
        seen = self.generator.seen_mask(prompt)
        pending, cache = self.generator.prefill(cache, prompt[reuse:], seen, seed, arrays)
        fed = list(prompt)

        decoder = StreamDecoder(self.tokenizer)
        generated: list[int] = []
        first_at = last_at = None
        finish = "stop"
        # Each decode call feeds a token and samples the next `per_call`, feeding all but the last (the
        # next call feeds that one). The tokens are handled one at a time.
        per_call, step = self.generator.tokens_per_call, 1  # step: the sampling step of the next call's first token
        made: list[int] = []  # the tokens after `token` that the last call read made, not handled yet
        last = pending  # the last token made (device), which the next call feeds
        following = None  # the dispatched call that feeds `last` (its tokens, device), not read yet

        def dispatch() -> None:
            """Dispatch the call that feeds `last` and samples `per_call` more (async)."""
            nonlocal following, last, cache, seen, step
            following, last, cache, seen = self.generator.decode(cache, last, seen, seed, step, arrays)
            step += per_call

        def feed() -> None:
            """`token` into the cache: the call that made it fed it unless it was that call's last (or the
            prefill's): then dispatch the call that does, unless it is dispatched already."""
            if not made and following is None:
                dispatch()
            fed.append(token)

        def read() -> list[int]:
            """The tokens of the dispatched call (waits for it); the next one is dispatched at once unless the
            turn surely ends before their last: the device makes them while the host handles these."""
            nonlocal following
            tokens, following = [int(t) for t in np.asarray(following)[0]], None
            stops = any(t in self.tokenizer.eos_ids for t in tokens[:-1]) or len(tokens) > min(
                sampling.max_new_tokens - len(generated), self.context_limit - len(fed))
            if per_call > 1 and not stops:
                dispatch()
            return tokens

        token = int(np.asarray(pending)[0])  # (indexing the device array would compile a program)
        self.generator.load_soon(decode_program_name(per_call, cache))  # (a start's first turn: not loaded yet)
        try:
            while True:
                # Feed token n before handling it: the device makes the next ones while the host handles
                # token n. Except the prefill's token, shown before its call is dispatched: the decode program
                # may still be loading (a start deserializes it in the background) or compiling, and the
                # first token needs only the prefill's.
                if generated or token in self.tokenizer.eos_ids:
                    feed()
                if token in self.tokenizer.eos_ids:
                    break
                generated.append(token)
                last_at = time.perf_counter()
                first_at = first_at or last_at
                if text := decoder.push(token):
                    yield TextDelta(text)
                if len(generated) == 1:  # the prefill's token, shown: now feed it
                    feed()
                if len(generated) >= sampling.max_new_tokens:
                    finish = "length"
                    break
                if len(fed) >= self.context_limit:
                    finish = "context"
                    break
                if should_stop():
                    finish = "cancelled"
                    break
                made = made or read()
                token = made.pop(0)
        except GeneratorExit:  # the caller stopped listening: keep what was fed
            conv.cache, conv.tokens = cache.rewind(len(fed)), fed
            raise
        # the calls fed all of `fed`, and some may have fed tokens after it, which the next turn overwrites
        conv.cache, conv.tokens = cache.rewind(len(fed)), fed
        if text := decoder.flush():
            yield TextDelta(text)
        first_at = first_at or time.perf_counter()
        decode_s = (last_at or first_at) - first_at
        yield TurnDone(
            text=decoder.text, finish_reason=finish, prompt_tokens=len(prompt), prefilled_tokens=len(prompt) - reuse,
            generated_tokens=len(generated), time_to_first_token_s=first_at - started,
            tokens_per_s=(len(generated) - 1) / decode_s if decode_s > 0 else 0.0,
            context_used=len(fed), context_limit=self.context_limit,
        )
