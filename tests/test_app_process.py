"""The app as a user runs it: `python -m chat_app` in a real pseudo-terminal, on the tiny model,
stopped by real signals while it streams a reply."""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from chat_app import paths
from chat_app.store import Store

REPO = Path(__file__).resolve().parent.parent
LEAVE_ALTERNATE_SCREEN = b"\x1b[?1049l"
ENTER_ALTERNATE_SCREEN = b"\x1b[?1049h"


class TerminalApp:
    """`mixtral-chat ARGS` with a pseudo-terminal (100x30) as its stdin, stdout, stderr and controlling
    terminal (closing it hangs the app up, as closing a terminal window does); everything it writes is
    collected in `output`."""

    def __init__(self, tmp_path: Path, *args: str):
        master, terminal = os.openpty()
        fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "XDG_CACHE_HOME": str(tmp_path / "cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen([sys.executable, "-m", "chat_app", *args], cwd=REPO, env=env,
                                        stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                                        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(terminal)
        self.master = master
        self.output = b""
        self._reader = threading.Thread(target=self._read, daemon=True)  # the app blocks if nobody reads
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except (OSError, TypeError):  # EIO: the app closed the terminal; TypeError: the test closed it
                return
            if not chunk:
                return
            self.output += chunk

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"the app ended while waiting for {what}: {self.output[-2000:]!r}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.output[-2000:]!r}"
            time.sleep(0.1)

    def finish(self, timeout: float = 60) -> int:
        status = self.process.wait(timeout)
        self._reader.join(5)
        self.close()
        return status

    def close(self) -> None:
        """Close the terminal (as closing its window does)."""
        if self.master is not None:
            os.close(self.master)
            self.master = None


def saved_reply(data_dir: Path):
    """The assistant message of the only conversation, or None before there is one."""
    if not paths.history_path(data_dir).exists():
        return None
    with Store(paths.history_path(data_dir)) as store:
        conversations = store.list_conversations()
        messages = store.messages(conversations[0].id) if conversations else []
    return next((m for m in messages if m.role == "assistant"), None)


def app_streaming_a_long_reply(tmp_path: Path, tiny_ckpt: Path) -> TerminalApp:
    """The app on the tiny model, once a reply that does not end is being streamed and saved."""
    data_dir = tmp_path / "data"
    app = TerminalApp(tmp_path, "--data-dir", str(data_dir), "--model", str(tiny_ckpt), "--mesh", "1x1",
                      "--max-new-tokens", "100000", "--seed", "1")
    app.wait_for(lambda: b"Enter sends" in app.output, "prompt")
    app.type("Talk for a long time\r")
    # The reply is saved while it streams (about once a second): text in the history means it is under way.
    app.wait_for(lambda: (reply := saved_reply(data_dir)) is not None and reply.content, "streamed reply")
    return app


@pytest.mark.slow
@pytest.mark.parametrize("signum, exit_status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["kill", "hangup"])
def test_a_stop_signal_mid_reply_saves_it_as_cancelled_and_restores_the_terminal(tmp_path, tiny_ckpt,
                                                                                 signum, exit_status):
    app = app_streaming_a_long_reply(tmp_path, tiny_ckpt)
    app.process.send_signal(signum)
    status = app.finish()
    assert status == exit_status, app.output[-2000:]
    reply = saved_reply(tmp_path / "data")
    assert reply.status == "cancelled" and reply.content
    assert b"Traceback" not in app.output
    # The terminal is given back: the alternate screen was left after it was last entered.
    assert app.output.rindex(LEAVE_ALTERNATE_SCREEN) > app.output.rindex(ENTER_ALTERNATE_SCREEN)


@pytest.mark.slow
def test_closing_the_terminal_mid_reply_saves_it_as_cancelled_and_ends_the_app(tmp_path, tiny_ckpt):
    app = app_streaming_a_long_reply(tmp_path, tiny_ckpt)
    app.close()  # the kernel sends SIGHUP; writes to the terminal fail from now on
    assert app.process.wait(60) == 129
    reply = saved_reply(tmp_path / "data")
    assert reply.status == "cancelled" and reply.content
