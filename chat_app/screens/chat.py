"""The main screen: conversations on the left, the open one on the right, the prompt below it.

It turns what the user does into store writes and engine requests, and what the engine worker
posts (`chat_app.worker`) into widgets and store writes. The rules that keep data safe live here:
the user's message is stored before the input is cleared (a failed send leaves the prompt in the
input), a reply is saved while it streams (`ReplyRecorder`: at most ~1 s of it is lost if the process
is killed) and its partial text is kept when it is stopped, fails, or the app quits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Input

from chat_app.personas import Persona, PersonaError
from chat_app.screens.confirm import ConfirmScreen
from chat_app.screens.personas import PersonaScreen
from chat_app.screens.text_prompt import TextPromptScreen
from chat_app.store import Conversation, Message, ReplyRecorder, StoreError, title_from, turn_outcome
from chat_app.widgets.chat_view import ChatView
from chat_app.widgets.conversation_list import ConversationList
from chat_app.widgets.message_box import MessageBox, reply_note
from chat_app.widgets.prompt_input import PromptInput
from chat_app.widgets.status_bar import StatusBar
from chat_app.worker import (
    EngineFailed,
    EngineLoading,
    EngineReady,
    ReplyCompiling,
    ReplyDelta,
    ReplyDone,
    ReplyFailed,
    ReplyStarted,
    ReplyTrimmed,
    TokensCounted,
)

if TYPE_CHECKING:
    from chat_app.app import ChatApp

COMPILING = "compiling the model for this prompt size (once)…"
EDITING_TITLE = "Editing your last message · Enter sends it again, replacing its reply · Esc cancels"


def export_file_name(title: str, suffix: str) -> str:
    """A file name made from a conversation's title (letters, digits, - and _ only)."""
    stem = re.sub(r"[^\w-]+", "-", title).strip("-")[:60] or "conversation"
    return stem + suffix


@dataclass
class ReplyInProgress:
    """The reply being generated (one at a time: the engine serves one request at a time)."""

    request_id: int
    conversation_id: str
    recorder: ReplyRecorder  # the assistant message, saved as it grows
    sent_message: Message | None  # the user message this turn sent (None for regenerate)


