"""The chat history store on real SQLite files: contents, search, export, migrations, damaged and
newer files, threads, and a writer process killed with SIGKILL in the middle of a reply."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chat_app.store import (MIGRATIONS, SCHEMA_VERSION, DatabaseCorrupt, ReplyRecorder, SchemaTooNew, Store,
                            StoreError, move_aside)

REPO = Path(__file__).resolve().parents[1]
PERSONA = {"name": "Menny", "system_prompt": "Be snarky.", "temperature": 0.9, "top_p": 0.95, "top_k": 0,
           "max_new_tokens": 64}


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "history.sqlite3"


@pytest.fixture
def store(db_path):
    with Store(db_path) as store:
        yield store


def test_conversations_round_trip_through_the_file(db_path):
    with Store(db_path) as store:
        first = store.create_conversation("Capitals", "demo", PERSONA)
        second = store.create_conversation("Recipes", "mixtral", {**PERSONA, "name": "Assistant"})
        store.add_message(first.id, "user", "What is the capital of France?")
        store.rename_conversation(second.id, "Soup recipes")
        store.set_persona(second.id, {**PERSONA, "temperature": 0.1})
    with Store(db_path) as store:  # reopened: everything came from the file
        listed = store.list_conversations()
        assert [c.title for c in listed] == ["Soup recipes", "Capitals"]  # most recently updated first
        assert listed[0].persona["temperature"] == 0.1
        assert store.get_conversation(first.id).persona == PERSONA
        assert store.get_conversation(first.id).model == "demo"
        store.add_message(first.id, "assistant", "Paris.")  # a new message moves its conversation up
        assert [c.title for c in store.list_conversations()] == ["Capitals", "Soup recipes"]
        store.delete_conversation(second.id)
        assert [c.id for c in store.list_conversations()] == [first.id]
        assert [m.content for m in store.messages(first.id)] == ["What is the capital of France?", "Paris."]


def test_file_is_in_wal_mode_with_foreign_keys_cascading(store, db_path):
    conversation = store.create_conversation("t", "m", PERSONA)
    store.add_message(conversation.id, "user", "hi")
    with sqlite3.connect(db_path) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.delete_conversation(conversation.id)
    with sqlite3.connect(db_path) as other:
        assert other.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_unknown_ids_and_bad_values_are_clear_errors(store):
    conversation = store.create_conversation("t", "m", PERSONA)
    with pytest.raises(StoreError, match="no conversation with id 'nope'"):
        store.get_conversation("nope")
    with pytest.raises(StoreError, match="no conversation"):
        store.add_message("nope", "user", "hi")
    with pytest.raises(StoreError, match="no conversation"):
        store.messages("nope")
    with pytest.raises(StoreError, match="no conversation"):
        store.rename_conversation("nope", "x")
    with pytest.raises(StoreError, match="no conversation"):
        store.delete_conversation("nope")
    with pytest.raises(StoreError, match="role must be one of system, user, assistant, got 'robot'"):
        store.add_message(conversation.id, "robot", "hi")
    with pytest.raises(StoreError, match="status must be one of"):
        store.add_message(conversation.id, "user", "hi", status="done")
    with pytest.raises(StoreError, match="no message with id 999"):
        store.update_message(999, "x")
    assert store.messages(conversation.id) == []  # nothing half-written by the failures


def test_reply_saved_incrementally_then_completed_with_stats(store):
    conversation = store.create_conversation("t", "m", PERSONA)
    user = store.add_message(conversation.id, "user", "Tell me a story")
    reply = store.add_message(conversation.id, "assistant", "", status="streaming")
    store.update_message(reply.id, "Once upon")
    assert store.messages(conversation.id)[-1].status == "streaming"
    assert store.messages(conversation.id)[-1].content == "Once upon"
    store.update_message(reply.id, "Once upon a time.", status="complete", stats={"generated_tokens": 5})
    saved = store.messages(conversation.id)
    assert [m.id for m in saved] == [user.id, reply.id]
    assert (saved[1].content, saved[1].status, saved[1].stats) == ("Once upon a time.", "complete",
                                                                   {"generated_tokens": 5})
    store.update_message(reply.id, "Once upon a time. The end.")  # status and stats kept when not given
    assert store.messages(conversation.id)[1].status == "complete"
    assert store.messages(conversation.id)[1].stats == {"generated_tokens": 5}


def test_reply_recorder_saves_at_most_once_per_interval():
    now = [100.0]
    with Store.in_memory() as store:
        conversation = store.create_conversation("t", "m", PERSONA)
        recorder = store.start_reply(conversation.id)
        recorder = ReplyRecorder(store, recorder.message_id, save_interval_s=1.0, clock=lambda: now[0])

        def saved():
            return store.messages(conversation.id)[-1]

        recorder.append("Hel")
        now[0] += 0.5
        recorder.append("lo")
        assert saved().content == "" and recorder.saved_chars == 0  # within the interval: not yet
        now[0] += 0.6
        recorder.append(" there")
        assert (saved().content, saved().status) == ("Hello there", "streaming")
        assert recorder.saved_chars == len("Hello there")
        recorder.append(", frie")
        recorder.finish("cancelled", stats={"generated_tokens": 4})
        assert (saved().content, saved().status, saved().stats) == ("Hello there, frie", "cancelled",
                                                                    {"generated_tokens": 4})


def test_delete_messages_from_cuts_the_tail_of_one_conversation_only(store):
    a = store.create_conversation("a", "m", PERSONA)
    b = store.create_conversation("b", "m", PERSONA)
    ids = [store.add_message(a.id, role, text).id
           for role, text in [("user", "1"), ("assistant", "2"), ("user", "3"), ("assistant", "4")]]
    store.add_message(b.id, "user", "other")
    store.delete_messages_from(a.id, ids[2])  # edit-and-resend of the second user message
    assert [m.content for m in store.messages(a.id)] == ["1", "2"]
    assert [m.content for m in store.messages(b.id)] == ["other"]
    with pytest.raises(StoreError, match="has no message"):
        store.delete_messages_from(b.id, ids[0])  # a message of another conversation
    assert [m.content for m in store.messages(a.id)] == ["1", "2"]


def test_chat_messages_give_the_engine_system_prompt_and_usable_turns(store):
    conversation = store.create_conversation("t", "m", PERSONA)
    store.add_message(conversation.id, "user", "one")
    store.add_message(conversation.id, "assistant", "half a rep", status="cancelled")
    store.add_message(conversation.id, "user", "two")
    store.add_message(conversation.id, "assistant", "boom", status="error")
    store.add_message(conversation.id, "user", "three")
    assert store.chat_messages(conversation.id) == [
        {"role": "system", "content": "Be snarky."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "half a rep"},
        {"role": "user", "content": "two"},
        {"role": "user", "content": "three"},
    ]
    store.set_persona(conversation.id, {**PERSONA, "system_prompt": ""})
    assert store.chat_messages(conversation.id)[0] == {"role": "user", "content": "one"}


def test_search_finds_titles_and_messages_with_highlighted_snippets(store):
    paris = store.create_conversation("Trip to Paris", "m", PERSONA)
    soup = store.create_conversation("Soup", "m", PERSONA)
    store.add_message(paris.id, "user", "Which museums should I visit in Paris?")
    answer = store.add_message(soup.id, "assistant", "A café in Paris serves great onion soup.")
    hits = store.search("paris")
    assert hits[0].message_id is None and hits[0].conversation_id == paris.id  # the title hit comes first
    assert {(h.conversation_id, h.message_id) for h in hits[1:]} == {
        (paris.id, store.messages(paris.id)[0].id), (soup.id, answer.id)}
    for hit in hits:
        assert [hit.snippet[s:e] for s, e in hit.highlights] == ["Paris"]
    assert hits[0].conversation_title == "Trip to Paris"
    # prefixes (search while typing), every word must match, accents ignored
    assert {h.message_id for h in store.search("muse")} == {store.messages(paris.id)[0].id}
    assert [h.message_id for h in store.search("onion paris")] == [answer.id]
    assert [h.message_id for h in store.search("cafe")] == [answer.id]
    assert store.search("onion museums") == []


def test_search_follows_edits_renames_and_deletes(store):
    conversation = store.create_conversation("Old title", "m", PERSONA)
    message = store.add_message(conversation.id, "assistant", "", status="streaming")
    store.update_message(message.id, "a streamed reply about volcanoes")
    assert [h.message_id for h in store.search("volcano")] == [message.id]
    store.update_message(message.id, "about glaciers instead")
    assert store.search("volcano") == []
    store.rename_conversation(conversation.id, "Ice")
    assert store.search("old") == [] and [h.conversation_title for h in store.search("ice")] == ["Ice"]
    store.delete_conversation(conversation.id)
    assert store.search("glaciers") == [] and store.search("ice") == []


@pytest.mark.parametrize("query", ['"', 'AND', 'NEAR(', '*', 'a OR', 'c++ "quoted', "title:x", "   ", "-", "^x"])
def test_search_takes_any_typed_text_without_fts_syntax_errors(store, query):
    conversation = store.create_conversation("c++ notes AND more", "m", PERSONA)
    store.add_message(conversation.id, "user", 'say "quoted" NEAR the title: x')
    assert isinstance(store.search(query), list)


def test_export_markdown_and_json(store):
    conversation = store.create_conversation("Greetings", "demo", PERSONA)
    store.add_message(conversation.id, "user", "Hi!")
    reply = store.add_message(conversation.id, "assistant", "Ugh, **hi**.")
    store.update_message(reply.id, "Ugh, **hi**.", stats={"generated_tokens": 4})
    store.add_message(conversation.id, "user", "Tell me more")
    store.add_message(conversation.id, "assistant", "No way", status="cancelled")
    markdown = store.export_markdown(conversation.id)
    assert markdown.startswith("# Greetings\n")
    assert "Model: demo · Persona: Menny" in markdown
    assert "## System\n\nBe snarky." in markdown
    assert markdown.index("## You\n\nHi!") < markdown.index("## Menny\n\nUgh, **hi**.") < markdown.index("No way")
    assert "No way\n\n*(stopped)*" in markdown
    exported = store.export_json(conversation.id)
    assert json.loads(json.dumps(exported)) == exported  # plain JSON
    assert exported["title"] == "Greetings" and exported["persona"] == PERSONA
    assert [(m["role"], m["content"], m["status"]) for m in exported["messages"]] == [
        ("user", "Hi!", "complete"), ("assistant", "Ugh, **hi**.", "complete"),
        ("user", "Tell me more", "complete"), ("assistant", "No way", "cancelled")]
    assert exported["messages"][1]["stats"] == {"generated_tokens": 4}


def test_an_older_schema_is_migrated_and_its_data_kept(db_path):
    old = sqlite3.connect(db_path)
    old.executescript(MIGRATIONS[0])
    old.execute("PRAGMA user_version = 1")
    old.execute("INSERT INTO conversations VALUES ('c1', 'Old chat about llamas', 'demo', ?, 1.0, 2.0)",
                (json.dumps(PERSONA),))
    old.execute("INSERT INTO messages (conversation_id, role, content, status, created_at) "
                "VALUES ('c1', 'user', 'Do alpacas spit?', 'complete', 1.5)")
    old.commit()
    old.close()
    with Store(db_path) as store:
        assert store.get_conversation("c1").title == "Old chat about llamas"
        assert [m.content for m in store.messages("c1")] == ["Do alpacas spit?"]
        assert [h.message_id for h in store.search("alpacas")] == [store.messages("c1")[0].id]  # indexed
        assert [h.conversation_id for h in store.search("llamas")] == ["c1"]
    with sqlite3.connect(db_path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_file_from_a_newer_version_is_refused_untouched(db_path):
    with Store(db_path) as store:
        store.create_conversation("t", "m", PERSONA)
    with sqlite3.connect(db_path) as newer:
        newer.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    newer.close()
    before = db_path.read_bytes()
    with pytest.raises(SchemaTooNew, match=f"newer mixtral-chat.*schema version {SCHEMA_VERSION + 1}.*not been changed"):
        Store(db_path)
    assert db_path.read_bytes() == before


def test_a_damaged_file_is_refused_untouched_and_can_be_moved_aside_on_request(db_path):
    db_path.write_bytes(b"these are not the bytes of an SQLite database" * 100)
    before = db_path.read_bytes()
    with pytest.raises(DatabaseCorrupt) as refused:
        Store(db_path)
    assert str(db_path) in str(refused.value) and "mv " in str(refused.value)
    assert refused.value.path == db_path
    assert db_path.read_bytes() == before
    moved = move_aside(db_path)
    assert moved.read_bytes() == before and not db_path.exists()
    with Store(db_path) as fresh:
        assert fresh.list_conversations() == []


def test_a_file_with_damaged_pages_is_refused_untouched(db_path):
    with Store(db_path) as store:
        for i in range(40):
            conversation = store.create_conversation(f"chat {i}", "m", PERSONA)
            store.add_message(conversation.id, "user", f"message {i} " * 200)
    page_size = 4096
    data = bytearray(db_path.read_bytes())
    assert len(data) > 8 * page_size
    data[3 * page_size:6 * page_size] = b"\xa5" * (3 * page_size)  # scribble over whole pages
    db_path.write_bytes(bytes(data))
    with pytest.raises(DatabaseCorrupt, match="damaged"):
        Store(db_path)
    assert db_path.read_bytes() == bytes(data)


def test_another_programs_sqlite_file_is_not_adopted(db_path):
    with sqlite3.connect(db_path) as other:
        other.execute("CREATE TABLE accounts (id INTEGER, balance REAL)")
    other.close()
    before = db_path.read_bytes()
    with pytest.raises(DatabaseCorrupt, match="another program"):
        Store(db_path)
    assert db_path.read_bytes() == before


def test_ui_thread_reads_while_a_worker_thread_streams(store):
    conversation = store.create_conversation("t", "m", PERSONA)
    errors = []

    def worker():
        try:
            for turn in range(20):
                store.add_message(conversation.id, "user", f"question {turn}")
                reply = store.start_reply(conversation.id, save_interval_s=0)
                for token in range(10):
                    reply.append(f"t{token} ")
                reply.finish("complete")
        except Exception as e:  # reported below: an exception on a thread would otherwise vanish
            errors.append(e)

    thread = threading.Thread(target=worker)
    thread.start()
    while thread.is_alive():
        store.list_conversations()
        store.messages(conversation.id)
        store.search("t5")
    thread.join()
    assert errors == []
    messages = store.messages(conversation.id)
    assert len(messages) == 40 and all(m.status == "complete" for m in messages)
    assert messages[-1].content == "".join(f"t{token} " for token in range(10))


_KILLED_WRITER = """
import sys
from chat_app.store import Store
store = Store(sys.argv[1])
conversation = store.create_conversation("Doomed chat", "demo", {"name": "Assistant", "system_prompt": ""})
store.add_message(conversation.id, "user", "Count for me")
reply = store.start_reply(conversation.id, save_interval_s=float(sys.argv[2]))
print("conversation", conversation.id, flush=True)
reported = 0
for i in range(10**9):
    reply.append(f"{i} ")
    if reply.saved_chars != reported:
        reported = reply.saved_chars
        print("saved", reported, flush=True)
