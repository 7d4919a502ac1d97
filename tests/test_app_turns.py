"""A turn's life in the app, fast: the real `ChatApp`, worker thread and SQLite history, on a scripted
engine (scripted_engine.py) that streams, stops, fails and trims as it is told. Stop, quit mid-reply
and restart, failures with and without text, context trimming, regenerate, compiling, a model that
fails to load, the wizard's hand-over, and keys typed fast. End-to-end turns on a real tiny model
are in test_app_chat.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

from textual import events

from chat_app import paths
from chat_app.app import ChatApp
from chat_app.wizard import WizardScreen
from model.errors import UserError
from pilot import first_text, reply_done, send, stored, wait_until
from scripted_engine import ScriptedEngine, Turn, endless
from test_app import notifications, shown

SIZE = (120, 40)
MODEL = Path("/models/scripted-mixtral")  # never read: the scripted engine only takes its name


def scripted_app(data_dir: Path, engine: ScriptedEngine, **options) -> ChatApp:
    return ChatApp(data_dir, MODEL, open_engine=engine.factory(), **options)


async def test_stop_and_quit_keep_partial_replies_and_a_restart_shows_them(tmp_path):
    engine = ScriptedEngine(then=endless())
    app = scripted_app(tmp_path, engine, sampling_overrides={"max_new_tokens": 100_000})
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Tell me a long story")
        conversation_id = app.chat.conversation.id
        await first_text(pilot, app)
        await pilot.press("escape")  # stop: the text so far is kept
        await reply_done(pilot, app)
        [_, stopped] = stored(tmp_path, conversation_id)
        assert stopped.status == "cancelled" and stopped.content
        assert stopped.stats["finish_reason"] == "cancelled"
        _, text, note = shown(app)[-1]
        assert text == stopped.content and note.startswith("stopped · ")

        # A reply keeps streaming while another conversation is open, and shows again on return.
        await send(pilot, app, "And another one")
        await first_text(pilot, app)
        await pilot.press("ctrl+n")
        assert app.chat.chat_view.boxes == []
        assert str(app.chat.conversation_list.get_option_at_index(0).prompt).startswith("● ")
        await app.chat.open_conversation(conversation_id)
        box = app.chat.chat_view.boxes[-1]
        at_reopen = app.chat.reply.recorder.text
        assert box.streaming and box.text and at_reopen.startswith(box.text)
        await wait_until(pilot, lambda: len(box.text) > len(at_reopen), "the reopened reply to keep streaming")

        # Scrolled up, the view stays put while the reply grows below.
        view = app.chat.chat_view
        await wait_until(pilot, lambda: view.max_scroll_y > 10, "the reply to outgrow the view")
        await pilot.press("ctrl+up")
        scrolled_to, length = view.scroll_y, len(box.text)
        await wait_until(pilot, lambda: len(box.text) > length + 200, "more text")
        assert view.scroll_y == scrolled_to < view.max_scroll_y
        await pilot.press("ctrl+q")  # quit mid-reply

    [_, _, _, partial] = stored(tmp_path, conversation_id)
    assert partial.status == "cancelled", "the partial reply is kept on quit"
    assert partial.content.startswith(at_reopen) and len(partial.content) > len(at_reopen)

    # A restarted app (no model needed to read the history) shows all of it.
    restarted = ChatApp(tmp_path)
    async with restarted.run_test(size=SIZE):
        assert restarted.chat.conversation.id == conversation_id
        assert [(role, text) for role, text, _ in shown(restarted)] == [
            (m.role, m.content) for m in stored(tmp_path, conversation_id)
        ]
        assert [note.split(" · ")[0] for role, _, note in shown(restarted) if role == "assistant"] == [
            "stopped", "stopped"
        ]


async def test_a_failure_keeps_the_text_so_far_and_a_failure_before_any_text_unsends(tmp_path):
    engine = ScriptedEngine([
        Turn(deltas=("Half", " an answer"), error=RuntimeError("the device went away")),
        Turn(deltas=(), error=UserError("your message alone is longer than the context")),
    ])
    app = scripted_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "First question")
        conversation_id = app.chat.conversation.id
        await reply_done(pilot, app)
        [_, failed] = stored(tmp_path, conversation_id)
        assert (failed.status, failed.content) == ("error", "Half an answer")
        assert shown(app)[-1] == ("assistant", "Half an answer", "failed")
        assert "RuntimeError: the device went away" in notifications(app), "a bug is shown with its type"

        # Nothing came back at all: the message goes and its text is back in the input, as if never sent.
        await send(pilot, app, "A very long message")
        await reply_done(pilot, app)
        assert [m.content for m in stored(tmp_path, conversation_id)] == ["First question", "Half an answer"]
        assert app.chat.prompt.text == "A very long message"
        assert "your message alone is longer than the context" in notifications(app), "a user error as it is"
        assert [text for _, text, _ in shown(app)] == ["First question", "Half an answer"]


async def test_a_first_message_that_gets_no_reply_leaves_no_conversation(tmp_path):
    engine = ScriptedEngine([Turn(deltas=(), error=UserError("too long"))])
    app = scripted_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Hello?")
        await reply_done(pilot, app)
        assert app.chat.conversation is None and app.chat.prompt.text == "Hello?"
        assert app.chat.conversation_list.conversation_ids == []


async def test_context_trimming_is_reported_and_the_reply_kept(tmp_path):
    engine = ScriptedEngine([Turn(dropped_messages=4, deltas=("Still", " here"))])
    app = scripted_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Remember everything?")
        await reply_done(pilot, app)
        assert any("its oldest 4 messages were left out" in n for n in notifications(app))
        [_, reply] = stored(tmp_path, app.chat.conversation.id)
        assert (reply.status, reply.content) == ("complete", "Still here")


async def test_regenerate_replaces_the_last_reply_and_asks_again_without_it(tmp_path):
    engine = ScriptedEngine([Turn(deltas=("First",)), Turn(deltas=("Second",), compiling=True)])
    app = scripted_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Say something")
        await reply_done(pilot, app)
        conversation_id = app.chat.conversation.id
        [_, first] = stored(tmp_path, conversation_id)
        await pilot.press("ctrl+r")
        await reply_done(pilot, app)
        [user, second] = stored(tmp_path, conversation_id)
        assert (second.content, second.status) == ("Second", "complete") and second.id != first.id
        assert [text for _, text, _ in shown(app)] == ["Say something", "Second"]
        asked = app.store.chat_messages(conversation_id)[:-1]  # all but the reply
        assert asked[-1] == {"role": "user", "content": "Say something"}
        assert engine.requests == [(conversation_id, asked)] * 2, "the same question again, without the old reply"
        assert app.chat.status.context_used == second.stats["context_used"]


async def test_compiling_shows_until_the_first_text(tmp_path):
    compiled = threading.Event()
    engine = ScriptedEngine([Turn(compiling=True, gate=compiled, deltas=("late",))])
    app = scripted_app(tmp_path, engine)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, app, "Hi")
        await wait_until(pilot, lambda: app.chat.status.activity == "compiling…", "compiling to show")
        box = app.chat.chat_view.boxes[-1]
        assert "compiling the model" in str(box.border_subtitle)
        compiled.set()
        await reply_done(pilot, app)
        assert shown(app)[-1][1] == "late" and app.chat.status.activity == ""


async def test_a_model_that_fails_to_load_answers_every_send(tmp_path):
    engine = ScriptedEngine()
    app = ChatApp(tmp_path, MODEL, open_engine=engine.factory(load_error=UserError("no such device")))
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat.engine_error is not None, "the load to fail")
        assert app.chat.engine_error == "no such device"
        await send(pilot, app, "Hello?")
        assert app.chat.prompt.text == "Hello?" and app.chat.conversation is None
        assert engine.requests == []


async def test_first_run_wizard_hands_over_the_model_it_set_up(tmp_path):
    engine = ScriptedEngine()
    app = ChatApp(tmp_path, None, open_engine=engine.factory(), open_wizard=True)
    installed = tmp_path / "models" / "tiny-mixtral"
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, WizardScreen) and app.worker is None
        app.screen.dismiss(installed)  # what the wizard does once the model is ready
        await wait_until(pilot, lambda: app.chat.engine_ready, "the model to load")
        assert app.screen is app.chat
        assert (app.chat.status.model, app.chat.status.devices) == (installed.name, "1 x cpu, mesh 1x1")


async def test_keys_typed_fast_are_sent_whole_and_in_order(tmp_path):
    """A burst of keys (a fast typist, a paste, a script) reaches the prompt in order: Enter sends
    everything typed before it and Ctrl+J breaks the line where it was typed. A remapped send key
    works the same way."""
    paths.settings_path(tmp_path).write_text('[keys]\n"prompt.send" = "ctrl+s"\n')
    app = scripted_app(tmp_path, ScriptedEngine(), sampling_overrides={"max_new_tokens": 4})
    async with app.run_test(size=SIZE) as pilot:
        burst = [*"hello", "ctrl+j", *"world", "enter", *"again", "ctrl+s", *"next"]
        for key in burst:  # posted at once, as a terminal delivers a paste: nothing waits in between
            app.post_message(events.Key(key, key if len(key) == 1 else None))
        await wait_until(pilot, lambda: app.chat.conversation is not None and app.chat.reply is None
                         and len(stored(tmp_path, app.chat.conversation.id)) == 2, "the reply")
        [sent, _] = stored(tmp_path, app.chat.conversation.id)
        assert sent.content == "hello\nworld\nagain"  # Enter is a newline now that ctrl+s sends
        await wait_until(pilot, lambda: app.chat.prompt.text == "next", "the keys after the send")
