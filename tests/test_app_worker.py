"""The engine worker thread on a real tiny Mixtral (random weights, the real Mixtral tokenizer):
what it posts, in which order, batched how, and how it cancels and stops. (`tiny_ckpt`: the session
fixture of tiny_model.py, registered in conftest.py.)"""

from __future__ import annotations

import threading
import time

import pytest

import model
from chat_app.engine_factory import engine_factory
from chat_app.worker import (
    EngineFailed,
    EngineLoading,
    EngineReady,
    EngineWorker,
    ReplyDelta,
    ReplyDone,
    ReplyFailed,
    ReplyStarted,
    TokensCounted,
)
from model.engine_api import SamplingParams
from scripted_engine import ScriptedEngine, Turn

MESSAGES = [{"role": "user", "content": "Hello there"}]


class Posted(list):
    """What the worker posted, appended from its thread; `wait_for` blocks until a message matches."""

    def __init__(self):
        super().__init__()
        self.changed = threading.Condition()

    def __call__(self, message) -> None:
        with self.changed:
            self.append(message)
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float = 300.0):
        with self.changed:
            if not self.changed.wait_for(lambda: any(predicate(m) for m in self), timeout):
                raise AssertionError(f"the worker did not post it within {timeout} s; posted: {self!r}")
            return next(m for m in self if predicate(m))

    def of(self, kind, request_id=None) -> list:
        return [m for m in self if isinstance(m, kind) and getattr(m, "request_id", request_id) == request_id]


@pytest.mark.slow
def test_worker_serves_the_queue_in_order_batches_text_and_stops(tiny_ckpt):
    posted = Posted()
    worker = EngineWorker(tiny_ckpt, posted, engine_factory(mesh_shape=(1, 1), context_length=512))
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    # Queued before the thread even starts (as when the user sends while the model loads).
    cancelled = worker.generate("a", MESSAGES, greedy)
    worker.cancel(cancelled)
    answered = worker.generate("a", MESSAGES, greedy)
    worker.count_tokens("a", MESSAGES)
    worker.start()

    counted = posted.wait_for(lambda m: isinstance(m, TokensCounted))
    kinds = [type(m) for m in posted]
    assert set(kinds[: kinds.index(EngineReady)]) == {EngineLoading}, "progress first, then ready"
    ready = posted.of(EngineReady)[0]
    assert (ready.model_name, ready.context_limit, ready.device_summary) == (tiny_ckpt.name, 512, "1 x cpu, mesh 1x1")
    fractions = [m.fraction for m in posted.of(EngineLoading)]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0

    [skipped] = posted.of(ReplyDone, cancelled)
    assert (skipped.text, skipped.finish_reason, skipped.turn) == ("", "cancelled", None)
    assert posted.of(ReplyStarted, cancelled) == [] and posted.of(ReplyDelta, cancelled) == []

    [done] = posted.of(ReplyDone, answered)
    deltas = [m.text for m in posted.of(ReplyDelta, answered)]
    assert "".join(deltas) == done.text == done.turn.text
    assert done.finish_reason == "length" and done.turn.generated_tokens == 40
    assert len(deltas) < done.turn.generated_tokens, "text is posted in batches, not token by token"
    order = [m for m in posted if getattr(m, "request_id", None) == answered]
    assert isinstance(order[0], ReplyStarted) and order[-1] is done

    expected_tokens = len(model.encode_chat(model.load_tokenizer(tiny_ckpt), MESSAGES))
    assert (counted.conversation_id, counted.tokens) == ("a", expected_tokens)

    # Stopping mid-reply: the reply ends as cancelled within a token and the thread ends.
    long = worker.generate("b", MESSAGES, SamplingParams(temperature=0.0, max_new_tokens=100_000))
    posted.wait_for(lambda m: isinstance(m, ReplyDelta) and m.request_id == long)
    assert worker.stop(timeout=60)
    [stopped] = posted.of(ReplyDone, long)
    assert stopped.finish_reason == "cancelled" and stopped.text
    assert stopped.text == "".join(m.text for m in posted.of(ReplyDelta, long))


def test_worker_reports_a_checkpoint_that_cannot_load(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    posted = Posted()
    worker = EngineWorker(tmp_path, posted, engine_factory(mesh_shape=(1, 1)))
    request = worker.generate("a", MESSAGES, SamplingParams())
    worker.start()
    failed = posted.wait_for(lambda m: isinstance(m, ReplyFailed))
    [load_error] = posted.of(EngineFailed)
    assert str(tmp_path) in load_error.error
    assert failed.request_id == request and load_error.error in failed.error
    assert worker.stop(timeout=60)


def test_a_program_that_fails_to_compile_while_idle_does_not_stop_the_worker(tmp_path):
    """Idle preparation (Engine.prepare_next) that raises ends the preparing, not the worker."""
    engine = ScriptedEngine([Turn(deltas=["First."]), Turn(deltas=["Still ", "here."])],
                            prepare_error=MemoryError("out of memory"))
    posted = Posted()
    worker = EngineWorker(tmp_path, posted, engine.factory())
    worker.start()
    first = worker.generate("a", MESSAGES, SamplingParams())  # after it, the worker prepares while idle
    posted.wait_for(lambda m: isinstance(m, ReplyDone) and m.request_id == first, timeout=30)
    time.sleep(0.2)  # idle: prepare_next raises
    second = worker.generate("a", MESSAGES, SamplingParams())
    done = posted.wait_for(lambda m: isinstance(m, ReplyDone) and m.request_id == second, timeout=30)
    assert done.text == "Still here."
    assert worker.stop(timeout=10)
