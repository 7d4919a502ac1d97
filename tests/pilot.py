"""Helpers for Textual Pilot tests of the chat app."""

from __future__ import annotations

import time
from pathlib import Path

from chat_app import paths
from chat_app.store import Store


async def wait_until(pilot, condition, what: str, timeout: float = 300.0) -> None:
    """Lets the app run until `condition()` holds (engines and downloads work on their own threads)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def send(pilot, app, text: str) -> None:
    app.chat.prompt.load_text(text)
    await pilot.press("enter")


async def reply_done(pilot, app) -> None:
    """The reply ended and its box shows it ended (the screen forgets the reply before its box has
    written out the rest of its stream)."""
    def finished() -> bool:
        return app.chat.reply is None and not any(box.streaming for box in app.chat.chat_view.boxes)

    await wait_until(pilot, finished, "the reply to finish")


async def first_text(pilot, app) -> None:
    await wait_until(pilot, lambda: app.chat.reply is not None and app.chat.reply.recorder.text,
                     "the first text of the reply")


def stored(data_dir: Path, conversation_id: str) -> list:
    with Store(paths.history_path(data_dir)) as store:
        return store.messages(conversation_id)
