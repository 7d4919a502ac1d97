"""The messages of the open conversation, scrolled to the newest."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Static

from chat_app.widgets.message_box import MessageBox

EMPTY_HINT = "Type a message below and press Enter.\nShift+Enter or Ctrl+J starts a new line."


class ChatView(VerticalScroll, can_focus=False):
    """The open conversation's `MessageBox`es.

    The view is anchored: it follows new text at the bottom until the user scrolls up, and follows
    again once they scroll back down (Textual's `Widget.anchor`)."""

    def on_mount(self) -> None:
        self.anchor()

    @property
    def boxes(self) -> list[MessageBox]:
        return list(self.query_children(MessageBox))

    async def show(self, boxes: list[MessageBox]) -> None:
        """Replaces what is shown (another conversation was opened)."""
        for box in self.boxes:
            await box.stop_stream()
        await self.remove_children()
        await self.mount_all(boxes or [Static(EMPTY_HINT, classes="empty-hint")])
        self.anchor()

    async def add(self, box: MessageBox) -> None:
        await self.query_children(".empty-hint").remove()
        await self.mount(box)
        self.anchor()

    async def remove_from(self, message_id: int) -> None:
        """Removes the box of this message and every later one (regenerate, edit and resend)."""
        boxes = self.boxes
        ids = [box.message_id for box in boxes]
        for box in boxes[ids.index(message_id):]:
            await box.stop_stream()
            await box.remove()
        if not self.boxes:
            await self.mount(Static(EMPTY_HINT, classes="empty-hint"))

    def box_for(self, message_id: int) -> MessageBox | None:
        return next((box for box in self.boxes if box.message_id == message_id), None)
