"""Headless mode on a real tiny Mixtral (`tiny_ckpt`: random weights, the real Mixtral tokenizer).

The turn loop runs in-process on one shared engine (compiled once); the process-level behaviour
(exit statuses, Ctrl-C, --no-save, one-line errors) runs `python -m chat_app --headless` for real.
"""

import contextlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from chat_app import paths
from chat_app.errors import EXIT_STDOUT_CLOSED
from chat_app.headless import HeadlessChat, HeadlessError
from chat_app.personas import DEFAULT_PERSONA, Persona, builtin_personas
from chat_app.store import Store

REPO = Path(__file__).resolve().parents[1]
GREEDY = Persona("Terse", "You are terse.", temperature=0.0, max_new_tokens=8)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from model.engine import Engine

    return Engine(tiny_ckpt, mesh_shape=(1, 1))


@pytest.fixture
def store(tmp_path):
    with Store(paths.history_path(tmp_path)) as store:
        yield store


def headless_chat(engine, store, **options):
    """A HeadlessChat writing into StringIOs; returns it and its stdout."""
    stdout = io.StringIO()
    options.setdefault("persona", GREEDY)
    chat = HeadlessChat(engine, store, options.pop("persona"), "tiny", stdout=stdout, stderr=io.StringIO(), **options)
    return chat, stdout


def test_plain_turns_stream_to_stdout_and_are_saved_with_the_cache_reused(engine, store):
    chat, stdout = headless_chat(engine, store)
    assert chat.run(["Hello there\n", "   \n", "What is 2+2?\n"]) == 0  # the blank line is no turn
    user1, reply1, user2, reply2 = store.messages(chat.conversation.id)
    assert stdout.getvalue() == reply1.content + "\n" + reply2.content + "\n"
    assert [(m.role, m.content, m.status) for m in (user1, user2)] == [("user", "Hello there", "complete"),
                                                                      ("user", "What is 2+2?", "complete")]
    assert reply1.status == reply2.status == "complete"
    assert 1 <= reply2.stats["generated_tokens"] <= GREEDY.max_new_tokens
    assert reply2.stats["prefilled_tokens"] < reply2.stats["prompt_tokens"]  # the first turn came from the cache
    conversation = store.get_conversation(chat.conversation.id)
    assert (conversation.title, conversation.model, conversation.persona) == ("Hello there", "tiny", GREEDY.snapshot())


def test_the_engine_sees_the_system_prompt_and_the_whole_conversation(engine, store):
    chat, _ = headless_chat(engine, store)
    chat.run(["Name a colour\n", "And another\n"])
    *_, reply = store.messages(chat.conversation.id)
    messages = store.chat_messages(chat.conversation.id)[:-1]
    assert messages[0] == {"role": "system", "content": "You are terse."}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    again = list(engine.generate("fresh-check", messages, GREEDY.sampling()))[-1]  # greedy: same reply
    assert again.text == reply.content
    assert again.prefilled_tokens == again.prompt_tokens == reply.stats["prompt_tokens"]


def test_jsonl_replies_carry_counts_and_timings(engine, store):
    chat, stdout = headless_chat(engine, store, jsonl=True)
    lines = [json.dumps({"role": "user", "content": "Hi"}) + "\n",
             json.dumps({"role": "user", "content": "Tell me\nsomething on two lines"}) + "\n"]
    assert chat.run(lines) == 0
    records = [json.loads(line) for line in stdout.getvalue().splitlines()]
    saved = [m for m in store.messages(chat.conversation.id) if m.role == "assistant"]
    assert [r["text"] for r in records] == [m.content for m in saved]
    for record in records:
        assert record["conversation_id"] == chat.conversation.id
        assert record["finish_reason"] in ("stop", "length")
        assert record["prompt_tokens"] >= record["prefilled_tokens"] >= 1
        assert record["time_to_first_token_s"] > 0 and record["tokens_per_s"] >= 0
        assert 1 <= record["generated_tokens"] <= GREEDY.max_new_tokens
    assert store.messages(chat.conversation.id)[2].content == "Tell me\nsomething on two lines"


@pytest.mark.parametrize("bad_line, problem", [
    ("{not json", "stdin line 2 is not valid JSON"),
    ('["user", "hi"]', 'stdin line 2: expected {"role": "user", "content": "..."}'),
    ('{"role": "system", "content": "obey"}', 'stdin line 2: expected {"role": "user"'),
    ('{"role": "user", "content": 5}', 'stdin line 2: expected {"role": "user"'),
    ('{"role": "user", "content": "  "}', "stdin line 2: the content is empty"),
])
def test_a_bad_jsonl_line_stops_the_run_and_keeps_what_was_saved(engine, store, bad_line, problem):
    chat, stdout = headless_chat(engine, store, jsonl=True)
    lines = [json.dumps({"role": "user", "content": "first"}), bad_line, json.dumps({"role": "user", "content": "third"})]
    with pytest.raises(HeadlessError, match=problem.replace("[", r"\[").replace("{", r"\{")):
        chat.run(lines)
    assert len(stdout.getvalue().splitlines()) == 1  # the first reply was printed
    assert [(m.role, m.status) for m in store.messages(chat.conversation.id)] == [("user", "complete"),
                                                                                   ("assistant", "complete")]


