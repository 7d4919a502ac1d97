"""What the engine streams to its callers (the app's worker thread, headless mode, benchmarks).

`Engine.generate(conversation_id, messages, sampling, should_stop)` yields these events in order:
zero or one `ContextTrimmed`, zero or one `Compiling`, then `TextDelta`s, then exactly one `TurnDone`.
`ChatEngine` is what its callers use of an engine: `model.engine.Engine`, or a scripted one in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How the next tokens are chosen. temperature 0 means greedy (deterministic)."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1.0: off; HF semantics (divide positive logits, multiply negative)
    max_new_tokens: int = 1024
    seed: int | None = None  # None: a fresh random seed per turn


@dataclass(frozen=True)
class TextDelta:
    """New reply text, safe to append (never splits a multi-byte character)."""

    text: str


@dataclass(frozen=True)
class ContextTrimmed:
    """The conversation no longer fit: its oldest turns (not the system prompt) were left out."""

    dropped_messages: int


@dataclass(frozen=True)
class Compiling:
    """This turn first compiles a program for the model (once per prompt-length bucket and per model
    shape; seconds to a minute), so its first token comes late."""


FinishReason = Literal["stop", "length", "cancelled", "context"]


@dataclass(frozen=True)
class TurnDone:
    """The end of a turn, with the whole reply text and its timings."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int  # tokens of the whole conversation fed to the model for this turn
    prefilled_tokens: int  # of those, how many were computed now (the rest came from the KV cache)
    generated_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float  # decode speed, generated tokens after the first / their time
    context_used: int  # tokens in the KV cache after the turn
    context_limit: int


Event = TextDelta | ContextTrimmed | Compiling | TurnDone


class ChatEngine(Protocol):
    """An engine as the app and headless mode use it (see `model.engine.Engine` for the details)."""

    model_name: str
    context_limit: int  # tokens of conversation a turn can see
    device_summary: str  # e.g. "1 x cpu, mesh 1x1"

    def generate(self, conversation_id: str, messages: list[dict], sampling: SamplingParams,
                 should_stop: Callable[[], bool] = ...) -> Iterator[Event]:
        """The reply to the last user message of `messages`, as events (above); `should_stop` is
        polled once per token and ends the turn with finish reason "cancelled"."""
        ...

    def count_tokens(self, messages: list[dict]) -> int: ...

    def forget(self, conversation_id: str) -> None: ...

    def prepare_next(self) -> bool:
        """Get the next thing a later turn may need ready (a new conversation's cache, a program: compile
        or load it); False once nothing is left."""
        ...
