"""What every command shares: the program's name, its exit codes and the user-facing error base class.

A leaf module (it imports only `signal` and `model.errors`, which imports nothing), so `cli`, `headless`,
`setup_flow` and the rest can all import it at the top.
"""

import signal

from model.errors import UserError

PROG = "mixtral-chat"

EXIT_ERROR = 1  # a `UserError`: one line on stderr
EXIT_USAGE = 2  # what argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, as shells report a reader that went away

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Ctrl-C, `kill` (or a system shutdown), a closed terminal: each stops the app as Ctrl-C does (the
reply ends within a token and is kept as cancelled), which then exits with `signal_exit_status`."""


def signal_exit_status(signum: int) -> int:
    """128 + the signal's number, as shells report a process a signal ended (130, 143, 129)."""
    return 128 + signum


__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_STDOUT_CLOSED", "EXIT_USAGE", "PROG", "STOP_SIGNALS", "UserError",
           "signal_exit_status"]
