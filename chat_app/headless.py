"""Headless mode (`mixtral-chat --headless`): user turns from stdin, replies to stdout, no UI.

Each stdin line is one user turn; with `--jsonl` each line is `{"role": "user", "content": ...}` and
each reply is printed as one JSON object (text, finish reason, token counts, timings). Plain replies
stream to stdout as they are generated, then a newline.

The turns go through the same engine, personas and store as the UI: the user message is saved when
it is sent, the reply while it streams, so a crash or a bad input line later on loses nothing said
before. One Engine and one conversation id serve the whole run, so the engine's KV cache carries
over from turn to turn. Ctrl-C stops the reply within one token; the partial reply is saved as
"cancelled" and printed, and the process exits with status 130.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from chat_app import model_registry, paths
from chat_app.engine_factory import engine_factory
from chat_app.errors import EXIT_INTERRUPTED, EXIT_STDOUT_CLOSED, UserError
from chat_app.personas import DEFAULT_PERSONA, Persona, PersonaLibrary
from chat_app.store import Conversation, Store, title_from, turn_outcome

if TYPE_CHECKING:
    from model.engine_api import ChatEngine

class HeadlessError(UserError):
    """Bad input or set-up (a bad stdin line, no model to use, a checkpoint that does not load),
    in words fit for the user."""


def run_headless(*, data_dir: Path, model_dir: Path | None, persona_name: str | None, overrides: dict,
                 seed: int | None, mesh_shape: tuple[int, int] | None, context_length: int | None,
                 jsonl: bool, save: bool, conversation_id: str | None,
                 on_progress: Callable[[float, str], None] | None = None,
                 stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> int:
    """The whole headless run; returns the exit status. `overrides`: sampling settings that replace
    the persona's for this run (and are saved with the conversation). `on_progress(fraction, what)`:
    model loading progress."""
    store = Store(paths.history_path(data_dir)) if save else Store.in_memory()
    with store:
        conversation = store.get_conversation(conversation_id) if conversation_id else None
        if persona_name:
            persona = PersonaLibrary(paths.personas_dir(data_dir)).get(persona_name)
        elif conversation:
            persona = Persona.from_snapshot(conversation.persona)
        else:
            persona = PersonaLibrary(paths.personas_dir(data_dir)).get(DEFAULT_PERSONA)
        persona = dataclasses.replace(persona, **overrides)
        if model_dir is None and conversation:
            model_dir = model_registry.resolve(data_dir, conversation.model)
        if model_dir is None:
            raise HeadlessError("no model to use: pass --model NAME|PATH or --demo "
                                "(installed models: `mixtral-chat models`)")
        if conversation and persona.snapshot() != conversation.persona:
            store.set_persona(conversation.id, persona.snapshot())
        open_engine = engine_factory(mesh_shape=mesh_shape, context_length=context_length, compilation_cache=True)
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
        self._exit_status: int | None = None  # set to stop: Ctrl-C during a reply, or stdout closed
        self._generating = False

    def run(self, lines: Iterable[str]) -> int:
        """Answer each line; returns the exit status. A bad line raises HeadlessError after the
        turns before it were answered and saved."""
        previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)
        try:
            for line_number, line in enumerate(lines, start=1):
                text = self._user_text(line, line_number)
                if text is not None:
                    self.turn(text)
                if self._exit_status is not None:
                    return self._exit_status
            return 0
        except KeyboardInterrupt:  # Ctrl-C while waiting for input: nothing is half done
            return EXIT_INTERRUPTED
        finally:
            signal.signal(signal.SIGINT, previous_handler)

    def turn(self, text: str) -> None:
        """Send one user message, stream the reply to stdout and save it as it streams."""
        from model.engine_api import ContextTrimmed, TextDelta, TurnDone

        if self.conversation is None:
            self.conversation = self.store.create_conversation(title_from(text), self.model_label, self.persona.snapshot())
        conversation_id = self.conversation.id
        self.store.add_message(conversation_id, "user", text)
        messages = self.store.chat_messages(conversation_id)
        reply = self.store.start_reply(conversation_id)
        done = None
        self._generating = True
        try:
            for event in self.engine.generate(conversation_id, messages, self.persona.sampling(self.seed),
                                              should_stop=lambda: self._exit_status is not None):
                if isinstance(event, TextDelta):
                    reply.append(event.text)
                    if not self.jsonl:
                        self._write(event.text)
                elif isinstance(event, ContextTrimmed):
                    print(f"note: the conversation no longer fits the context; its {event.dropped_messages} "
                          f"oldest messages were left out of this turn", file=self.stderr)
                elif isinstance(event, TurnDone):
                    done = event
        except KeyboardInterrupt:  # a second Ctrl-C: the user does not want to wait for the token
            reply.finish("cancelled")
            raise
        except UserError as e:  # e.g. the message alone does not fit the context
            reply.finish("error")
            raise HeadlessError(str(e)) from None
        except Exception:
            reply.finish("error")  # what streamed so far stays, marked as failed
            raise
        finally:
            self._generating = False
        reply.finish(*turn_outcome(done), text=done.text)
        self._write(json.dumps({"conversation_id": conversation_id, **dataclasses.asdict(done)}, ensure_ascii=False)
                    + "\n" if self.jsonl else "\n")

    def _user_text(self, line: str, line_number: int) -> str | None:
        """The user message on one stdin line; None for a blank line."""
        if not line.strip():
            return None
        if not self.jsonl:
            return line.strip()
        try:
            turn = json.loads(line)
        except json.JSONDecodeError as e:
            raise HeadlessError(f"stdin line {line_number} is not valid JSON: {e}") from None
        if not isinstance(turn, dict) or turn.get("role") != "user" or not isinstance(turn.get("content"), str):
            raise HeadlessError(f'stdin line {line_number}: expected {{"role": "user", "content": "..."}}, '
                                f"got {line.strip()[:80]}")
        if not turn["content"].strip():
            raise HeadlessError(f"stdin line {line_number}: the content is empty")
        return turn["content"]

    def _write(self, text: str) -> None:
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except BrokenPipeError:  # nobody reads the replies any more: stop, keep what was said
            self._exit_status = EXIT_STDOUT_CLOSED

    def _on_interrupt(self, signum, frame) -> None:
        if self._generating and self._exit_status is None:
            self._exit_status = EXIT_INTERRUPTED  # the engine ends the reply at the next token
        else:
            raise KeyboardInterrupt
