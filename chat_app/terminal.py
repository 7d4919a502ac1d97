"""Words and lines for a terminal: sizes, durations, counts, and one progress line on stderr."""

from __future__ import annotations

import shutil
import sys
import time

from model.disk import format_bytes  # noqa: F401  (one definition, for the model's messages too)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_count(n: int) -> str:
    """12_900_000 -> '12.9M' (parameters)."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


class StderrProgress:
    """Progress on stderr: one line rewritten in place on a terminal; otherwise a plain line whenever `key`
    changes (a new file, the next tenth of the tensors) and at most every 10 s in between, unless
    `terminal_only` (progress that only matters to someone watching)."""

    _TTY_EVERY_S = 0.1
    _LOG_EVERY_S = 10.0

    def __init__(self, terminal_only: bool = False):
        self.terminal_only = terminal_only

    def __enter__(self) -> StderrProgress:
        self.tty = sys.stderr.isatty()
        self._key = object()
        self._shown_at = float("-inf")
        self._open_line = False
        return self

    def show(self, text: str, key: object = None, detail: str | None = None, last: bool = False) -> None:
        """`last`: the stage's final report, kept on screen (the next report starts a new line)."""
        now = time.monotonic()
        if self.tty:
            if key == self._key and now - self._shown_at < self._TTY_EVERY_S:
                return
            line = f"{text}  {detail}" if detail else text
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write(f"\r\x1b[K{line[:width]}")
            self._open_line = True
        else:
            if self.terminal_only or (key == self._key and now - self._shown_at < self._LOG_EVERY_S):
                return
            sys.stderr.write(f"{text}{f' [{detail}]' if detail else ''}\n")
        sys.stderr.flush()
        self._key, self._shown_at = key, now
        if last:
            self.finish()

    def finish(self) -> None:
        """End the open line: kept, or erased when the progress only mattered while it ran."""
        if self._open_line:
            sys.stderr.write("\r\x1b[K" if self.terminal_only else "\n")
            sys.stderr.flush()
            self._open_line = False

    def __exit__(self, *exc_info) -> None:
        self.finish()
