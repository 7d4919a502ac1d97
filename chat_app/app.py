"""The Textual app: what lives as long as it runs (history, personas, the engine worker, key
remaps), and `run_app`, which the CLI calls.

Start-up is quick on purpose: nothing here imports jax. The screen is drawn first; then the engine
worker starts on its own thread, imports jax, loads the checkpoint and compiles while the user reads
old conversations and types.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import tomllib
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from chat_app import paths
from chat_app.engine_factory import EngineFactory, engine_factory
from chat_app.errors import STOP_SIGNALS, signal_exit_status
from chat_app.personas import DEFAULT_PERSONA, Persona, PersonaLibrary
from chat_app.screens.chat import ChatScreen
from chat_app.screens.confirm import ConfirmScreen
from chat_app.screens.persona_editor import PersonaEditorScreen
from chat_app.screens.personas import PersonaScreen
from chat_app.screens.text_prompt import TextPromptScreen
from chat_app.store import Store
from chat_app.widgets.prompt_input import PromptInput
from chat_app.worker import EngineWorker

if TYPE_CHECKING:
    from model.engine_api import SamplingParams

WORKER_STOP_TIMEOUT_S = 10.0
"""How long quitting waits for the engine thread (a turn stops within one token)."""

REMAPPABLE = (ChatScreen, PromptInput, PersonaScreen, PersonaEditorScreen, ConfirmScreen, TextPromptScreen)
"""The classes whose bindings have ids, i.e. what settings.toml's [keys] table can remap (and the
wizard's screen, imported only when there is a [keys] table to check: it imports huggingface_hub)."""


def binding_ids() -> list[str]:
    from chat_app.wizard import WizardScreen

    return [b.id for cls in (*REMAPPABLE, WizardScreen) for b in cls.BINDINGS if isinstance(b, Binding) and b.id]