def test_continuing_a_saved_conversation_sends_its_history(engine, store):
    earlier = store.create_conversation("Earlier", "tiny", GREEDY.snapshot())
    store.add_message(earlier.id, "user", "My name is Ada.")
    store.add_message(earlier.id, "assistant", "Noted, Ada.")
    chat, _ = headless_chat(engine, store, conversation=store.get_conversation(earlier.id))
    chat.run(["What is my name?"])
    contents = [m.content for m in store.messages(earlier.id)]
    assert contents[:3] == ["My name is Ada.", "Noted, Ada.", "What is my name?"] and len(contents) == 4
    alone, _ = headless_chat(engine, store)
    alone.run(["What is my name?"])
    prompt_tokens = [store.messages(c.id)[-1].stats["prompt_tokens"] for c in (earlier, alone.conversation)]
    assert prompt_tokens[0] > prompt_tokens[1]


def test_a_closed_stdout_stops_the_reply_and_keeps_it(engine, store):
    read_end, write_end = os.pipe()
    os.close(read_end)
    closed_pipe = open(write_end, "w")
    chat = HeadlessChat(engine, store, GREEDY, "tiny", stdout=closed_pipe, stderr=io.StringIO())
    assert chat.run(["Hello\n", "never answered\n"]) == EXIT_STDOUT_CLOSED
    with contextlib.suppress(BrokenPipeError):  # what is still buffered cannot be written either
        closed_pipe.close()
    [user, reply] = store.messages(chat.conversation.id)
    assert (user.content, reply.status) == ("Hello", "cancelled")


def test_a_message_longer_than_the_context_is_a_clear_error_and_is_not_kept(engine, store):
    """As in the UI: a message that got no reply is taken back, so the conversation can go on."""
    chat, _ = headless_chat(engine, store)
    too_long = "word " * (engine.context_limit + 50)
    with pytest.raises(HeadlessError, match="stdin line 1: the message is too long.*; the message was not saved"):
        chat.run([too_long])
    assert chat.conversation is None and store.list_conversations() == []  # it started a conversation: gone too
    chat.run(["Hello"])
    earlier = chat.conversation
    with pytest.raises(HeadlessError, match="stdin line 1: the message is too long"):
        chat.run([too_long])
    continued, _ = headless_chat(engine, store, conversation=store.get_conversation(earlier.id))
    continued.run(["Still there?"])
    assert [(m.role, m.content, m.status) for m in store.messages(earlier.id)][::2] == [
        ("user", "Hello", "complete"), ("user", "Still there?", "complete")]
    assert len(store.messages(earlier.id)) == 4


# --- the process: python -m chat_app --headless ------------------------------------------------------
@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """One XDG cache dir for every headless process of this module: the compiled executables in it
    let the later processes skip compiling."""
    return tmp_path_factory.mktemp("xdg-cache")


def headless(data_dir, jax_cache, *args, stdin="", launcher=("-m", "chat_app"), **popen):
    """Start `mixtral-chat --headless ARGS --data-dir DATA` (`python LAUNCHER ...`); stdin is written
    and closed."""
    argv = [sys.executable, *launcher, "--headless", "--data-dir", str(data_dir), "--mesh", "1x1", *map(str, args)]
    env = {**os.environ, "XDG_CACHE_HOME": str(jax_cache), "XDG_DATA_HOME": str(data_dir / "xdg")}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, **popen)
    process.stdin.write(stdin)
    process.stdin.close()
    return process


def finish(process, timeout=240):
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.wait(timeout)
    return process.returncode, stdout, stderr


def test_headless_imports_no_ui_and_no_torch_and_a_warm_start_no_flax(tmp_path, jax_cache, tiny_ckpt):
    """What a headless start imports is on its path to the first token: not textual, torch or
    transformers; and once a start has kept its programs and how its model made its arrays, not flax
    either (no model is built), with the same reply."""
    probe = ("import sys\nfrom chat_app.cli import main\nstatus = main(sys.argv[1:])\n"
             "print('imported', sorted(m for m in ('textual', 'torch', 'transformers', 'flax') if m in sys.modules), "
             "file=sys.stderr)\nsys.exit(status)\n")
    runs = [finish(headless(tmp_path, jax_cache, "--model", tiny_ckpt, "--no-save", "--temperature", "0",
                            "--max-new-tokens", "4", stdin="Hello\n", launcher=("-c", probe))) for _ in range(2)]
    for status, stdout, stderr in runs:
        assert status == 0 and stdout.strip(), stderr
    first, warm = (stderr for _, _, stderr in runs)
    assert "imported []" in first or "imported ['flax']" in first, first  # (warm already if a test ran it)
    assert "imported []" in warm, warm
    assert runs[0][1] == runs[1][1]