"""


@pytest.mark.parametrize("save_interval_s", [0.0, 0.05])
def test_a_writer_killed_mid_reply_loses_only_unsaved_text(db_path, save_interval_s):
    with Store(db_path) as store:  # an earlier conversation, which must survive
        earlier = store.create_conversation("Earlier", "demo", PERSONA)
        store.add_message(earlier.id, "user", "still here?")
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(db_path), str(save_interval_s)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        conversation_id = writer.stdout.readline().split()[1]
        saves = [int(writer.stdout.readline().split()[1]) for _ in range(20)]
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    finally:
        writer.kill()
    assert writer.returncode == -signal.SIGKILL
    with sqlite3.connect(db_path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with Store(db_path) as store:
        assert store.get_conversation(conversation_id).title == "Doomed chat"
        user, reply = store.messages(conversation_id)
        assert (user.content, reply.role, reply.status) == ("Count for me", "assistant", "streaming")
        numbers = reply.content.split(" ")  # a clean prefix of what was generated: "0 1 2 ... n "
        assert numbers[-1] == "" and numbers[:-1] == [str(i) for i in range(len(numbers) - 1)]
        assert len(reply.content) >= saves[-1]  # everything reported saved survived the kill
        assert [m.content for m in store.messages(earlier.id)] == ["still here?"]
        store.update_message(reply.id, reply.content, status="cancelled")  # the file is writable again