def load_keymap(settings_file: Path) -> tuple[dict[str, str], list[str]]:
    """The key remaps in settings.toml's [keys] table, and the problems found (each in words).

        [keys]
        chat.new = "ctrl+t"           # binding id = key, or several keys: "ctrl+t,f5"
        prompt.newline = "ctrl+j"

    A bad file or entry never stops the app: it is reported and the default keys stay.
    """
    try:
        settings = tomllib.loads(settings_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        return {}, [f"{settings_file} could not be read, so the default keys are used: {error}"]
    keys = settings.get("keys", {})
    if not isinstance(keys, dict):
        return {}, [f"{settings_file}: [keys] must be a table of binding id = \"key\"; default keys are used"]
    known = binding_ids()
    keymap, problems = {}, []
    for binding_id, key in _flatten(keys):
        if binding_id not in known:
            problems.append(f"{settings_file}: unknown binding id {binding_id!r} (known: {', '.join(known)})")
        elif not isinstance(key, str) or not key.strip():
            problems.append(f"{settings_file}: {binding_id} must be a key name such as \"ctrl+t\", got {key!r}")
        else:
            keymap[binding_id] = key
    return keymap, problems


def _flatten(table: dict, prefix: str = "") -> Iterable[tuple[str, object]]:
    """TOML reads `chat.new = "x"` as {"chat": {"new": "x"}}; binding ids are the dotted names."""
    for name, value in table.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


class ChatApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "mixtral-chat"

    def __init__(
        self,
        data_dir: Path,
        model_dir: Path | None = None,
        *,
        persona: str | None = None,
        sampling_overrides: dict | None = None,
        open_engine: EngineFactory | None = None,
        open_wizard: bool = False,
    ) -> None:
        """Opens the history and the persona library (StoreError, PersonaError: the caller reports
        them before any screen is drawn). With `model_dir`, the engine loads once the screen is up
        (`open_engine`: the real engine on all devices by default, see `chat_app.engine_factory`);
        without, the app can still browse and search the history, and `open_wizard` starts the
        first-run wizard, which gives back the model to open."""
        super().__init__()
        self.data_dir = data_dir
        self.model_dir = model_dir
        self.model_name = model_dir.name if model_dir else "no model"  # the engine's name once loaded
        self.personas = PersonaLibrary(paths.personas_dir(data_dir))
        first_persona = self.personas.get(persona or DEFAULT_PERSONA)
        self.store = Store(paths.history_path(data_dir))
        self.sampling_overrides = dict(sampling_overrides or {})
        self.open_engine = open_engine or engine_factory()
        self.open_wizard = open_wizard
        self.chat = ChatScreen(first_persona)
        # Created now so that a message sent while the screen is still coming up is queued; its
        # thread starts once the screen is drawn.
        self.worker = self._new_worker(model_dir) if model_dir else None

    def get_default_screen(self) -> Screen:
        return self.chat

    def on_mount(self) -> None:
        if not self.is_headless:  # the app owns a real terminal (tests drive a headless one)
            self._quit_on_stop_signals()
        keymap, problems = load_keymap(paths.settings_path(self.data_dir))
        self.set_keymap(keymap)
        if self.store.read_only:
            problems.append(f"The history file {self.store.path} cannot be written ({self.store.read_only_reason}): "
                            "you can read your conversations, but new messages cannot be sent.")
        for problem in problems + self.personas.problems:
            self.notify(problem, severity="warning", timeout=15)
        if self.worker is not None:
            self.call_after_refresh(self.worker.start)
        elif self.open_wizard:
            self.action_setup_model()

    def _quit_on_stop_signals(self) -> None:
        """SIGTERM (`kill`, a shutdown), SIGHUP (the terminal closed) and SIGINT quit as ctrl+q does:
        the reply being generated stops within a token and is saved as cancelled (ChatScreen.on_unmount),
        the terminal is restored, and the process exits with 128 + the signal's number. (Ctrl-C
        itself is a key here, the terminal being in raw mode.) Asyncio's handlers, not `signal.signal`:
        they wake the event loop, and the loop removes them when it closes."""
        loop = asyncio.get_running_loop()
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, self._quit_on_signal, signum)

    def _quit_on_signal(self, signum: int) -> None:
        status = signal_exit_status(signum)
        if signum == signal.SIGHUP:
            # The terminal was closed. Textual's last writes to it can then wait forever (seen with
            # `tmux kill-session`, after the reply and history were saved), so the process ends at the
            # latest once the engine has had its time to stop.
            watchdog = threading.Timer(WORKER_STOP_TIMEOUT_S + 2, os._exit, [status])
            watchdog.daemon = True
            watchdog.start()
        self.exit(return_code=status)

    def _new_worker(self, model_dir: Path) -> EngineWorker:
        return EngineWorker(model_dir, self.chat.post_message, self.open_engine)

    def action_setup_model(self) -> None:
        """Opens the first-run wizard (download or build a model); it gives back the checkpoint dir."""
        from chat_app.wizard import WizardScreen

        def done(model_dir: Path | None) -> None:
            if model_dir is not None:
                self.model_dir, self.model_name = model_dir, model_dir.name
                self.chat.status.model = model_dir.name
                self.worker = self._new_worker(model_dir)
                self.worker.start()

        self.push_screen(WizardScreen(self.data_dir), done)

    def sampling_for(self, persona_snapshot: dict) -> SamplingParams:
        """The sampling settings of a turn: the conversation's persona, with the command line's
        overrides (--temperature, --seed, ...) on top."""
        overrides = dict(self.sampling_overrides)
        seed = overrides.pop("seed", None)
        return dataclasses.replace(Persona.from_snapshot(persona_snapshot).sampling(seed), **overrides)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is not self.chat:
            return
        for binding in ChatScreen.BINDINGS:
            # Those in the footer, when they apply now.
            if binding.show and self.chat.check_action(binding.action.split("(")[0], ()):
                yield SystemCommand(binding.description, binding.tooltip, self._run_on_chat(binding.action))
        if self.chat.conversation is not None:
            yield SystemCommand("Export as JSON", "Save this conversation to a JSON file",
                                self._run_on_chat("export('json')"))
        if self.worker is None:
            yield SystemCommand("Set up a model", "Download or build a model to chat with", self.action_setup_model)

    def _run_on_chat(self, action: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            await self.chat.run_action(action)

        return run

    async def on_unmount(self) -> None:
        if self.worker is not None:
            self.worker.stop(WORKER_STOP_TIMEOUT_S)
        self.store.close()


def run_app(
    data_dir: Path,
    model_dir: Path | None,
    persona: str | None,
    sampling_overrides: dict,
    open_engine: EngineFactory,
) -> int:
    """The TUI on `model_dir` (the CLI has resolved --model, --demo or the default model); None
    opens the first-run wizard. Raises PersonaError or StoreError, with a message for the user,
    before anything is drawn. `sampling_overrides` (temperature, top_p, top_k, max_new_tokens, seed)
    apply to every turn, on top of the conversation's persona; `open_engine` builds the engine
    (chat_app.engine_factory). Returns the exit status (128 + the
    signal's number when a signal ended it)."""
    app = ChatApp(
        data_dir,
        model_dir,
        persona=persona,
        sampling_overrides=sampling_overrides,
        open_engine=open_engine,
        open_wizard=model_dir is None,
    )
    app.run()
    return app.return_code or 0
