"""Chatting in the app on a real tiny Mixtral (random weights, the real Mixtral tokenizer; the
`tiny_ckpt` session fixture of tiny_model.py): send, stream, stop, regenerate, edit and resend,
persona, switching conversations, quitting mid-reply, and what a restarted app shows.

Each app loads and compiles its own engine (the slow part), so each test does a whole session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual import events

import model
from chat_app import paths
from chat_app.app import ChatApp
from chat_app.store import Store
from chat_app.wizard import WizardScreen
from pilot import wait_until
from test_app import persona_snapshot, shown

SIZE = (120, 40)
GREEDY = {"temperature": 0.0}


async def send(pilot, app: ChatApp, text: str) -> None:
    app.chat.prompt.load_text(text)
    await pilot.press("enter")


async def reply_done(pilot, app: ChatApp) -> None:
    await wait_until(pilot, lambda: app.chat.reply is None, "the reply to finish")


async def first_text(pilot, app: ChatApp) -> None:
    await wait_until(pilot, lambda: app.chat.reply is not None and app.chat.reply.recorder.text,
                     "the first text of the reply")


def stored(data_dir: Path, conversation_id: str) -> list:
    with Store(paths.history_path(data_dir)) as store:
        return store.messages(conversation_id)


def prompt_tokens(ckpt: Path, data_dir: Path, conversation_id: str) -> int:
    """Tokens of the conversation as the engine got it for its last reply: everything before it."""
    with Store(paths.history_path(data_dir)) as store:
        messages = store.chat_messages(conversation_id)[:-1]
    return len(model.encode_chat(model.load_tokenizer(ckpt), messages))


@pytest.mark.slow
async def test_send_regenerate_edit_persona_and_switch(tmp_path, tiny_ckpt):
    with Store(paths.history_path(tmp_path)) as store:
        older = store.create_conversation("Older chat", "tiny", persona_snapshot(tmp_path))
        store.add_message(older.id, "user", "An old question")
        store.add_message(older.id, "assistant", "An old answer")
    app = ChatApp(tmp_path, tiny_ckpt, sampling_overrides={**GREEDY, "max_new_tokens": 12},
                  mesh_shape=(1, 1), context_length=512)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await send(pilot, app, "Hello there")
        # Sent: stored and shown at once, the input cleared, the reply on its way.
        assert app.chat.prompt.text == ""
        conversation_id = app.chat.conversation.id
        [user, reply] = stored(tmp_path, conversation_id)
        assert (user.role, user.content, reply.role, reply.status) == ("user", "Hello there", "assistant", "streaming")
        assert app.chat.conversation.title == "Hello there"
        await reply_done(pilot, app)

        [user, reply] = stored(tmp_path, conversation_id)
        assert reply.status == "complete" and reply.content
        assert reply.stats["generated_tokens"] == 12 and reply.stats["finish_reason"] == "length"
        assert reply.stats["prompt_tokens"] == prompt_tokens(tiny_ckpt, tmp_path, conversation_id)
        assert shown(app) == [("user", "Hello there", ""), ("assistant", reply.content, "max tokens reached · "
                              f"12 tokens · {reply.stats['tokens_per_s']:.1f} tok/s")]
        status = app.chat.status
        assert (status.model, status.devices, status.context_limit) == (tiny_ckpt.name, "1 x cpu, mesh 1x1", 512)
        assert status.context_used == reply.stats["context_used"]
        first_reply = reply.content

        # Regenerate: the last reply is replaced; greedy decoding gives the same text again.
        await pilot.press("ctrl+r")
        await reply_done(pilot, app)
        [_, regenerated] = stored(tmp_path, conversation_id)
        assert regenerated.id != reply.id and regenerated.content == first_reply

        # Edit and resend: the last user message and its reply are replaced.
        await pilot.press("ctrl+l")
        assert app.chat.prompt.text == "Hello there"
        await send(pilot, app, "Hello again")
        await reply_done(pilot, app)
        messages = stored(tmp_path, conversation_id)
        assert [(m.role, m.status) for m in messages] == [("user", "complete"), ("assistant", "complete")]
        assert messages[0].content == "Hello again" and messages[1].id > regenerated.id

        # Another persona for this conversation: its system prompt goes to the engine with the
        # whole conversation.
        await pilot.press("f3", "down", "enter")
        await send(pilot, app, "Who are you?")
        await reply_done(pilot, app)
        with Store(paths.history_path(tmp_path)) as store:
            assert store.get_conversation(conversation_id).persona == persona_snapshot(tmp_path, "Menny")
            assert store.chat_messages(conversation_id)[0]["content"].startswith("You are Menny")
        last = stored(tmp_path, conversation_id)[-1]
        assert last.stats["prompt_tokens"] == prompt_tokens(tiny_ckpt, tmp_path, conversation_id)
        assert len(stored(tmp_path, conversation_id)) == 4
        assert app.chat.chat_view.boxes[-1].border_title == "Menny"

        # Switching conversations shows each one's messages.
        await app.chat.open_conversation(older.id)
        assert shown(app) == [("user", "An old question", ""), ("assistant", "An old answer", "")]
        assert app.chat.status.persona == "Assistant"
        await app.chat.open_conversation(conversation_id)
        assert [text for _, text, _ in shown(app)] == [m.content for m in stored(tmp_path, conversation_id)]
        assert app.chat.status.persona == "Menny"


@pytest.mark.slow
async def test_stop_and_quit_keep_partial_replies_and_a_restart_shows_them(tmp_path, endless_ckpt):
    app = ChatApp(tmp_path, endless_ckpt, sampling_overrides={**GREEDY, "max_new_tokens": 100_000},
                  mesh_shape=(1, 1), context_length=32768)
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


async def test_a_model_that_cannot_load_is_reported_and_the_prompt_kept(tmp_path, tiny_ckpt):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    data_dir = tmp_path / "data"
    app = ChatApp(data_dir, broken, mesh_shape=(1, 1))
    async with app.run_test(size=SIZE) as pilot:
        # Sent before or after the load fails (a race the user cannot see): either way the prompt
        # ends up back in the input and nothing is stored.
        await send(pilot, app, "Hello?")
        await wait_until(pilot, lambda: app.chat.engine_error is not None and app.chat.reply is None,
                         "the load to fail")
        assert app.chat.prompt.text == "Hello?"
        assert app.chat.status.activity == "the model failed to load"
        assert any(str(broken) in n.message for n in app._notifications)
        await send(pilot, app, "Hello?")
        assert app.chat.prompt.text == "Hello?"
        assert app.chat.conversation is None
    with Store(paths.history_path(data_dir)) as store:
        assert store.list_conversations() == []


async def test_first_run_wizard_hands_over_the_model_it_set_up(tmp_path, tiny_ckpt):
    app = ChatApp(tmp_path, None, mesh_shape=(1, 1), open_wizard=True)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, WizardScreen) and app.worker is None
        app.screen.dismiss(tiny_ckpt)  # what the wizard does once the model is ready
        await wait_until(pilot, lambda: app.chat.engine_ready, "the model to load")
        assert app.screen is app.chat
        assert (app.chat.status.model, app.chat.status.devices) == (tiny_ckpt.name, "1 x cpu, mesh 1x1")


async def test_keys_typed_fast_are_sent_whole_and_in_order(tmp_path, tiny_ckpt):
    """A burst of keys (a fast typist, a paste, a script) reaches the prompt in order: Enter sends
    everything typed before it and Ctrl+J breaks the line where it was typed. A remapped send key
    works the same way."""
    paths.settings_path(tmp_path).write_text('[keys]\n"prompt.send" = "ctrl+s"\n')
    app = ChatApp(tmp_path, tiny_ckpt, sampling_overrides={**GREEDY, "max_new_tokens": 4},
                  mesh_shape=(1, 1), context_length=512)
    async with app.run_test(size=SIZE) as pilot:
        burst = [*"hello", "ctrl+j", *"world", "enter", *"again", "ctrl+s", *"next"]
        for key in burst:  # posted at once, as a terminal delivers a paste: nothing waits in between
            app.post_message(events.Key(key, key if len(key) == 1 else None))
        await wait_until(pilot, lambda: app.chat.conversation is not None and app.chat.reply is None
                         and len(stored(tmp_path, app.chat.conversation.id)) == 2, "the reply")
        [sent, _] = stored(tmp_path, app.chat.conversation.id)
        assert sent.content == "hello\nworld\nagain"  # Enter is a newline now that ctrl+s sends
        await wait_until(pilot, lambda: app.chat.prompt.text == "next", "the keys after the send")
