"""The Textual app without a model: history, sidebar, dialogs, personas, keys, start-up.

Every test drives a real `ChatApp` with Pilot over a real data dir (SQLite history written by the
real `Store`, persona TOML files). The turns that need a model are in test_app_chat.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from textual.widgets import Input, Label, TextArea

from chat_app import paths
from chat_app.app import ChatApp, load_keymap
from chat_app.personas import PersonaLibrary
from chat_app.screens.confirm import ConfirmScreen
from chat_app.screens.persona_editor import PersonaEditorScreen
from chat_app.screens.personas import PersonaScreen
from chat_app.screens.text_prompt import TextPromptScreen
from chat_app.store import Store

SIZE = (120, 40)


def persona_snapshot(data_dir: Path, name: str = "Assistant") -> dict:
    return PersonaLibrary(paths.personas_dir(data_dir)).get(name).snapshot()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir with two conversations: "Capital cities" (older) and "Rust lifetimes" (newer,
    whose last reply was stopped by the user, and one left "streaming" by a killed app)."""
    with Store(paths.history_path(tmp_path)) as store:
        capitals = store.create_conversation("Capital cities", "tiny", persona_snapshot(tmp_path))
        store.add_message(capitals.id, "user", "What is the capital of France?")
        store.add_message(capitals.id, "assistant", "**Paris**, of course.")
        rust = store.create_conversation("Rust lifetimes", "tiny", persona_snapshot(tmp_path, "Menny"))
        store.add_message(rust.id, "user", "Explain lifetimes")
        store.add_message(rust.id, "assistant", "Ugh. Fine. A lifetime is", status="cancelled")
        store.add_message(rust.id, "user", "Go on")
        store.add_message(rust.id, "assistant", "So basically the borrow", status="streaming")
    return tmp_path


def conversation_ids(data_dir: Path) -> dict[str, str]:
    with Store(paths.history_path(data_dir)) as store:
        return {c.title: c.id for c in store.list_conversations()}


def notifications(app: ChatApp) -> list[str]:
    return [notification.message for notification in app._notifications]


def shown(app: ChatApp) -> list[tuple[str, str, str]]:
    """(role, text, note) of each message on screen."""
    return [(box.role, box.text, str(box.border_subtitle or "")) for box in app.chat.chat_view.boxes]


def dialog_error(app: ChatApp) -> str:
    return str(app.screen.query_one(".error", Label).content)


