"""The first-run wizard driven with Pilot, against a real HTTP server standing in for the hub
(tests/fake_hub.py) serving a tiny random Mixtral, a real HF cache and a real data dir: choose, check, download,
convert, and the checkpoint it hands back; gated repos, cancel and resume, refusals, local folders, the HF cache,
the demo model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from fake_hub import BIG_SHARD, TINY_MIXTRAL_REPO_ID, FakeHub
from huggingface_hub import constants as hf_constants
from pilot import wait_until
from textual.app import App
from textual.widgets import Button, Checkbox, Input, ProgressBar, Select, Static

import chat_app
import model
from chat_app import model_registry, paths
from chat_app.app import ChatApp
from chat_app.demo import demo_quantization
from chat_app.hub import download, plan_download
from chat_app.wizard import CACHED, DEMO, LOCAL, REPO, WizardScreen

SIZE = (120, 50)


class WizardApp(App[None]):
    """Just the wizard (styled as in the app), recording what it is dismissed with."""

    CSS_PATH = Path(chat_app.__file__).with_name("app.tcss")
    NOT_DISMISSED = object()

    def __init__(self, data_dir: Path, **wizard_options) -> None:
        super().__init__()
        self.wizard = WizardScreen(data_dir, **wizard_options)
        self.result = self.NOT_DISMISSED

    def on_mount(self) -> None:
        self.push_screen(self.wizard, self._dismissed)

    def _dismissed(self, result: Path | None) -> None:
        self.result = result


@pytest.fixture(autouse=True)
def no_token(monkeypatch, tmp_path):
    """A user with no HF_TOKEN and no huggingface login."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-login-token"))


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


def hub_wizard(hub: FakeHub, data_dir: Path, cache_dir: Path) -> WizardApp:
    return WizardApp(data_dir, endpoint=hub.url, hf_cache=cache_dir)


def text(wizard: WizardScreen, selector: str) -> str:
    return str(wizard.query_one(selector, Static).render())


async def click(pilot, selector: str) -> None:
    """Click a widget, failing if it is not on screen to be clicked."""
    await pilot.pause()  # the layout of the latest change
    assert await pilot.click(selector), f"{selector} is not on screen"


async def pick(pilot, wizard: WizardScreen, selector: str, moves: int) -> None:
    """Open a Select with a click and choose the option `moves` below the current one."""
    await pilot.pause()
    await pilot.click(selector)  # lands on one of the Select's inner widgets, so no check of what it hit
    assert wizard.query_one(selector, Select).expanded
    await pilot.press(*["down"] * moves, "enter")
    await pilot.pause()


async def choose(pilot, wizard: WizardScreen, source: str, **fields: str) -> None:
    """Press a source's radio button and type into its fields, as a user would."""
    await click(pilot, f"#{source}")
    for field, value in fields.items():
        await click(pilot, f"#{field}")
        await pilot.press(*value)
    assert wizard.query_one(f"#{source}").value


async def next_to_plan(pilot, wizard: WizardScreen) -> None:
    await click(pilot, "#next")
    await wait_until(pilot, lambda: wizard.step == "plan" or text(wizard, "#choose-error"), "the check")
    assert wizard.step == "plan", text(wizard, "#choose-error")


async def start_and_finish(pilot, app: WizardApp) -> Path:
    await click(pilot, "#start")
    await wait_until(pilot, lambda: app.result is not WizardApp.NOT_DISMISSED, "the wizard to finish")
    return app.result


def assert_installed(data_dir: Path, path: Path, name: str) -> None:
    assert path == paths.models_dir(data_dir) / name
    model.verify(path, deep=True)
    assert name in [m.name for m in model_registry.list_installed(data_dir) if m.problem is None]


