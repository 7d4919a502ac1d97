"""What every command shares: the program's name, its exit codes and the user-facing error base class.

A leaf module (it imports only `model.errors`, which imports nothing), so `cli`, `headless`,
`setup_flow` and the rest can all import it at the top.
"""

from model.errors import UserError

PROG = "mixtral-chat"

EXIT_ERROR = 1  # a `UserError`: one line on stderr
EXIT_USAGE = 2  # what argparse uses for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE, as shells report a reader that went away

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_STDOUT_CLOSED", "EXIT_USAGE", "PROG", "UserError"]
