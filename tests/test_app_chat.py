"""Chatting in the app end to end, on a real tiny Mixtral (random weights, the real Mixtral tokenizer;
the `tiny_ckpt` session fixture of tiny_model.py): send, stream, regenerate, edit and resend, persona,
switching conversations; and a checkpoint that cannot load.

Each app loads and compiles its own engine (the slow part), so each test does a whole session. The
rest of a turn's life in the UI (stop, failure, context trimming, quitting mid-reply, ...) is tested
fast on a scripted engine in test_app_turns.py.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import model
from chat_app import paths
from chat_app.app import ChatApp
from chat_app.engine_factory import engine_factory
from chat_app.store import Store
from pilot import reply_done, send, stored, wait_until
from test_app import persona_snapshot, shown

SIZE = (120, 40)
GREEDY = {"temperature": 0.0}


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
    first_turn = threading.Event()  # the first reply waits until the test has looked at what was stored
    real_engine = engine_factory(mesh_shape=(1, 1), context_length=512)

    def open_engine(ckpt_dir, on_progress):
        engine = real_engine(ckpt_dir, on_progress)
        generate = engine.generate

        def held_generate(*args, **kwargs):
            first_turn.wait(60)
            yield from generate(*args, **kwargs)

        engine.generate = held_generate
        return engine

    app = ChatApp(tmp_path, tiny_ckpt, sampling_overrides={**GREEDY, "max_new_tokens": 12}, open_engine=open_engine)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("ctrl+n")
        await send(pilot, app, "Hello there")
        # Sent: stored and shown at once, the input cleared, the reply on its way.
        assert app.chat.prompt.text == ""
        conversation_id = app.chat.conversation.id
        [user, reply] = stored(tmp_path, conversation_id)
        assert (user.role, user.content, reply.role, reply.status) == ("user", "Hello there", "assistant", "streaming")
        assert app.chat.conversation.title == "Hello there"
        first_turn.set()
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


async def test_a_model_that_cannot_load_is_reported_and_the_prompt_kept(tmp_path, tiny_ckpt):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    data_dir = tmp_path / "data"
    app = ChatApp(data_dir, broken, open_engine=engine_factory(mesh_shape=(1, 1)))
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
