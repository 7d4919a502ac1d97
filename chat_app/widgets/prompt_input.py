"""The multi-line box where the user writes a message."""

from __future__ import annotations

from textual import events
from textual.binding import Binding
from textual.message import Message
from textual.widgets import TextArea


class PromptInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J starts a new line.

    What terminals send: Enter is CR. Shift+Enter is also plain CR in a legacy terminal (and inside
    tmux without `extended-keys`), so there it cannot be told from Enter; Textual switches on the
    kitty keyboard protocol, and terminals that speak it (kitty, WezTerm, foot, Ghostty, Alacritty,
    iTerm2 with the option on) report it as "shift+enter". Ctrl+J is LF, distinct from CR in every
    terminal, so it always works.

    The two keys are handled here, in this widget's own key handler, not by the app's binding
    dispatch: a widget handles its keys in the order they were typed, while the app checks a binding
    either before the keys still queued for this widget (a priority binding: a pasted "hello" +
    Enter sent "hel") or after keys typed later (a plain one: "a^jb" became "ab\n"). The bindings
    below still name the keys, for the keymap (remapping "prompt.send" works) and the help.

    The text is not cleared on submit: whoever sends it clears it once the message is safely stored,
    so a failed send leaves the prompt where it was.
    """

    BINDINGS = [
        # Not in the footer: the placeholder says it, and the footer needs the room.
        Binding("enter", "submit", "Send", id="prompt.send", show=False),
        Binding("shift+enter,ctrl+j", "newline", "New line", id="prompt.newline", show=False),
    ]

    class Submitted(Message):
        """The user asked to send `text` (never blank)."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(
            id=id,
            highlight_cursor_line=False,
            placeholder="Message (Enter sends, Shift+Enter or Ctrl+J: new line)",
        )

    async def _on_key(self, event: events.Key) -> None:
        bindings = self._bindings.copy()
        bindings.apply_keymap(self.app._keymap)  # the user's remaps (Textual applies them the same way)
        for binding in bindings.key_to_bindings.get(event.key, ()):
            if binding.action in ("submit", "newline"):
                event.stop()
                event.prevent_default()
                await self.run_action(binding.action)
                return
        await super()._on_key(event)

    def action_submit(self) -> None:
        if self.text.strip():
            self.post_message(self.Submitted(self.text))

    def action_newline(self) -> None:
        self.insert("\n")
