"""`UserError`: the base of every exception whose message is written for the user.

A `UserError` says what went wrong and what to do, in one line: callers show `str(error)` as it is (the
CLI as `mixtral-chat: error: ...`, the UI in its status line), never a traceback. Anything else that
escapes is a bug and is shown with its type. This module imports nothing, so both packages can use it
(`chat_app.errors` adds the exit codes).
"""


class UserError(Exception):
    """A problem the user can fix (bad input, a missing or broken file, a model that does not fit)."""

    @property
    def message(self) -> str:
        return str(self)
