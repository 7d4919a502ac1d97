"""One message of the conversation: its text as Markdown, who wrote it, and how it ended."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown
from textual.widgets.markdown import MarkdownStream

from chat_app.store import Message

_FINISH_NOTES = {"length": "max tokens reached", "context": "context full"}


def reply_note(status: str, stats: dict | None) -> str:
    """The line under a reply: how it ended, and its token count and speed when it has them."""
    if status == "streaming":
        return "interrupted"  # a reply left "streaming" by an app that was killed
    parts = {"cancelled": ["stopped"], "error": ["failed"]}.get(status, [])
    if stats:
        if stats.get("finish_reason") in _FINISH_NOTES:
            parts.append(_FINISH_NOTES[stats["finish_reason"]])
        tokens = stats["generated_tokens"]
        parts.append(f"{tokens} token{'' if tokens == 1 else 's'}")
        if tokens > 1:  # a speed needs two tokens
            parts.append(f"{stats['tokens_per_s']:.1f} tok/s")
    return " · ".join(parts)


class MessageBox(Vertical, can_focus=True):
    """A user message or a reply. A reply being generated streams into its Markdown through a
    `MarkdownStream` (which coalesces fragments when they come faster than they render), and gets
    one full render when it ends, so the final text is exactly what Markdown makes of the whole."""

    def __init__(self, role: str, text: str, *, title: str, note: str = "", message_id: int | None = None):
        super().__init__(classes=role)
        self.role = role
        self.message_id = message_id
        self.border_title = title
        self.border_subtitle = note
        self._initial_text = text
        self._stream: MarkdownStream | None = None

    @classmethod
    def from_message(cls, message: Message, assistant_name: str) -> MessageBox:
        if message.role == "user":
            return cls("user", message.content, title="You", message_id=message.id)
        return cls(
            "assistant",
            message.content,
            title=assistant_name,
            note=reply_note(message.status, message.stats),
            message_id=message.id,
        )

    def compose(self) -> ComposeResult:
        yield Markdown(self._initial_text)

    @property
    def text(self) -> str:
        return self.query_one(Markdown).source

    @property
    def streaming(self) -> bool:
        return self._stream is not None

    def start_stream(self, note: str) -> None:
        self.border_subtitle = note
        self._stream = Markdown.get_stream(self.query_one(Markdown))

    async def append(self, text: str) -> None:
        await self._stream.write(text)

    async def stop_stream(self) -> None:
        """Ends the stream, writing out what it still holds (the box is about to be removed)."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    async def finish(self, text: str, note: str) -> None:
        """The reply ended: its note at once, then one full render of its final text."""
        self.border_subtitle = note
        await self.stop_stream()
        await self.query_one(Markdown).update(text)
