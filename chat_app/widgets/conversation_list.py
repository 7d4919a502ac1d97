"""The sidebar's list: every conversation (newest first), or the hits of a search."""

from __future__ import annotations

import time

from textual import on
from textual.content import Content
from textual.message import Message
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from chat_app.store import Conversation, SearchHit

GENERATING_MARK = "● "


def when(timestamp: float, now: float | None = None) -> str:
    """A short date: the time for today, the day otherwise."""
    day = time.strftime("%Y-%m-%d", time.localtime(timestamp))
    today = time.strftime("%Y-%m-%d", time.localtime(time.time() if now is None else now))
    return time.strftime("%H:%M", time.localtime(timestamp)) if day == today else day


class ConversationList(OptionList):
    """Choosing an entry (Enter or a click) posts `Opened`. In search mode each entry is a hit and
    shows the matching snippet with the matched words highlighted."""

    class Opened(Message):
        def __init__(self, conversation_id: str) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, markup=False)
        self._conversation_ids: list[str] = []  # parallel to the options

    @property
    def conversation_ids(self) -> list[str]:
        return list(self._conversation_ids)

    def show_conversations(
        self, conversations: list[Conversation], current_id: str | None, generating_id: str | None
    ) -> None:
        options = []
        for conversation in conversations:
            mark = GENERATING_MARK if conversation.id == generating_id else ""
            prompt = Content(mark + conversation.title) + Content.styled(
                "\n" + when(conversation.updated_at), "dim"
            )
            options.append(Option(prompt))
        self._show(options, [c.id for c in conversations], current_id)

    def show_hits(self, hits: list[SearchHit]) -> None:
        options = []
        for hit in hits:
            snippet = Content(hit.snippet.replace("\n", " "))  # a title hit's snippet is the title
            for start, end in hit.highlights:
                snippet = snippet.stylize("bold reverse", start, end)
            if hit.message_id is not None:
                snippet = Content.styled(hit.conversation_title + "\n", "bold") + snippet
            options.append(Option(snippet))
        self._show(options, [hit.conversation_id for hit in hits], None)

    def _show(self, options: list[Option], conversation_ids: list[str], current_id: str | None) -> None:
        self.set_options(options)
        self._conversation_ids = conversation_ids
        if current_id in conversation_ids:
            self.highlighted = conversation_ids.index(current_id)
        elif conversation_ids:
            self.highlighted = 0

    @on(OptionList.OptionSelected)
    def _open(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Opened(self._conversation_ids[event.option_index]))
