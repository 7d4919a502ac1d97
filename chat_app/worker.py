"""The thread that owns the `Engine`, and the messages it posts to the UI.

Loading a checkpoint and compiling takes from seconds (the tiny test models) to minutes (Mixtral on a
CPU), and a turn streams for as long. So the engine lives on a thread of its own: the thread imports
jax and builds the engine (the UI is already on screen and usable meanwhile), then serves requests
from a queue one at a time. It never touches a widget: it only calls `post`, normally a Textual
`MessagePump.post_message`, which is safe from any thread and does not wait for the UI (unlike
`App.call_from_thread`, which blocks the caller until the UI ran the callback). Text is batched into
one `ReplyDelta` per `DELTA_BATCH_S`, so a fast model does not flood the UI's message queue.

The engine comes from an `EngineFactory` (chat_app.engine_factory) called on the thread: the real
`model.engine.Engine`, or in tests a scripted engine (tests/scripted_engine.py).

Nothing raised on the thread escapes it: a checkpoint that fails to load posts `EngineFailed` and
every later request is answered with `ReplyFailed`; an error during a turn posts `ReplyFailed`.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from textual.message import Message

from chat_app.engine_factory import EngineFactory
from chat_app.errors import UserError
from model.engine_api import (
    ChatEngine,
    Compiling,
    ContextTrimmed,
    FinishReason,
    SamplingParams,
    TextDelta,
    TurnDone,
)

DELTA_BATCH_S = 0.05
"""How long reply text is gathered before it is posted (20 UI updates a second at most)."""

# What the worker posts. (Dataclass messages work: the generated __init__ calls the
# `Message.__post_init__` that sets a message up.)


@dataclass
class EngineLoading(Message):
    """Progress of loading the checkpoint and compiling."""

    fraction: float
    what: str


@dataclass
class EngineReady(Message):
    """The engine is loaded; requests queued meanwhile are served from now on."""

    model_name: str
    context_limit: int
    device_summary: str


@dataclass
class EngineFailed(Message):
    """The engine could not be created; `error` is a message for the user."""

    error: str


@dataclass
class ReplyStarted(Message):
    """The engine started on a request (it may have waited in the queue while the model loaded)."""

    request_id: int


@dataclass
class ReplyDelta(Message):
    """More reply text: everything the engine produced since the previous `ReplyDelta`."""

    request_id: int
    text: str


@dataclass
class ReplyTrimmed(Message):
    """The conversation did not fit the context: its oldest `dropped_messages` were left out."""

    request_id: int
    dropped_messages: int


@dataclass
class ReplyCompiling(Message):
    """The reply first waits for the model's programs to compile (once per prompt size)."""

    request_id: int


@dataclass
class ReplyDone(Message):
    """The end of a reply. `turn` holds the engine's timings; None when the request was cancelled
    before the engine started on it."""

    request_id: int
    text: str
    finish_reason: FinishReason
    turn: TurnDone | None


@dataclass
class ReplyFailed(Message):
    """The reply could not be produced; `error` is a message for the user. Text already posted in
    `ReplyDelta`s stands."""

    request_id: int
    error: str


@dataclass
class TokensCounted(Message):
    """How many tokens a conversation takes (answer to `EngineWorker.count_tokens`)."""

    conversation_id: str
    tokens: int


def describe_error(error: Exception) -> str:
    """A message for the user: a `UserError`'s as it is, anything else (a bug) with its type for context."""
    return str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"


@dataclass
class _Generate:
    request_id: int
    conversation_id: str
    messages: list[dict]
    sampling: SamplingParams
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _CountTokens:
    conversation_id: str
    messages: list[dict]


@dataclass
class _Forget:
    conversation_id: str


_STOP = object()


class _Stopping(Exception):
    """Raised from the loading progress callback to abandon loading when the app quits."""