@pytest.mark.slow
def test_headless_process_saves_then_continues_the_conversation(tmp_path, jax_cache, tiny_ckpt):
    status, stdout, stderr = finish(headless(tmp_path, jax_cache, "--model", tiny_ckpt, "--temperature", "0",
                                             "--max-new-tokens", "6", stdin="Hello\nHow are you?\n"))
    assert status == 0, stderr
    conversation_id = stderr.split("saved as conversation ")[1].split()[0]
    with Store(paths.history_path(tmp_path)) as store:
        messages = store.messages(conversation_id)
        assert stdout == "".join(m.content + "\n" for m in messages if m.role == "assistant")
        assert [m.content for m in messages if m.role == "user"] == ["Hello", "How are you?"]
        assert store.get_conversation(conversation_id).persona["temperature"] == 0.0
    status, stdout, stderr = finish(headless(tmp_path, jax_cache, "--conversation", conversation_id, "--jsonl",
                                             stdin='{"role": "user", "content": "And now?"}\n'))
    assert status == 0, stderr  # the model came from the saved conversation
    record = json.loads(stdout)
    with Store(paths.history_path(tmp_path)) as store:
        messages = store.messages(conversation_id)
    assert [m.content for m in messages[-2:]] == ["And now?", record["text"]]
    assert record["prompt_tokens"] > record["generated_tokens"] and len(messages) == 6


@pytest.mark.parametrize("signum, exit_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["ctrl-c", "kill", "terminal-closed"])
def test_a_stop_signal_keeps_the_partial_reply_and_exits_128_plus_its_number(tmp_path, jax_cache, tiny_ckpt,
                                                                              signum, exit_status):
    process = headless(tmp_path, jax_cache, "--model", tiny_ckpt, "--max-new-tokens", "100000", "--seed", "1",
                       stdin="Talk for a long time\n")
    streamed = process.stdout.read(1)  # blocks until the reply is being streamed
    process.send_signal(signum)
    status, rest, stderr = finish(process)
    assert status == exit_status, stderr
    assert "Traceback" not in stderr
    with Store(paths.history_path(tmp_path)) as store:
        [conversation] = store.list_conversations()
        user, reply = store.messages(conversation.id)
    assert (user.content, reply.status) == ("Talk for a long time", "cancelled")
    assert streamed + rest == reply.content + "\n"  # everything shown was kept
    assert reply.stats["finish_reason"] == "cancelled" and reply.stats["generated_tokens"] >= 1


def test_no_save_writes_no_history_and_a_bad_line_fails_with_its_number(tmp_path, jax_cache, tiny_ckpt):
    process = headless(tmp_path, jax_cache, "--model", tiny_ckpt, "--jsonl", "--no-save", "--max-new-tokens", "4",
                       stdin='{"role": "user", "content": "Hi"}\n{"role": "user", "content": oops}\n')
    status, stdout, stderr = finish(process)
    assert status == 1
    [line] = stderr.strip().splitlines()
    assert line.startswith("mixtral-chat: error: stdin line 2 is not valid JSON: Expecting value")
    assert json.loads(stdout)["generated_tokens"] >= 1  # the first turn was answered
    assert not paths.history_path(tmp_path).exists()


def test_a_broken_override_of_a_builtin_is_warned_about_once_and_the_builtin_answers(tmp_path, jax_cache, tiny_ckpt):
    (tmp_path / "personas").mkdir()
    broken = tmp_path / "personas" / "Assistant.toml"
    broken.write_text('name = "Assistant"\ntemperature = "hot"\n')
    status, stdout, stderr = finish(headless(tmp_path, jax_cache, "--model", tiny_ckpt, "--max-new-tokens", "2",
                                             stdin="Hello\n"))
    assert status == 0 and stdout, stderr
    [warning] = [line for line in stderr.splitlines() if "warning" in line]
    assert warning == (f"mixtral-chat: warning: persona file {broken}: missing 'system_prompt'; the built-in "
                       "persona 'Assistant' is used instead until the file is fixed or deleted")
    with Store(paths.history_path(tmp_path)) as store:
        [conversation] = store.list_conversations()
    [assistant] = [p for p in builtin_personas() if p.name == DEFAULT_PERSONA]
    assert conversation.persona == {**assistant.snapshot(), "max_new_tokens": 2}


@pytest.mark.parametrize("damage, args, problem", [
    ("truncate", [], "model.safetensors"),
    (None, ["--mesh", "3x1"], "must divide the number of experts"),
    (None, ["--mesh", "4x4"], "needs 16 devices"),
])
def test_unloadable_checkpoints_and_meshes_get_one_line(tmp_path, jax_cache, tiny_ckpt, damage, args, problem):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    if damage == "truncate":
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    status, stdout, stderr = finish(headless(tmp_path, jax_cache, "--model", ckpt, *args, stdin="Hi\n"))
    assert status == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("mixtral-chat: error: ") and problem in line
    with sqlite3.connect(paths.history_path(tmp_path)) as history:  # nothing was saved for a run that never ran
        assert history.execute("SELECT count(*) FROM conversations").fetchone()[0] == 0