class ChatScreen(Screen):
    """The app's main screen (see the module's docstring). `persona` is used for new conversations
    until the user picks another one."""

    AUTO_FOCUS = "PromptInput"  # focused as soon as the screen shows, so early typing lands there
    # One table for the footer, the command palette (ChatApp.get_system_commands) and the keymap
    # (the ids are what DATA/settings.toml's [keys] table remaps).
    BINDINGS = [
        # Esc does one of three things; check_action leaves only the one that applies.
        Binding("escape", "stop", "Stop", id="chat.stop",
                tooltip="Stop the reply being generated (its text so far is kept)"),
        Binding("escape", "cancel_edit", "Cancel edit", id="chat.cancel_edit",
                tooltip="Leave your last message as it was"),
        Binding("escape", "clear_search", "Clear search", id="chat.clear_search",
                tooltip="Show all conversations again"),
        Binding("ctrl+n", "new_conversation", "New chat", id="chat.new",
                tooltip="Start a new conversation"),
        Binding("ctrl+f", "search", "Search", id="chat.search",
                tooltip="Search the titles and messages of all conversations"),
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate",
                tooltip="Replace the last reply with a new one"),
        Binding("ctrl+l", "edit_last", "Edit last", id="chat.edit_last",
                tooltip="Edit your last message and send it again"),
        Binding("ctrl+o", "copy_message", "Copy", id="chat.copy",
                tooltip="Copy the selected message, or else the last reply, to the clipboard"),
        Binding("f2", "rename", "Rename", id="chat.rename", tooltip="Rename this conversation"),
        Binding("f3", "personas", "Persona", id="chat.personas",
                tooltip="Choose this conversation's persona; create, edit, import or export personas"),
        Binding("f4", "export('md')", "Export", id="chat.export",
                tooltip="Save this conversation to a Markdown file"),
        Binding("f8", "delete", "Delete", id="chat.delete", tooltip="Delete this conversation"),
        # The prompt keeps the focus, so the conversation scrolls from there (or with the mouse).
        Binding("ctrl+up", "scroll_chat(-1)", "Scroll up", id="chat.scroll_up", show=False),
        Binding("ctrl+down", "scroll_chat(1)", "Scroll down", id="chat.scroll_down", show=False),
    ]

    def __init__(self, persona: Persona) -> None:
        super().__init__()
        self.persona = persona  # for new conversations
        self.conversation: Conversation | None = None  # None: a new conversation, not stored until sent
        self.reply: ReplyInProgress | None = None
        self.editing: Message | None = None  # the user message being edited (edit and resend)
        self.draft_before_edit = ""
        self.engine_ready = False
        self.engine_error: str | None = None
        self.engine_activity = ""  # the engine's state for the status bar when no reply is running

    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="sidebar"):
                yield Input(placeholder="Search (ctrl+f)", id="search")
                yield ConversationList(id="conversations")
            with Vertical(id="chat"):
                yield ChatView(id="messages")
                yield PromptInput(id="prompt")
        yield StatusBar(id="status")
        yield Footer()

    @property
    def prompt(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def chat_view(self) -> ChatView:
        return self.query_one(ChatView)

    @property
    def status(self) -> StatusBar:
        return self.query_one(StatusBar)

    @property
    def conversation_list(self) -> ConversationList:
        return self.query_one(ConversationList)

    async def on_mount(self) -> None:
        self.status.model = self.chat_app.model_name
        conversations = self.chat_app.store.list_conversations()
        await self.open_conversation(conversations[0].id if conversations else None)

    # --- conversations ------------------------------------------------------------------------
    async def open_conversation(self, conversation_id: str | None) -> None:
        """Shows a stored conversation (None: a new, empty one)."""
        self._stop_editing()
        store = self.chat_app.store
        if conversation_id is None:
            self.conversation, messages = None, []
        else:
            self.conversation, messages = store.get_conversation(conversation_id), store.messages(conversation_id)
        name = self.persona_name
        streaming = self.reply if self.reply and self.reply.conversation_id == conversation_id else None
        boxes = []
        for message in messages:
            if streaming and message.id == streaming.recorder.message_id:
                # The store holds the text of the last save; the recorder has all of it.
                box = MessageBox("assistant", streaming.recorder.text, title=name, message_id=message.id)
            else:
                box = MessageBox.from_message(message, name)
            boxes.append(box)
        await self.chat_view.show(boxes)
        if streaming:
            self.chat_view.box_for(streaming.recorder.message_id).start_stream("generating…")
        self.status.persona = name
        self.status.context_used = None if messages else 0  # counted by the worker
        self._count_tokens()
        self.refresh_sidebar()
        self.refresh_bindings()

    @property
    def persona_name(self) -> str:
        return self.conversation.persona.get("name", "Assistant") if self.conversation else self.persona.name

    def refresh_sidebar(self) -> None:
        query = self.query_one("#search", Input).value
        if query.strip():
            self.conversation_list.show_hits(self.chat_app.store.search(query))
        else:
            self.conversation_list.show_conversations(
                self.chat_app.store.list_conversations(),
                self.conversation.id if self.conversation else None,
                self.reply.conversation_id if self.reply else None,
            )

    @on(ConversationList.Opened)
    async def _open_chosen(self, event: ConversationList.Opened) -> None:
        await self.open_conversation(event.conversation_id)
        self.prompt.focus()

    @on(Input.Changed, "#search")
    def _search(self) -> None:
        self.refresh_sidebar()
        self.refresh_bindings()

    @on(Input.Submitted, "#search")
    def _search_done(self) -> None:
        self.conversation_list.focus()

    async def action_new_conversation(self) -> None:
        await self.open_conversation(None)
        self.prompt.focus()

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_rename(self) -> None:
        conversation = self.conversation
        if conversation is None:
            self.notify("Send a first message: a new conversation gets its title from it.")
            return

        def accept(title: str) -> str | None:
            try:
                self.chat_app.store.rename_conversation(conversation.id, title)
            except StoreError as error:
                return str(error)
            if self.conversation and self.conversation.id == conversation.id:
                self.conversation = self.chat_app.store.get_conversation(conversation.id)
            self.refresh_sidebar()
            return None

        self.app.push_screen(TextPromptScreen("Rename the conversation:", conversation.title, accept))

    def action_delete(self) -> None:
        conversation = self.conversation
        if conversation is None:
            return

        async def delete(confirmed: bool | None) -> None:
            if not confirmed:
                return
            if self.reply and self.reply.conversation_id == conversation.id:
                self.chat_app.worker.cancel(self.reply.request_id)
                self.reply = None  # its messages go with the conversation
            try:
                self.chat_app.store.delete_conversation(conversation.id)
            except StoreError as error:
                self.notify(str(error), severity="error")
                return
            if self.chat_app.worker:
                self.chat_app.worker.forget(conversation.id)
            await self.open_conversation(None)

        question = f"Delete the conversation {conversation.title!r} and all its messages?"
        self.app.push_screen(ConfirmScreen(question, "Delete"), delete)

    def action_export(self, kind: str) -> None:
        """Writes the conversation to a file the user names: JSON for a .json name, else Markdown.
        An existing file is never overwritten."""
        conversation = self.conversation
        if conversation is None:
            self.notify("Nothing to export yet: this conversation is empty.")
            return

        def accept(text: str) -> str | None:
            path = Path(text).expanduser()
            if path.exists():
                return f"{path} already exists; choose another name."
            if not path.parent.is_dir():
                return f"The folder {path.parent} does not exist."
            store = self.chat_app.store
            try:
                if path.suffix.lower() == ".json":
                    content = json.dumps(store.export_json(conversation.id), indent=2, ensure_ascii=False)
                else:
                    content = store.export_markdown(conversation.id)
                with path.open("x", encoding="utf-8") as file:
                    file.write(content)
            except (OSError, StoreError) as error:
                return f"Cannot write {path}: {error}"
            self.notify(f"Exported to {path}")
            return None

        default = Path.cwd() / export_file_name(conversation.title, f".{kind}")
        question = "Export the conversation to the file (.json: JSON, otherwise Markdown):"
        self.app.push_screen(TextPromptScreen(question, str(default), accept))

    def action_personas(self) -> None:
        def chosen(persona: Persona | None) -> None:
            if persona is None:
                return
            self.persona = persona
            if self.conversation is not None:
                try:
                    self.chat_app.store.set_persona(self.conversation.id, persona.snapshot())
                except StoreError as error:
                    self.notify(str(error), severity="error")
                    return
                self.conversation = self.chat_app.store.get_conversation(self.conversation.id)
                self._count_tokens()
                self.refresh_sidebar()
            self.status.persona = persona.name

        self.app.push_screen(PersonaScreen(self.chat_app.personas, self.persona_name), chosen)

    # --- sending and replies ------------------------------------------------------------------
    @on(PromptInput.Submitted)
    async def send(self, event: PromptInput.Submitted) -> None:
        """Stores the message, then takes it out of the input and asks for a reply. If anything fails
        before the message is stored, the prompt stays in the input."""
        if not self._can_generate():
            return
        text = event.text
        store = self.chat_app.store
        try:
            if self.editing is not None:
                store.delete_messages_from(self.editing.conversation_id, self.editing.id)
                await self.chat_view.remove_from(self.editing.id)
                self._stop_editing(restore_draft=False)
            if self.conversation is None:
                self.conversation = store.create_conversation(
                    title_from(text), self.chat_app.model_name, self.persona.snapshot()
                )
            message = store.add_message(self.conversation.id, "user", text)
        except StoreError as error:
            self.notify(f"The message was not sent: {error}", severity="error")
            return
        self._take_from_prompt(text)
        await self.chat_view.add(MessageBox.from_message(message, self.persona_name))
        await self._start_reply(message)

    def _take_from_prompt(self, sent: str) -> None:
        """Remove the sent text from the input, keeping whatever was typed after it was sent."""
        typed = self.prompt.text
        self.prompt.load_text(typed[len(sent):].lstrip("\n") if typed.startswith(sent) else typed)

    async def action_regenerate(self) -> None:
        if self.conversation is None or not self._can_generate():
            return
        messages = self.chat_app.store.messages(self.conversation.id)
        if not any(message.role == "user" for message in messages):
            self.notify("There is no message to answer yet.")
            return
        if messages[-1].role == "assistant":
            try:
                self.chat_app.store.delete_messages_from(self.conversation.id, messages[-1].id)
            except StoreError as error:
                self.notify(str(error), severity="error")
                return
            await self.chat_view.remove_from(messages[-1].id)
        await self._start_reply(None)

    def action_edit_last(self) -> None:
        if self.conversation is None or self._busy():
            return
        users = [m for m in self.chat_app.store.messages(self.conversation.id) if m.role == "user"]
        if not users:
            self.notify("There is no message of yours to edit.")
            return
        if self.editing is None:
            self.draft_before_edit = self.prompt.text
        self.editing = users[-1]
        self.prompt.load_text(self.editing.content)
        self.prompt.move_cursor(self.prompt.document.end)
        self.prompt.border_title = EDITING_TITLE
        self.prompt.add_class("editing")
        self.prompt.focus()
        self.refresh_bindings()

    def _stop_editing(self, restore_draft: bool = True) -> None:
        if self.editing is None:
            return
        self.editing = None
        if restore_draft:
            self.prompt.load_text(self.draft_before_edit)
        self.prompt.border_title = None
        self.prompt.remove_class("editing")
        self.refresh_bindings()

    def action_stop(self) -> None:
        self.chat_app.worker.cancel(self.reply.request_id)
        self.status.activity = "stopping…"

    def action_cancel_edit(self) -> None:
        self._stop_editing()

    def action_clear_search(self) -> None:
        self.query_one("#search", Input).value = ""
        self.prompt.focus()

    def action_scroll_chat(self, pages: int) -> None:
        """Scrolling up lets go of the bottom (new text no longer pulls the view down); scrolling back
        to the bottom follows new text again."""
        if pages < 0:
            self.chat_view.scroll_page_up(animate=False)
        else:
            self.chat_view.scroll_page_down(animate=False)

    def action_copy_message(self) -> None:
        box = self.focused if isinstance(self.focused, MessageBox) else None
        if box is None:
            replies = [b for b in self.chat_view.boxes if b.role == "assistant" and b.text]
            box = replies[-1] if replies else None
        if box is None:
            self.notify("There is no reply to copy yet.")
            return
        self.app.copy_to_clipboard(box.text)
        self.notify(f"Copied {len(box.text)} characters to the clipboard.")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hides what Esc cannot do now, and greys out what needs a conversation."""
        if action == "stop":
            return self.reply is not None
        if action == "cancel_edit":
            return self.reply is None and self.editing is not None
        if action == "clear_search":
            return self.reply is None and self.editing is None and bool(self.query_one("#search", Input).value)
        if action in ("rename", "delete", "export", "regenerate", "edit_last"):
            return self.conversation is not None or None
        return True

    def _busy(self) -> bool:
        """Whether a reply is being generated (the engine makes one at a time); if so, says so."""
        if self.reply is not None:
            self.notify("A reply is still being generated: press Esc to stop it first.", severity="warning")
        return self.reply is not None

    def _can_generate(self) -> bool:
        """Whether a reply can be asked for now; if not, says why."""
        if self._busy():
            return False
        if self.chat_app.worker is None:
            self.notify("No model is open: set one up from the command palette (ctrl+p, \"Set up a model\").",
                        severity="error")
        elif self.engine_error is not None:
            self.notify(f"The model could not be loaded: {self.engine_error}", severity="error")
        else:
            return True
        return False

    async def _start_reply(self, sent_message: Message | None) -> None:
        conversation = self.conversation
        store = self.chat_app.store
        try:
            sampling = self.chat_app.sampling_for(conversation.persona)
            messages = store.chat_messages(conversation.id)
            recorder = store.start_reply(conversation.id)  # last: nothing half-made is left on failure
        except (StoreError, PersonaError) as error:
            self.notify(f"Cannot ask for a reply: {error}", severity="error")
            return
        box = MessageBox("assistant", "", title=self.persona_name, message_id=recorder.message_id)
        await self.chat_view.add(box)
        box.start_stream("thinking…" if self.engine_ready else "waiting for the model to load…")
        # asked only now: the worker's first news (ReplyStarted) must find the box already showing
        request_id = self.chat_app.worker.generate(conversation.id, messages, sampling)
        self.reply = ReplyInProgress(request_id, conversation.id, recorder, sent_message)
        self._show_activity()
        self.refresh_sidebar()
        self.refresh_bindings()

    def _reply_box(self, request_id: int) -> MessageBox | None:
        """The streaming reply's box, if that reply is the one asked about and is on screen."""
        if self.reply is None or self.reply.request_id != request_id:
            return None
        return self.chat_view.box_for(self.reply.recorder.message_id)

    def on_reply_started(self, event: ReplyStarted) -> None:
        if (box := self._reply_box(event.request_id)) is not None:
            box.border_subtitle = "generating…"

    def on_reply_compiling(self, event: ReplyCompiling) -> None:
        if (box := self._reply_box(event.request_id)) is not None:
            box.border_subtitle = COMPILING
        self.status.activity = "compiling…"

    async def on_reply_delta(self, event: ReplyDelta) -> None:
        if self.reply is None or self.reply.request_id != event.request_id:
            return  # a reply whose conversation was deleted
        try:
            self.reply.recorder.append(event.text)
        except StoreError as error:
            self.notify(f"The reply could not be saved: {error}", severity="error")
        if (box := self._reply_box(event.request_id)) is not None and box.streaming:
            if box.border_subtitle == COMPILING:
                box.border_subtitle = "generating…"
                self._show_activity()
            await box.append(event.text)

    def on_reply_trimmed(self, event: ReplyTrimmed) -> None:
        self.notify(
            f"The conversation is longer than the model's context: its oldest {event.dropped_messages} "
            "messages were left out of this reply.",
            severity="warning",
        )

    async def on_reply_done(self, event: ReplyDone) -> None:
        reply = self.reply
        if reply is None or reply.request_id != event.request_id:
            return
        if event.turn is not None:
            self.status.context_used = event.turn.context_used
            self.status.context_limit = event.turn.context_limit
            if event.turn.generated_tokens > 1:  # a speed needs two tokens: keep the last one shown
                self.status.tokens_per_s = event.turn.tokens_per_s
            await self._finish_reply(event.text, *turn_outcome(event.turn))
        else:  # cancelled before the engine started on it
            await self._finish_reply(event.text, "cancelled", None)

    async def on_reply_failed(self, event: ReplyFailed) -> None:
        reply = self.reply
        if reply is None or reply.request_id != event.request_id:
            return
        self.notify(event.error, title="The reply failed", severity="error", timeout=15)
        await self._finish_reply(reply.recorder.text, "error", None)
        if reply.sent_message is not None and not reply.recorder.text:
            await self._unsend(reply.sent_message)

    async def _unsend(self, message: Message) -> None:
        """A message got no reply at all: it goes (with its empty reply, and with its conversation if
        that was all there was) and its text comes back into the input, as if it had never been sent."""
        store = self.chat_app.store
        conversation_id = message.conversation_id
        try:
            store.delete_messages_from(conversation_id, message.id)
            if not store.messages(conversation_id):
                store.delete_conversation(conversation_id)
                conversation_id = None
        except StoreError as error:
            self.notify(str(error), severity="error")
        typed_since = self.prompt.text
        self.prompt.load_text(message.content + ("\n\n" + typed_since if typed_since.strip() else ""))
        if self.conversation is not None and self.conversation.id == message.conversation_id:
            await self.open_conversation(conversation_id)

    async def _finish_reply(self, text: str, status: str, stats: dict | None) -> None:
        reply, self.reply = self.reply, None
        try:
            reply.recorder.finish(status, stats, text=text)
        except StoreError as error:
            self.notify(f"The reply could not be saved: {error}", severity="error")
        if (box := self.chat_view.box_for(reply.recorder.message_id)) is not None:
            await box.finish(text, reply_note(status, stats))
        self._show_activity()
        self.refresh_sidebar()
        self.refresh_bindings()

    def on_unmount(self) -> None:
        """The app is quitting: a reply still being generated is saved as it is, marked stopped."""
        if self.reply is not None:
            reply, self.reply = self.reply, None
            reply.recorder.finish("cancelled", None)

    # --- the engine's state -------------------------------------------------------------------
    def on_engine_loading(self, event: EngineLoading) -> None:
        self.engine_activity = f"loading {event.what} {event.fraction:.0%}"
        self._show_activity()

    def on_engine_ready(self, event: EngineReady) -> None:
        self.engine_ready = True
        self.chat_app.model_name = self.status.model = event.model_name
        self.status.devices = event.device_summary
        self.status.context_limit = event.context_limit
        self.engine_activity = ""
        self._show_activity()
        self._count_tokens()

    def on_engine_failed(self, event: EngineFailed) -> None:
        self.engine_error = event.error
        self.engine_activity = "the model failed to load"
        self._show_activity()
        self.notify(event.error, title="The model could not be loaded", severity="error", timeout=30)

    def _show_activity(self) -> None:
        self.status.activity = "generating…" if self.reply and self.engine_ready else self.engine_activity

    def on_tokens_counted(self, event: TokensCounted) -> None:
        # A count that was overtaken by a reply is stale: the reply's own count comes with it.
        if self.reply is None and self.conversation and self.conversation.id == event.conversation_id:
            self.status.context_used = event.tokens

    def _count_tokens(self) -> None:
        """Asks the worker how much of the context the open conversation takes (for the status bar;
        while a reply is being generated, its end brings the count)."""
        if self.chat_app.worker is not None and self.conversation is not None and self.reply is None:
            messages = self.chat_app.store.chat_messages(self.conversation.id)
            if messages:
                self.chat_app.worker.count_tokens(self.conversation.id, messages)