class EngineWorker:
    """Owns one engine (from `open_engine(ckpt_dir, progress)`) on a thread of its own and serves
    requests one at a time.

    `post` receives every message listed above, on the worker thread; it must be thread-safe and
    must not block (`MessagePump.post_message` is both).
    """

    def __init__(self, ckpt_dir: Path, post: Callable[[Message], object], open_engine: EngineFactory) -> None:
        self.ckpt_dir = ckpt_dir
        self._post = post
        self._open_engine = open_engine
        self._requests: queue.Queue = queue.Queue()
        self._pending: dict[int, _Generate] = {}  # request id -> request not finished yet
        self._pending_lock = threading.Lock()
        self._request_ids = itertools.count(1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def generate(self, conversation_id: str, messages: list[dict], sampling: SamplingParams) -> int:
        """Queues a reply to `messages` (the whole conversation, ending with the user turn to answer).
        Returns the request id that the reply's messages carry."""
        request = _Generate(next(self._request_ids), conversation_id, messages, sampling)
        with self._pending_lock:
            self._pending[request.request_id] = request
        self._requests.put(request)
        return request.request_id

    def cancel(self, request_id: int) -> None:
        """Stops a reply within one token (the text so far comes in its `ReplyDone`); a request still
        in the queue is answered at once. Unknown or finished ids are ignored."""
        with self._pending_lock:
            request = self._pending.get(request_id)
        if request is not None:
            request.cancelled.set()

    def count_tokens(self, conversation_id: str, messages: list[dict]) -> None:
        """Queues a token count; the answer comes as `TokensCounted`."""
        self._requests.put(_CountTokens(conversation_id, messages))

    def forget(self, conversation_id: str) -> None:
        """Lets the engine drop the conversation's KV cache (it was deleted)."""
        self._requests.put(_Forget(conversation_id))

    def stop(self, timeout: float) -> bool:
        """Cancels everything, ends the thread and waits up to `timeout` seconds for it.
        Returns whether the thread ended (a checkpoint still compiling may not; the thread is a
        daemon, so it does not keep the process alive)."""
        self._stopping.set()
        self._requests.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        engine = None
        load_error = None
        try:
            engine = self._open_engine(self.ckpt_dir, self._progress)
        except _Stopping:
            return
        except Exception as error:  # the app stays usable: the user sees the reason
            load_error = describe_error(error)
        if engine is None:
            self._post(EngineFailed(load_error))
        else:
            self._post(EngineReady(engine.model_name, engine.context_limit, engine.device_summary))
        preparing = engine is not None  # while idle, the engine gets the programs of later turns ready
        while True:
            try:
                request = self._requests.get(block=not preparing)
            except queue.Empty:
                try:
                    preparing = engine.prepare_next()
                except Exception:  # noqa: BLE001 (idle work: a turn that needs that program reports the error)
                    preparing = False
                continue
            if request is _STOP:
                break
            if isinstance(request, _Generate):
                self._serve(engine, load_error, request)
                preparing = engine is not None  # (a new conversation took the cache made ahead for it)
            elif engine is not None and isinstance(request, _CountTokens):
                self._count(engine, request)
            elif engine is not None and isinstance(request, _Forget):
                engine.forget(request.conversation_id)

    def _progress(self, fraction: float, what: str) -> None:
        if self._stopping.is_set():
            raise _Stopping
        self._post(EngineLoading(fraction, what))

    def _serve(self, engine: ChatEngine | None, load_error: str | None, request: _Generate) -> None:
        try:
            if engine is None:
                self._post(ReplyFailed(request.request_id, f"The model is not loaded: {load_error}"))
            elif request.cancelled.is_set() or self._stopping.is_set():
                self._post(ReplyDone(request.request_id, "", "cancelled", None))
            else:
                self._stream(engine, request)
        finally:
            with self._pending_lock:
                del self._pending[request.request_id]

    def _stream(self, engine: ChatEngine, request: _Generate) -> None:
        request_id = request.request_id
        self._post(ReplyStarted(request_id))
        unposted: list[str] = []
        posted_at = time.monotonic()

        def post_text() -> None:
            nonlocal posted_at
            if unposted:
                self._post(ReplyDelta(request_id, "".join(unposted)))
                unposted.clear()
            posted_at = time.monotonic()

        def should_stop() -> bool:
            return request.cancelled.is_set() or self._stopping.is_set()

        try:
            events = engine.generate(
                request.conversation_id, request.messages, request.sampling, should_stop
            )
            for event in events:
                if isinstance(event, TextDelta):
                    unposted.append(event.text)
                    if time.monotonic() - posted_at >= DELTA_BATCH_S:
                        post_text()
                elif isinstance(event, ContextTrimmed):
                    self._post(ReplyTrimmed(request_id, event.dropped_messages))
                elif isinstance(event, Compiling):
                    self._post(ReplyCompiling(request_id))
                elif isinstance(event, TurnDone):
                    post_text()
                    self._post(ReplyDone(request_id, event.text, event.finish_reason, event))
        except Exception as error:  # the app stays usable: the user sees the reason
            post_text()
            self._post(ReplyFailed(request_id, describe_error(error)))

    def _count(self, engine: ChatEngine, request: _CountTokens) -> None:
        try:
            tokens = engine.count_tokens(request.messages)
        except Exception:  # a count is only shown in the status bar; a failed one is just not shown
            return
        self._post(TokensCounted(request.conversation_id, tokens))