# ---- from the hub ----------------------------------------------------------------------------------------------
async def test_repo_choice_shows_the_plan_downloads_converts_and_hands_back_the_checkpoint(
        hub, data_dir, cache_dir):
    app = hub_wizard(hub, data_dir, cache_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        assert text(wizard, "#token-status") == "now: none"
        await choose(pilot, wizard, REPO, repo=hub.repo_id)
        await next_to_plan(pilot, wizard)

        plan = text(wizard, "#plan-text")
        assert f"Model:     {hub.repo_id} @ main (commit {hub.commit[:8]})" in plan
        assert "Download:  8.9 MB in 10 files" in plan and str(cache_dir) in plan
        assert "int4: the default on CPU" in plan and "float32: the default dtype on CPU" in plan and ": fits" in plan
        assert re.search(r"reads memory at [\d.]+ GB/s \(measured\)", plan)
        table = plan[plan.index("Settings:"):].splitlines()  # each setting's memory and speed, before the download
        assert [row.split()[0] for row in table[1:5]] == ["float32", "bfloat16", "float32+int8", "float32+int4"]
        assert table[4].endswith("tok/s  <- chosen")
        assert text(wizard, "#plan-problems") == ""
        assert str(wizard.query_one("#start", Button).label) == "Download and install"

        path = await start_and_finish(pilot, app)
    assert_installed(data_dir, path, "tiny-mixtral-int4")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source"]["repo_id"] == hub.repo_id and manifest["source"]["commit"] == hub.commit


async def test_gated_repo_shows_where_to_request_access_and_a_typed_token_gets_in(hub, data_dir, cache_dir):
    hub.gated = True
    hub.known_tokens = hub.granted_tokens = {"hf_typed_secret"}
    app = hub_wizard(hub, data_dir, cache_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        await choose(pilot, wizard, REPO, repo=hub.repo_id)
        await click(pilot, "#next")
        await wait_until(pilot, lambda: text(wizard, "#choose-error"), "the error")
        error = text(wizard, "#choose-error")
        assert f"Request access at {hub.url}/{hub.repo_id}" in error and "type a token" in error
        assert wizard.step == "choose" and wizard.query_one("#repo", Input).value == hub.repo_id  # kept

        await click(pilot, "#token")
        await pilot.press(*"hf_typed_secret")
        assert wizard.query_one("#token", Input).password  # shown as dots
        await next_to_plan(pilot, wizard)
        path = await start_and_finish(pilot, app)
    assert_installed(data_dir, path, "tiny-mixtral-int4")
    for written in [*data_dir.rglob("*"), *cache_dir.rglob("*")]:  # the typed token is never written down
        if written.is_file():
            assert b"hf_typed_secret" not in written.read_bytes(), written


async def test_cancel_mid_download_keeps_the_bytes_and_resume_continues_from_there(hub, data_dir, cache_dir):
    hub.bytes_per_s = 1_000_000
    partial = cache_dir / "models--tiny-org--tiny-mixtral" / "blobs" / f"{hub.files[BIG_SHARD].sha256}.incomplete"
    app = hub_wizard(hub, data_dir, cache_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        await choose(pilot, wizard, REPO, repo=hub.repo_id)
        await next_to_plan(pilot, wizard)
        await click(pilot, "#start")
        bar = wizard.query_one("#bar", ProgressBar)
        await wait_until(pilot, lambda: text(wizard, "#progress-file") == BIG_SHARD and bar.progress > 300_000,
                         "part of the big shard")
        assert wizard.step == "progress" and bar.total == wizard.plan.source.download.total_bytes
        assert re.fullmatch(r"Downloading [\d.]+ [kM]B of 8\.9 MB \(\d+%\), (measuring speed|[\d.]+ [kM]B/s, "
                            r"\d+ s left)", text(wizard, "#progress-text"))

        await click(pilot, "#cancel")
        await wait_until(pilot, lambda: wizard.step == "plan", "the cancel")
        assert "Download cancelled" in text(wizard, "#plan-error") and "Resume" in text(wizard, "#plan-error")
        kept = partial.stat().st_size
        assert 300_000 < kept < hub.files[BIG_SHARD].size
        assert str(wizard.query_one("#start", Button).label) == "Resume"

        hub.bytes_per_s = None
        hub.requests.clear()
        path = await start_and_finish(pilot, app)
    assert hub.file_gets(BIG_SHARD)[0].headers["range"] == f"bytes={kept}-"
    assert_installed(data_dir, path, "tiny-mixtral-int4")


async def test_a_model_that_cannot_fit_on_disk_is_refused_with_the_numbers(tmp_path, repo_folder, data_dir, cache_dir):
    folder = tmp_path / "huge-repo"
    shutil.copytree(repo_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    free = shutil.disk_usage(tmp_path).free
    layers = 2 * free // (3 * 8 * 4096 * 14336 * 3 // 4) + 1  # Mixtral-8x7B's layers, int4, twice the free disk
    config.update(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_hidden_layers=layers,
                  num_attention_heads=32, num_key_value_heads=8)
    (folder / "config.json").write_text(json.dumps(config))
    with FakeHub(TINY_MIXTRAL_REPO_ID, folder) as huge:
        app = hub_wizard(huge, data_dir, cache_dir)
        async with app.run_test(size=SIZE) as pilot:
            wizard = app.wizard
            await choose(pilot, wizard, REPO, repo=huge.repo_id, revision="main")
            await next_to_plan(pilot, wizard)
            problems = text(wizard, "#plan-problems")
            assert problems.startswith("This cannot go ahead") and "Not enough disk space" in problems
            assert "for the converted model" in problems
            assert wizard.query_one("#start", Button).disabled

            await click(pilot, "#back")  # back to the choice, with what was typed
            assert wizard.step == "choose"
            assert wizard.query_one("#repo", Input).value == huge.repo_id
            assert wizard.query_one("#revision", Input).value == "main"
    assert not cache_dir.exists() and not paths.models_dir(data_dir).exists()


# ---- from disk -------------------------------------------------------------------------------------------------
async def test_a_local_folder_is_converted_and_the_chat_opens_on_it(tiny_hf, data_dir):
    app = ChatApp(data_dir, None, open_wizard=True)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.screen
        assert isinstance(wizard, WizardScreen)
        await choose(pilot, wizard, LOCAL, folder=str(tiny_hf))
        await pick(pilot, wizard, "#quantization", moves=2)  # automatic -> none -> int8
        assert wizard.query_one("#quantization", Select).value == "int8"
        await next_to_plan(pilot, wizard)
        assert "Download:" not in text(wizard, "#plan-text")
        assert "int8 quantization" in text(wizard, "#plan-text")
        assert str(wizard.query_one("#start", Button).label) == "Convert and install"
        await click(pilot, "#start")
        await wait_until(pilot, lambda: app.screen is app.chat, "the chat to open")
        name = f"{tiny_hf.name}-int8"
        assert app.model_dir == paths.models_dir(data_dir) / name and app.model_name == name
        assert app.worker is not None
    assert_installed(data_dir, paths.models_dir(data_dir) / name, name)


async def test_replacing_an_installed_model_needs_the_box_ticked(tiny_hf, tiny_ckpt, data_dir):
    existing = paths.models_dir(data_dir) / "mine"
    shutil.copytree(tiny_ckpt, existing)
    app = WizardApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        await choose(pilot, wizard, LOCAL, folder=str(tiny_hf), name="mine")
        await next_to_plan(pilot, wizard)
        assert "REPLACES the installed model" in text(wizard, "#plan-text")
        replace = wizard.query_one("#replace", Checkbox)
        assert replace.display and wizard.query_one("#start", Button).disabled
        await click(pilot, "#replace")
        assert replace.value and not wizard.query_one("#start", Button).disabled
        path = await start_and_finish(pilot, app)
    assert_installed(data_dir, path, "mine")
    assert json.loads((path / "manifest.json").read_text())["source"]["path"] == str(tiny_hf.resolve())


async def test_a_bad_folder_says_why_and_keeps_what_was_typed(tmp_path, data_dir):
    app = WizardApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        await click(pilot, f"#{LOCAL}")
        await click(pilot, "#next")
        assert text(wizard, "#choose-error") == "Type the path of the model folder."
        await choose(pilot, wizard, LOCAL, folder=str(tmp_path / "nowhere"))
        await click(pilot, "#next")
        await wait_until(pilot, lambda: text(wizard, "#choose-error"), "the error")
        assert "is not a folder" in text(wizard, "#choose-error")
        assert wizard.query_one("#folder", Input).value == str(tmp_path / "nowhere")
        await click(pilot, "#quit")
    assert app.result is None


async def test_weights_already_in_the_hf_cache_are_offered_and_converted(hub, data_dir, cache_dir):
    download(plan_download(hub.repo_id, endpoint=hub.url, cache_dir=cache_dir))
    hub.close()  # no network needed from here on
    app = WizardApp(data_dir, hf_cache=cache_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        cached_button = wizard.query_one(f"#{CACHED}")
        await wait_until(pilot, lambda: not cached_button.disabled, "the cache scan")
        assert "1 found" in str(cached_button.label)
        await click(pilot, f"#{CACHED}")
        await pick(pilot, wizard, "#cached", moves=2)  # nothing highlighted -> the blank -> the first model
        shown = str(wizard.query_one("#cached SelectCurrent Static").render())
        assert shown.startswith(f"{hub.repo_id} @ main") and "mixtral" in shown
        await next_to_plan(pilot, wizard)
        assert "Download:" not in text(wizard, "#plan-text")
        path = await start_and_finish(pilot, app)
    assert_installed(data_dir, path, "tiny-mixtral-int4")
    assert json.loads((path / "manifest.json").read_text())["source"]["repo_id"] == hub.repo_id


async def test_demo_choice_builds_or_reuses_the_demo_model(tiny_hf, data_dir):
    """The demo builder has its own tests (and takes a while); an intact demo checkpoint, quantized as the demo
    is built here, is what it hands back without rebuilding, so one is put in place first."""
    model.convert_hf(tiny_hf, paths.models_dir(data_dir) / "demo", quantize=demo_quantization())
    app = WizardApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        wizard = app.wizard
        await click(pilot, f"#{DEMO}")
        assert not wizard.query_one("#options").display  # no token, dtype or name for the demo
        await click(pilot, "#next")
        await wait_until(pilot, lambda: app.result is not WizardApp.NOT_DISMISSED, "the demo model")
    assert app.result == paths.models_dir(data_dir) / "demo"