async def test_start_shows_latest_conversation_and_history(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        ids = conversation_ids(data_dir)
        assert app.chat.conversation_list.conversation_ids == [ids["Rust lifetimes"], ids["Capital cities"]]
        assert app.chat.conversation.title == "Rust lifetimes"
        assert shown(app) == [
            ("user", "Explain lifetimes", ""),
            ("assistant", "Ugh. Fine. A lifetime is", "stopped"),
            ("user", "Go on", ""),
            ("assistant", "So basically the borrow", "interrupted"),
        ]
        assert app.chat.chat_view.boxes[1].border_title == "Menny"
        assert app.chat.status.persona == "Menny"
        assert app.focused is app.chat.prompt

        app.chat.conversation_list.focus()
        await pilot.press("down", "enter")
        await pilot.pause()
        assert app.chat.conversation.title == "Capital cities"
        assert shown(app) == [("user", "What is the capital of France?", ""), ("assistant", "**Paris**, of course.", "")]
        assert app.chat.status.persona == "Assistant"


async def test_start_with_empty_history_offers_a_new_conversation(tmp_path):
    app = ChatApp(tmp_path)
    async with app.run_test(size=SIZE):
        assert app.chat.conversation is None
        assert app.chat.chat_view.boxes == []
        assert app.chat.conversation_list.conversation_ids == []
        assert (tmp_path / "history.sqlite3").exists()


def test_importing_and_starting_the_app_does_not_import_jax(tmp_path):
    """The UI must be up before jax is imported (that happens on the engine worker's thread)."""
    script = f"""
import asyncio, sys
from pathlib import Path
from chat_app.app import ChatApp
assert "jax" not in sys.modules, "importing chat_app.app imported jax"
async def main():
    app = ChatApp(Path({str(tmp_path)!r}))
    async with app.run_test() as pilot:
        await pilot.pause()
asyncio.run(main())
assert "jax" not in sys.modules, "starting the app imported jax"
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


async def test_new_conversation_clears_the_view(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        assert app.chat.conversation is None
        assert app.chat.chat_view.boxes == []
        assert app.focused is app.chat.prompt
        await pilot.press("f2")  # nothing to rename yet: no dialog, a hint
        assert not isinstance(app.screen, TextPromptScreen)


async def test_rename_conversation(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f2")
        assert isinstance(app.screen, TextPromptScreen)
        field = app.screen.query_one(Input)
        assert field.value == "Rust lifetimes"
        field.value = "   "
        await pilot.press("enter")
        assert isinstance(app.screen, TextPromptScreen), "a blank title is refused"
        assert "Please type something" in dialog_error(app)
        field.value = "Borrow checker"
        await pilot.press("enter")
        assert not isinstance(app.screen, TextPromptScreen)
        assert app.chat.conversation.title == "Borrow checker"
        assert set(conversation_ids(data_dir)) == {"Borrow checker", "Capital cities"}
        options = app.chat.conversation_list
        assert "Borrow checker" in str(options.get_option_at_index(0).prompt)


async def test_delete_conversation_asks_first(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f8")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("enter")  # the focused button is Cancel: a stray Enter deletes nothing
        assert set(conversation_ids(data_dir)) == {"Rust lifetimes", "Capital cities"}
        await pilot.press("f8", "escape")
        assert set(conversation_ids(data_dir)) == {"Rust lifetimes", "Capital cities"}

        await pilot.press("f8")
        await pilot.click("#confirm")
        await pilot.pause()
        assert set(conversation_ids(data_dir)) == {"Capital cities"}
        assert app.chat.conversation is None
        assert app.chat.conversation_list.conversation_ids == [conversation_ids(data_dir)["Capital cities"]]


async def test_search_finds_messages_and_opens_the_conversation(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+f")
        assert app.focused.id == "search"
        await pilot.press(*"pari")
        await pilot.pause()
        hits = app.chat.conversation_list
        assert hits.conversation_ids == [conversation_ids(data_dir)["Capital cities"]]
        assert "Paris" in str(hits.get_option_at_index(0).prompt)

        await pilot.press("enter")  # from the search box to the hits
        assert app.focused is hits
        await pilot.press("enter")
        await pilot.pause()
        assert app.chat.conversation.title == "Capital cities"
        assert app.focused is app.chat.prompt

        await pilot.press("ctrl+f", "escape")  # Esc leaves the search: the full list is back
        assert app.query_one("#search", Input).value == ""
        assert len(app.chat.conversation_list.conversation_ids) == 2

        await pilot.press("ctrl+f", *"nothing-like-this")
        await pilot.pause()
        assert app.chat.conversation_list.conversation_ids == []


async def test_export_markdown_and_json(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        rust_id = app.chat.conversation.id
        await pilot.press("f4")
        field = app.screen.query_one(Input)
        assert field.value.endswith("Rust-lifetimes.md")
        field.value = str(out / "chat.md")
        await pilot.press("enter")
        assert not isinstance(app.screen, TextPromptScreen)

        await app.run_action("app.command_palette")
        await pilot.press(*"Export as JSON", "enter")
        await pilot.pause()
        field = app.screen.query_one(Input)
        assert field.value.endswith("Rust-lifetimes.json")
        field.value = str(out / "chat.json")
        await pilot.press("enter")

        await pilot.press("f4")
        app.screen.query_one(Input).value = str(out / "chat.md")
        await pilot.press("enter")
        assert "already exists" in dialog_error(app), "an existing file is never overwritten"
        app.screen.query_one(Input).value = str(out / "no-such-folder" / "chat.md")
        await pilot.press("enter")
        assert "does not exist" in dialog_error(app)
        await pilot.press("escape")

    with Store(paths.history_path(data_dir)) as store:
        assert (out / "chat.md").read_text(encoding="utf-8") == store.export_markdown(rust_id)
        assert json.loads((out / "chat.json").read_text(encoding="utf-8")) == store.export_json(rust_id)
    assert "So basically the borrow" in (out / "chat.md").read_text(encoding="utf-8")


async def test_choose_persona_for_the_conversation(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        capitals = conversation_ids(data_dir)["Capital cities"]
        await app.chat.open_conversation(capitals)
        await pilot.press("f3")
        assert isinstance(app.screen, PersonaScreen)
        names = [p.name for p in app.screen.personas]
        assert names[:2] == ["Assistant", "Menny"]
        assert app.screen.highlighted.name == "Assistant"
        await pilot.press("down", "enter")
        assert not isinstance(app.screen, PersonaScreen)
        assert app.chat.status.persona == "Menny"
        with Store(paths.history_path(data_dir)) as store:
            snapshot = store.get_conversation(capitals).persona
        assert snapshot == persona_snapshot(data_dir, "Menny")
        assert app.chat.persona.name == "Menny", "new conversations get the persona chosen last"


async def test_persona_editor_creates_edits_and_deletes(data_dir):
    app = ChatApp(data_dir)
    personas_dir = paths.personas_dir(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "n")
        editor = app.screen
        assert isinstance(editor, PersonaEditorScreen)
        editor.query_one("#name", Input).value = "Pirate"
        editor.query_one("#system_prompt", TextArea).text = "You are a pirate.\nSay arr."
        editor.query_one("#temperature", Input).value = "hot"
        await pilot.press("ctrl+s")
        assert app.screen is editor, "an invalid form is not saved"
        assert "temperature must be" in dialog_error(app)
        editor.query_one("#temperature", Input).value = "3"
        await pilot.press("ctrl+s")
        assert "temperature must be between 0 and 2" in dialog_error(app)
        assert not personas_dir.exists() or not list(personas_dir.iterdir())
        editor.query_one("#temperature", Input).value = "0.2"
        editor.query_one("#top_k", Input).value = "40"
        await pilot.press("ctrl+s")

        assert isinstance(app.screen, PersonaScreen)
        saved = tomllib.loads((personas_dir / "Pirate.toml").read_text(encoding="utf-8"))
        assert saved["system_prompt"] == "You are a pirate.\nSay arr."
        assert (saved["temperature"], saved["top_k"]) == (0.2, 40)
        assert app.screen.highlighted.name == "Pirate"

        await pilot.press("e")  # rename: the old file goes
        app.screen.query_one("#name", Input).value = "Captain"
        await pilot.press("ctrl+s")
        assert sorted(p.name for p in personas_dir.iterdir()) == ["Captain.toml"]

        await pilot.press("n")  # a new persona may not take an existing name
        app.screen.query_one("#name", Input).value = "menny"
        await pilot.press("ctrl+s")
        assert "already exists" in dialog_error(app)
        await pilot.press("escape")

        await pilot.press("d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.click("#confirm")
        await pilot.pause()
        assert list(personas_dir.iterdir()) == []
        assert [p.name for p in app.screen.personas] == ["Assistant", "Menny"]

        await pilot.press("d")  # built-ins cannot be deleted
        assert isinstance(app.screen, PersonaScreen)
        assert "cannot be deleted" in dialog_error(app)


async def test_persona_import_and_export(data_dir, tmp_path_factory):
    files = tmp_path_factory.mktemp("persona-files")
    (files / "broken.toml").write_text('name = "Broken"\nsystem_prompt = "x"\ntemperature = "very"\n')
    (files / "not-toml.toml").write_text("this is = = not toml")
    (files / "poet.toml").write_text('name = "Poet"\nsystem_prompt = "Answer in verse."\ntop_p = 0.5\n')
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("f3", "i")
        field = app.screen.query_one(Input)
        for bad, problem in (("broken.toml", "temperature must be"), ("not-toml.toml", "not valid TOML"),
                             ("missing.toml", "cannot read")):
            field.value = str(files / bad)
            await pilot.press("enter")
            assert problem in dialog_error(app) and bad in dialog_error(app)
        field.value = str(files / "poet.toml")
        await pilot.press("enter")
        assert isinstance(app.screen, PersonaScreen)
        assert app.screen.highlighted.name == "Poet"
        assert app.screen.highlighted.top_p == 0.5

        await pilot.press("x")
        field = app.screen.query_one(Input)
        assert field.value.endswith("Poet.toml")
        field.value = str(files / "poet.toml")
        await pilot.press("enter")
        assert "already exists" in dialog_error(app)
        field.value = str(files / "exported.toml")
        await pilot.press("enter")
        assert isinstance(app.screen, PersonaScreen)
    assert tomllib.loads((files / "exported.toml").read_text())["system_prompt"] == "Answer in verse."


async def test_prompt_keys_and_a_failed_send_keeps_the_prompt(data_dir):
    app = ChatApp(data_dir)  # no model: sending cannot work
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"one", "ctrl+j", *"two", "shift+enter", *"three")
        assert app.chat.prompt.text == "one\ntwo\nthree"
        await pilot.press("enter")
        assert app.chat.prompt.text == "one\ntwo\nthree", "a failed send keeps the prompt"
        assert any("No model is open" in message for message in notifications(app))
        with Store(paths.history_path(data_dir)) as store:
            assert [m.content for m in store.messages(app.chat.conversation.id)][-1] == "So basically the borrow"

        app.chat.prompt.clear()
        await pilot.press("space", "enter")  # blank: nothing to send
        assert len(notifications(app)) == 1


async def test_edit_last_message_and_cancel(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(*"draft")
        await pilot.press("ctrl+l")
        prompt = app.chat.prompt
        assert prompt.text == "Go on"
        assert prompt.has_class("editing")
        assert "Editing your last message" in str(prompt.border_title)
        await pilot.press("escape")
        assert prompt.text == "draft", "cancelling the edit brings the draft back"
        assert not prompt.has_class("editing")


async def test_copy_message(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+o")
        assert app.clipboard == "So basically the borrow", "the last reply by default"
        app.chat.chat_view.boxes[0].focus()
        await pilot.press("ctrl+o")
        assert app.clipboard == "Explain lifetimes", "the selected message when there is one"


async def test_command_palette_runs_chat_actions(data_dir):
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await app.run_action("app.command_palette")
        await pilot.press(*"Rename", "enter")
        await pilot.pause()
        assert isinstance(app.screen, TextPromptScreen)
        assert app.screen.query_one(Input).value == "Rust lifetimes"


async def test_key_remaps_from_settings(data_dir):
    paths.settings_path(data_dir).write_text('[keys]\nchat.new = "f5"\n"chat.rename" = "f9"\n')
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        assert app.chat.conversation is not None, "ctrl+n was remapped away"
        await pilot.press("f9")
        assert isinstance(app.screen, TextPromptScreen)
        await pilot.press("escape", "f5")
        assert app.chat.conversation is None
        assert notifications(app) == []


def test_bad_key_remaps_are_reported_not_fatal(tmp_path):
    settings = paths.settings_path(tmp_path)
    settings.write_text('[keys]\nchat.new = "f5"\nchat.nope = "f6"\nprompt.send = 3\n')
    keymap, problems = load_keymap(settings)
    assert keymap == {"chat.new": "f5"}
    assert "unknown binding id 'chat.nope'" in problems[0] and "chat.regenerate" in problems[0]
    assert "prompt.send must be a key name" in problems[1]

    settings.write_text("[keys\n")
    keymap, problems = load_keymap(settings)
    assert keymap == {} and "could not be read" in problems[0] and str(settings) in problems[0]


def test_every_screens_bindings_can_be_remapped(tmp_path):
    settings = paths.settings_path(tmp_path)
    settings.write_text('[keys]\nwizard.back = "f9"\npersonas.close = "f8"\nprompt.send = "ctrl+s"\n')
    keymap, problems = load_keymap(settings)
    assert problems == []
    assert keymap == {"wizard.back": "f9", "personas.close": "f8", "prompt.send": "ctrl+s"}


async def test_broken_settings_file_still_starts(data_dir):
    paths.settings_path(data_dir).write_text("not toml at all = =")
    app = ChatApp(data_dir)
    async with app.run_test(size=SIZE):
        assert any("could not be read" in message for message in notifications(app))
        assert app.chat.conversation.title == "Rust lifetimes"
