"""Helpers for Textual Pilot tests."""

from __future__ import annotations

import time


async def wait_until(pilot, condition, what: str, timeout: float = 300.0) -> None:
    """Lets the app run until `condition()` holds (engines and downloads work on their own threads)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)
