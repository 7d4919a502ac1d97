"""A scripted engine for fast UI tests: no jax, no model, just what each turn is told to do.

It follows `model.engine_api.ChatEngine` and the real engine's rules: events in the order
ContextTrimmed?, Compiling?, TextDelta*, TurnDone; `should_stop` polled after each delta (the real
engine polls after each token) ends the turn as "cancelled" with the text so far; `max_new_tokens`
ends it as "length". The end-to-end tests on a real tiny model are in test_app_chat.py.

    engine = ScriptedEngine([Turn(deltas=("Hi", " there")), Turn(error=EngineError("too long"))])
    app = ChatApp(data_dir, Path("scripted"), open_engine=engine.factory())
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model.engine_api import Compiling, ContextTrimmed, Event, SamplingParams, TextDelta, TurnDone


@dataclass(frozen=True)
class Turn:
    """What one turn does."""

    deltas: Iterable[str] = ("Hello", " from", " the", " script.")  # may be endless: see `endless`
    delay_s: float = 0.0  # before each delta
    compiling: bool = False  # announce a compilation first
    gate: threading.Event | None = None  # the text waits until it is set (a test holds the turn where it looks)
    dropped_messages: int = 0  # > 0: the conversation "did not fit", its oldest messages were left out
    error: Exception | None = None  # raised after the deltas, instead of finishing
    finish_reason: str = "stop"  # when the deltas run out


def endless(word: str = "story ", delay_s: float = 0.005) -> Turn:
    """A reply that goes on until it is stopped (or reaches max_new_tokens)."""
    return Turn(deltas=itertools.repeat(word), delay_s=delay_s)


class ScriptedEngine:
    """Plays `turns` in order, then `then` for every later turn. Records what it was asked
    (`requests`: (conversation_id, messages) per turn; `forgotten`: conversation ids)."""

    def __init__(self, turns: Iterable[Turn] = (), *, then: Turn = Turn(), context_limit: int = 512,
                 device_summary: str = "1 x cpu, mesh 1x1", prepare_error: Exception | None = None):
        self._turns = deque(turns)
        self._prepare_error = prepare_error  # raised by prepare_next (a program that fails to compile)
        self._then = then
        self.model_name = "scripted"
        self.context_limit = context_limit
        self.device_summary = device_summary
        self.requests: list[tuple[str, list[dict]]] = []
        self.forgotten: list[str] = []
        self.opened = threading.Event()

    def factory(self, load_error: Exception | None = None) -> Callable[[Path, Callable[[float, str], None]], ScriptedEngine]:
        """An `open_engine` for ChatApp / EngineWorker: reports progress, then gives this engine (named
        after the checkpoint dir, as the real one is) or raises `load_error`."""

        def open_engine(ckpt_dir: Path, on_progress: Callable[[float, str], None]) -> ScriptedEngine:
            on_progress(0.5, "loading weights (scripted)")
            if load_error is not None:
                raise load_error
            self.model_name = Path(ckpt_dir).name
            on_progress(1.0, "ready")
            self.opened.set()
            return self

        return open_engine

    def count_tokens(self, messages: list[dict]) -> int:
        """A stand-in for the tokenizer: words, plus 4 per message for its markers."""
        return sum(len(message["content"].split()) + 4 for message in messages)

    def forget(self, conversation_id: str) -> None:
        self.forgotten.append(conversation_id)

    def prepare_next(self) -> bool:
        if self._prepare_error is not None:
            raise self._prepare_error
        return False  # no programs to get ready

    def generate(self, conversation_id: str, messages: list[dict], sampling: SamplingParams,
                 should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        self.requests.append((conversation_id, list(messages)))
        turn = self._turns.popleft() if self._turns else self._then
        started = time.perf_counter()
        if turn.dropped_messages:
            yield ContextTrimmed(turn.dropped_messages)
        if turn.compiling:
            yield Compiling()
        if turn.gate is not None and not turn.gate.wait(timeout=60):
            raise TimeoutError("the test never opened the scripted turn's gate")
        pieces: list[str] = []
        finish = None
        for delta in turn.deltas:
            time.sleep(turn.delay_s)
            pieces.append(delta)
            yield TextDelta(delta)
            finish = "length" if len(pieces) >= sampling.max_new_tokens else "cancelled" if should_stop() else None
            if finish:
                break
        if turn.error is not None:
            raise turn.error
        prompt_tokens = self.count_tokens(messages)
        elapsed = time.perf_counter() - started
        yield TurnDone(text="".join(pieces), finish_reason=finish or turn.finish_reason, prompt_tokens=prompt_tokens,
                       prefilled_tokens=prompt_tokens, generated_tokens=len(pieces), time_to_first_token_s=0.0,
                       tokens_per_s=(len(pieces) - 1) / elapsed if elapsed > 0 else 0.0,
                       context_used=prompt_tokens + len(pieces), context_limit=self.context_limit)
