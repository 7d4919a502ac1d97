"""Headless mode (`mixtral-chat --headless`): user turns from stdin, replies to stdout, no UI.

Each stdin line is one user turn; with `--jsonl` each line is `{"role": "user", "content": ...}` and
each reply is printed as one JSON object (text, finish reason, token counts, timings). Plain replies
stream to stdout as they are generated, then a newline.

The turns go through the same engine, personas and store as the UI: the user message is saved when
it is sent, the reply while it streams, so a crash or a bad input line later on loses nothing said
before. One Engine and one conversation id serve the whole run, so the engine's KV cache carries
over from turn to turn. Ctrl-C, SIGTERM (`kill`, a shutdown) and SIGHUP (the terminal closed) stop the
reply within one token; the partial reply is saved as "cancelled" and printed, and the process exits
with 128 + the signal's number (130, 143, 129).
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from chat_app import model_registry, paths
from chat_app.engine_factory import EngineFactory
from chat_app.errors import EXIT_STDOUT_CLOSED, PROG, STOP_SIGNALS, UserError, signal_exit_status
from chat_app.personas import DEFAULT_PERSONA, Persona, PersonaLibrary
from chat_app.store import Conversation, Message, Store, StoreError, title_from, turn_outcome

if TYPE_CHECKING:
    from model.engine_api import ChatEngine

_SURROGATES = re.compile("[\ud800-\udfff]")
"""What cannot be encoded as UTF-8: lone surrogates (stdin turns each undecodable byte into one)."""


class HeadlessError(UserError):
    """Bad input or set-up (a bad stdin line, no model to use, a checkpoint that does not load),
    in words fit for the user."""


def run_headless(*, data_dir: Path, model_dir: Path | None, persona_name: str | None, overrides: dict,
                 seed: int | None, open_engine: EngineFactory, jsonl: bool, save: bool, conversation_id: str | None,
                 on_progress: Callable[[float, str], None] | None = None,
                 stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """The whole headless run; returns the exit status. `overrides`: sampling settings that replace
    the persona's for this run (and are saved with the conversation). `open_engine`: the engine's
    factory (chat_app.engine_factory). `on_progress(fraction, what)`: model loading progress."""
    store = Store(paths.history_path(data_dir)) if save else Store.in_memory()
    with store:
        if store.read_only:
            raise HeadlessError(f"the history file {store.path} cannot be written ({store.read_only_reason}): "
                                "add --no-save to chat without saving, or use another --data-dir")
        conversation = store.get_conversation(conversation_id) if conversation_id else None
        library = PersonaLibrary(paths.personas_dir(data_dir))
        if persona_name:
            persona = library.get(persona_name)
        elif conversation:
            persona = Persona.from_snapshot(conversation.persona)
        else:
            persona = library.get(DEFAULT_PERSONA)
        for problem in library.problems:  # e.g. a broken file that would override a built-in
            print(f"{PROG}: warning: {problem}", file=stderr)
        persona = dataclasses.replace(persona, **overrides)
        if model_dir is None and conversation:
            model_dir = model_registry.resolve(data_dir, conversation.model)
        if model_dir is None:
            raise HeadlessError("no model to use: pass --model NAME|PATH or --demo "
                                "(installed models: `mixtral-chat models`)")
        if conversation and persona.snapshot() != conversation.persona:
            store.set_persona(conversation.id, persona.snapshot())
        engine = open_engine(model_dir, on_progress or (lambda fraction, what: None))
        chat = HeadlessChat(engine, store, persona, model_registry.model_label(data_dir, model_dir),
                            conversation=conversation, seed=seed, jsonl=jsonl, stdout=stdout, stderr=stderr)
        status = chat.run(stdin)
        if save and chat.conversation and not jsonl:
            print(f"saved as conversation {chat.conversation.id}", file=stderr)
        return status


class HeadlessChat:
    """The turn loop, on an engine that is already loaded (tests drive it with a real tiny model)."""

    def __init__(self, engine: ChatEngine, store: Store, persona: Persona, model_label: str, *,
                 conversation: Conversation | None = None, seed: int | None = None, jsonl: bool = False,
                 stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr):
        self.engine = engine
        self.store = store
        self.persona = persona
        self.model_label = model_label
        self.conversation = conversation  # created by the first turn when None
        self.seed = seed
        self.jsonl = jsonl
        self.stdout = stdout
        self.stderr = stderr
        self._exit_status: int | None = None  # set to stop: a stop signal (Ctrl-C...), or stdout closed
        self._generating = False

    def run(self, lines: Iterable[str]) -> int:
        """Answer each line; returns the exit status. A bad line raises HeadlessError after the
        turns before it were answered and saved."""
        previous_handlers = {signum: signal.signal(signum, self._on_stop_signal) for signum in STOP_SIGNALS}
        try:
            for line_number, line in enumerate(lines, start=1):
                text = self._user_text(line, line_number)
                if text is not None:
                    self.turn(text, line_number)
                if self._exit_status is not None:
                    return self._exit_status
            return 0
        except KeyboardInterrupt:  # a stop signal while waiting for input: nothing is half done
            return self._exit_status
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)

    def turn(self, text: str, line_number: int) -> None:
        """Send one user message, stream the reply to stdout and save it as it streams. A message
        that gets no reply at all (too long for the context) is not kept."""
        from model.engine_api import ContextTrimmed, TextDelta, TurnDone

        new_conversation = self.conversation is None
        if new_conversation:
            self.conversation = self.store.create_conversation(title_from(text), self.model_label, self.persona.snapshot())
        conversation_id = self.conversation.id
        sent = self.store.add_message(conversation_id, "user", text)
        messages = self.store.chat_messages(conversation_id)
        reply = self.store.start_reply(conversation_id)
        done = None
        self._generating = True
        try:
            for event in self.engine.generate(conversation_id, messages, self.persona.sampling(self.seed),
                                              should_stop=lambda: self._exit_status is not None):
                if isinstance(event, TextDelta):
                    if news := reply.append(event.text):
                        print(f"note: {news}", file=self.stderr)
                    if not self.jsonl:
                        self._write(event.text)
                elif isinstance(event, ContextTrimmed):
                    print(f"note: the conversation no longer fits the context; its {event.dropped_messages} "
                          f"oldest messages were left out of this turn", file=self.stderr)
                elif isinstance(event, TurnDone):
                    done = event
        except KeyboardInterrupt:  # a second signal: the user does not want to wait for the token
            reply.finish("cancelled")
            raise
        except UserError as e:  # e.g. the message alone does not fit the context
            if reply.text:
                reply.finish("error")
                raise HeadlessError(f"stdin line {line_number}: {e}") from None
            self._unsend(sent, new_conversation)
            raise HeadlessError(f"stdin line {line_number}: {e}; the message was not saved") from None
        except Exception:
            reply.finish("error")  # what streamed so far stays, marked as failed
            raise
        finally:
            self._generating = False
        self._write(json.dumps({"conversation_id": conversation_id, **dataclasses.asdict(done)}, ensure_ascii=False)
                    + "\n" if self.jsonl else "\n")
        try:
            reply.finish(*turn_outcome(done), text=done.text)
        except StoreError as e:
            raise HeadlessError(f"the reply to stdin line {line_number} was printed but not saved: {e}") from None

    def _unsend(self, sent: Message, new_conversation: bool) -> None:
        """Take back a message that got no reply (and its empty reply; and its conversation if it
        started it), as the UI does."""
        self.store.delete_messages_from(sent.conversation_id, sent.id)
        if new_conversation:
            self.store.delete_conversation(sent.conversation_id)
            self.conversation = None

    def _user_text(self, line: str, line_number: int) -> str | None:
        """The user message on one stdin line; None for a blank line. Text that is not valid Unicode
        (undecodable bytes, which stdin passes on as lone surrogates, or a JSON "\\ud800") has each bad
        character replaced by U+FFFD, with a note on stderr."""
        if not line.strip():
            return None
        if self.jsonl:
            text = self._jsonl_content(line, line_number)
        else:
            text = line.strip()
        cleaned = _SURROGATES.sub("\ufffd", text)
        if cleaned != text:
            print(f"note: stdin line {line_number} is not valid UTF-8 text; its bad bytes were replaced by "
                  "\ufffd", file=self.stderr)
        return cleaned

    def _jsonl_content(self, line: str, line_number: int) -> str:
        try:
            turn = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeadlessError(f"stdin line {line_number} is not valid JSON: {e}") from None
        if not isinstance(turn, dict) or turn.get("role") != "user" or not isinstance(turn.get("content"), str):
            shown = _SURROGATES.sub("\ufffd", line.strip()[:80])
            raise HeadlessError(f'stdin line {line_number}: expected {{"role": "user", "content": "..."}}, got {shown}')
        if not turn["content"].strip():
            raise HeadlessError(f"stdin line {line_number}: the content is empty")
        return turn["content"]

    def _write(self, text: str) -> None:
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except BrokenPipeError:  # nobody reads the replies any more: stop, keep what was said
            self._exit_status = EXIT_STDOUT_CLOSED

    def _on_stop_signal(self, signum, frame) -> None:
        if self._exit_status is None:
            self._exit_status = signal_exit_status(signum)
            if self._generating:
                return  # the engine ends the reply at the next token
        raise KeyboardInterrupt
