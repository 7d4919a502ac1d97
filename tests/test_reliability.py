"""Damaged models, odd input and hostile storage: each gets one clear line, never a traceback, and never
costs the user data.

Everything is real: checkpoints built by our converter and then damaged on disk, SQLite files, a small
tmpfs that fills up and a read-only bind mount (tests/hostile_storage.py: skipped with the reason where
this machine cannot mount), and the `mixtral-chat` command run as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import model
from chat_app import paths
from chat_app.headless import HeadlessChat, HeadlessError
from chat_app.personas import Persona
from chat_app.store import DiskFull, ReadOnly, ReplyRecorder, Store, StoreError
from model.manifest import VERIFIED, sha256_file
from hostile_storage import fill, read_only, small_tmpfs
from test_cli import assert_one_line_error, install, run_cli
from test_headless import finish, headless
from tiny_model import MIXTRAL_TOKENIZER, flip_byte

GREEDY = Persona("Terse", "You are terse.", temperature=0.0, max_new_tokens=8)
LARGER_TOKENIZER = MIXTRAL_TOKENIZER.with_name("mistral_instruct_tokenizer_240323.model.v3")  # 32768 pieces


def relist(ckpt: Path, name: str) -> None:
    """Update the manifest entry of `name` to the file as it is now (a checkpoint converted before a
    check existed, so its manifest vouches for it)."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def assert_last_line_error(result, *fragments):
    """A failure whose reason is the last line of stderr (after the progress lines of a command that
    had started), with no traceback."""
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mixtral-chat: error: ") and all(f in last for f in fragments), result.stderr


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    from model.engine import Engine

    return Engine(tiny_ckpt, mesh_shape=(1, 1))


# --- 1. sha256 verification ----------------------------------------------------------------------------
def test_a_changed_byte_is_caught_once_per_change_and_names_the_file(tmp_path, tiny_ckpt):
    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "tiny")
    (ckpt / VERIFIED).unlink(missing_ok=True)
    hashed = []
    model.verify(ckpt, on_progress=lambda fraction, what: hashed.append(what))
    assert {"verifying model.safetensors", "verifying tokenizer.model"} <= set(hashed)  # first use: all
    hashed.clear()
    model.verify(ckpt, on_progress=lambda fraction, what: hashed.append(what))
    assert hashed == []  # the warm start hashes nothing: sizes and mtimes are as recorded

    weights = ckpt / "model.safetensors"
    flip_byte(weights, weights.stat().st_size // 2)
    with pytest.raises(model.CheckpointError) as caught:
        model.load(ckpt)
    message = str(caught.value)
    assert "model.safetensors does not match its sha256 in manifest.json" in message
    assert "mixtral-chat setup" in message and "\n" not in message
    flip_byte(weights, weights.stat().st_size // 2)  # repaired: verified again, and passes
    model.verify(ckpt, on_progress=lambda fraction, what: hashed.append(what))
    assert hashed and set(hashed) == {"verifying model.safetensors"}  # only the file that changed


def test_models_verify_and_headless_name_the_damaged_file(tmp_path, tiny_ckpt, jax_cache):
    data_dir = tmp_path / "data"
    install(tiny_ckpt, data_dir, "good")
    bad = install(tiny_ckpt, data_dir, "bad")
    flip_byte(bad / "model.safetensors", (bad / "model.safetensors").stat().st_size // 2)

    result = run_cli("models", "--verify", data_dir=data_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("bad: DAMAGED: checkpoint ") and "model.safetensors does not match" in lines[0]
    assert lines[1].startswith("good: ok (")
    assert run_cli("models", "--verify", "good", data_dir=data_dir).returncode == 0

    status, stdout, stderr = finish(headless(data_dir, jax_cache, "--model", "bad", stdin="Hi\n"))
    assert status == 1 and stdout == ""
    [line] = stderr.strip().splitlines()
    assert line.startswith("mixtral-chat: error: checkpoint ") and "model.safetensors does not match" in line


def test_the_ui_worker_reports_verifying_then_the_damaged_file(tmp_path, tiny_ckpt):
    """What the TUI shows: progress while hashing, then the one-line reason (chat.py shows both)."""
    import queue

    from chat_app.engine_factory import engine_factory
    from chat_app.worker import EngineFailed, EngineLoading, EngineWorker

    ckpt = shutil.copytree(tiny_ckpt, tmp_path / "tiny")
    (ckpt / VERIFIED).unlink(missing_ok=True)
    flip_byte(ckpt / "tokenizer.model", 1000)
    posted = queue.Queue()
    worker = EngineWorker(ckpt, posted.put, engine_factory(mesh_shape=(1, 1)))
    worker.start()
    messages = []
    while not isinstance(message := posted.get(timeout=120), EngineFailed):
        messages.append(message)
    worker.stop(10)
    assert any(isinstance(m, EngineLoading) and m.what.startswith("verifying ") for m in messages)
    assert "tokenizer.model does not match its sha256" in message.error and "\n" not in message.error


# --- 2. manifests of the wrong shape, a tokenizer larger than the model ---------------------------------
@pytest.mark.parametrize("manifest, problem", [
    ('["model.safetensors"]', "a JSON list instead of an object"),
    ('{"files": "x"}', '"files" is not a table of file names'),
    ('{"files": {"model.safetensors": {"sha256": "00"}}}', 'the entry of model.safetensors has no valid "bytes"'),
    ('{"files": {"../../etc/passwd": {"bytes": 1, "sha256": "0"}}}', "is not a file name of the checkpoint"),
])
def test_a_manifest_of_the_wrong_shape_is_a_damaged_checkpoint(tmp_path, tiny_ckpt, jax_cache, manifest, problem):
    data_dir = tmp_path / "data"
    ckpt = install(tiny_ckpt, data_dir)
    (ckpt / "manifest.json").write_text(manifest)
    with pytest.raises(model.CheckpointError, match="manifest.json is damaged"):
        model.verify(ckpt)
    listing = run_cli("models", data_dir=data_dir)
    assert listing.returncode == 0 and "unusable: " in listing.stdout and problem in listing.stdout
    result = run_cli("models", "--verify", "tiny", data_dir=data_dir)
    assert result.returncode == 1 and problem in result.stdout and "Traceback" not in result.stderr


def test_a_tokenizer_larger_than_the_model_is_refused_at_conversion_and_at_load(tmp_path, tiny_hf, tiny_ckpt):
    hf = shutil.copytree(tiny_hf, tmp_path / "hf")
    shutil.copyfile(LARGER_TOKENIZER, hf / "tokenizer.model")
    result = run_cli("convert", hf, tmp_path / "out")
    assert_one_line_error(result, "has 32768 tokens but the model only 32000")
    assert not (tmp_path / "out").exists()

    old = shutil.copytree(tiny_ckpt, tmp_path / "old")  # as converted before the check existed
    shutil.copyfile(LARGER_TOKENIZER, old / "tokenizer.model")
    relist(old, "tokenizer.model")
    from model.engine import Engine

    with pytest.raises(model.CheckpointError, match="has 32768 tokens but the model only 32000"):
        Engine(old, mesh_shape=(1, 1))


# --- 3. stdin that is not valid UTF-8 ------------------------------------------------------------------
def test_bad_bytes_and_lone_surrogates_on_stdin_are_replaced_and_noted(tmp_path, tiny_ckpt, jax_cache):
    lines = [b'{"role": "user", "content": "first"}',
             b'{"role": "user", "content": "bad \xff\xfe bytes"}',
             b'{"role": "user", "content": "lone \\ud800 surrogate"}']
    argv = [sys.executable, "-m", "chat_app", "--headless", "--jsonl", "--data-dir", str(tmp_path), "--mesh", "1x1",
            "--model", str(tiny_ckpt), "--max-new-tokens", "3"]
    result = subprocess.run(argv, input=b"\n".join(lines) + b"\n", capture_output=True, timeout=240,
                            env={**os.environ, "XDG_CACHE_HOME": str(jax_cache)}, cwd=Path(__file__).parents[1])
    stderr = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in stderr, stderr
    assert stderr.count("is not valid UTF-8 text; its bad bytes were replaced by \ufffd") == 2
    assert "stdin line 2" in stderr and "stdin line 3" in stderr
    assert len(result.stdout.decode().splitlines()) == 3  # every turn answered
    with Store(paths.history_path(tmp_path)) as store:
        [conversation] = store.list_conversations()
        users = [m.content for m in store.messages(conversation.id) if m.role == "user"]
    assert users == ["first", "bad \ufffd\ufffd bytes", "lone \ufffd surrogate"]


def test_plain_stdin_with_surrogates_is_replaced_in_process(engine, tmp_path):
    with Store(paths.history_path(tmp_path)) as store:
        stderr = io.StringIO()
        chat = HeadlessChat(engine, store, GREEDY, "tiny", stdout=io.StringIO(), stderr=stderr)
        assert chat.run(["ok\n", "caf\udcc3 \ud83d\n"]) == 0  # what surrogateescape makes of bad bytes
        users = [m.content for m in store.messages(chat.conversation.id) if m.role == "user"]
    assert users == ["ok", "caf\ufffd \ufffd"]
    assert stderr.getvalue().count("stdin line 2 is not valid UTF-8") == 1


# --- 5. a full disk ------------------------------------------------------------------------------------
def test_a_reply_on_a_full_disk_says_so_once_and_is_saved_when_space_returns(tmp_path):
    with small_tmpfs(tmp_path / "disk", 2 << 20) as disk:
        clock = [0.0]
        with Store(disk / "history.sqlite3") as store:
            conversation = store.create_conversation("t", "tiny", GREEDY.snapshot())
            store.add_message(conversation.id, "user", "hi")
            streaming = store.add_message(conversation.id, "assistant", "", status="streaming")
            reply = ReplyRecorder(store, streaming.id, clock=lambda: clock[0])  # a clock stepped by hand
            filler = fill(disk)
            news = []
            for step in range(20):  # a second of text at a time: one save attempt each
                clock[0] += 1.0
                news.append(reply.append("word " * 2000))
            said = [n for n in news if n]
            assert len(said) == 1, "said once, not once a second"
            assert said[0].startswith(f"The reply is not being saved: the disk holding {disk / 'history.sqlite3'} "
                                      "is full (")
            assert "kB needed, 0 B free" in said[0] and "retried every 5 s" in said[0]
            assert isinstance(reply.save_error, DiskFull)
            assert store.messages(conversation.id)[-1].content == ""  # the last save that worked

            filler.unlink()
            clock[0] += 5.0
            assert reply.append("end.") == "The reply is being saved again."
            assert store.messages(conversation.id)[-1].content == reply.text

            filler = fill(disk)
            with pytest.raises(DiskFull, match="is full"):
                reply.finish("complete", text=reply.text + " more" * 5000)
            filler.unlink()
            assert [m.content for m in store.messages(conversation.id)][0] == "hi"  # earlier turns intact


def test_headless_on_a_full_disk_prints_the_reply_and_says_it_was_not_saved(engine, tmp_path):
    class FillingStdout(io.StringIO):
        """stdout that fills the disk when the second reply starts to stream."""
        filled = None

        def write(self, text):
            if self.getvalue().count("\n") == 1 and self.filled is None:
                self.filled = fill(disk)
            return super().write(text)

    with small_tmpfs(tmp_path / "disk", 2 << 20) as disk, Store(disk / "history.sqlite3") as store:
        stdout, stderr = FillingStdout(), io.StringIO()
        chat = HeadlessChat(engine, store, GREEDY, "tiny", stdout=stdout, stderr=stderr)
        with pytest.raises(HeadlessError, match=r"the reply to stdin line 2 was printed but not saved: .*is full"):
            chat.run(["first\n", "second\n"])
        assert len(stdout.getvalue().splitlines()) == 2  # both replies were shown whole
        assert "rollback" not in stderr.getvalue() and len(stderr.getvalue().splitlines()) <= 1
        stdout.filled.unlink()
        first_user, first_reply = store.messages(chat.conversation.id)[:2]
        assert (first_user.content, first_reply.status) == ("first", "complete")


def test_a_new_history_on_a_full_disk_is_one_clear_error(tmp_path):
    with small_tmpfs(tmp_path / "disk", 1 << 20) as disk:
        filler = fill(disk)
        with pytest.raises(StoreError) as caught:
            Store(disk / "history.sqlite3")
        assert "is full" in str(caught.value) and "rollback" not in str(caught.value)
        filler.unlink()


async def test_the_app_on_a_full_disk_keeps_streaming_says_so_once_and_marks_the_reply_not_saved(tmp_path):
    """On the scripted engine (a reply of ~7 s: several save attempts on the full disk, one retry)."""
    from chat_app.app import ChatApp
    from pilot import reply_done, wait_until
    from scripted_engine import ScriptedEngine, endless

    with small_tmpfs(tmp_path / "disk", 4 << 20) as data_dir:
        engine = ScriptedEngine(then=endless(delay_s=0.005))
        app = ChatApp(data_dir, Path("scripted"), open_engine=engine.factory(),
                      sampling_overrides={"max_new_tokens": 1400})
        notified = []  # every notification (Textual drops them from the screen when they expire)
        show = app.notify
        app.notify = lambda message, **options: (notified.append(message), show(message, **options))[1]
        async with app.run_test(size=(120, 40)) as pilot:
            app.chat.prompt.load_text("Tell me a long story")
            await pilot.press("enter")
            await wait_until(pilot, lambda: app.chat.reply is not None and app.chat.reply.recorder.text,
                             "the first text of the reply")
            filler = fill(data_dir)
            recorder = app.chat.reply.recorder
            await reply_done(pilot, app)
            messages = notified
            assert sum("The reply is not being saved: the disk holding" in m for m in messages) == 1, messages
            assert any(m.startswith("The reply was not saved: the disk holding") for m in messages), messages
            assert not any("rollback" in m for m in messages)
            box = app.chat.chat_view.boxes[-1]
            assert box.text == recorder.text and len(recorder.text) > recorder.saved_chars  # all of it on screen
            assert "not saved" in box.border_subtitle
            filler.unlink()
        with Store(paths.history_path(data_dir)) as store:
            [conversation] = store.list_conversations()
            user, reply = store.messages(conversation.id)
        assert user.content == "Tell me a long story" and recorder.text.startswith(reply.content)


def test_convert_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_hf):
    with small_tmpfs(tmp_path / "disk", 4 << 20) as disk:
        result = run_cli("convert", tiny_hf, disk / "out")
        assert_one_line_error(result, f"not enough space for {disk / 'out'}: the checkpoint needs", "MB free")
        assert list(disk.iterdir()) == []

        with small_tmpfs(tmp_path / "disk2", 40 << 20) as roomy:
            def another_program_takes_the_space(done, total, name):
                if done == 1:
                    fill(roomy, "other-program")

            with pytest.raises(model.ConversionError, match=r"the disk holding .* is full .*the partial output was removed"):
                model.convert_hf(tiny_hf, roomy / "out", on_progress=another_program_takes_the_space)
            assert [p.name for p in roomy.iterdir()] == ["other-program"]


# --- 6. a read-only data dir, folders blocked by files -------------------------------------------------
@pytest.fixture
def saved_data_dir(tmp_path, tiny_ckpt):
    """A data dir with one saved conversation, a persona and an installed model."""
    data_dir = tmp_path / "data"
    install(tiny_ckpt, data_dir)
    with Store(paths.history_path(data_dir)) as store:
        conversation = store.create_conversation("Saved chat", "tiny", GREEDY.snapshot())
        store.add_message(conversation.id, "user", "remember this")
    assert run_cli("personas", "add", "Pirate", "--system-prompt", "Arr", data_dir=data_dir).returncode == 0
    killed_writer = ("import os, sys\nfrom chat_app.store import Store\nstore = Store(sys.argv[1])\n"
                     "store.create_conversation('Written just before a crash', 'tiny', {})\nos._exit(9)\n")
    subprocess.run([sys.executable, "-c", killed_writer, str(paths.history_path(data_dir))], check=False,
                   cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert paths.history_path(data_dir).with_name("history.sqlite3-wal").stat().st_size > 0  # only there
    return data_dir


def snapshot_of(folder: Path) -> dict:
    return {p.relative_to(folder): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
            for p in sorted(folder.rglob("*"))}


def test_a_read_only_data_dir_is_diagnosed_and_still_readable(saved_data_dir, jax_cache):
    data_dir = saved_data_dir
    before = snapshot_of(data_dir)
    with read_only(data_dir):
        with Store(paths.history_path(data_dir)) as store:  # browsing works
            assert store.read_only
            assert [c.title for c in store.list_conversations()] == ["Written just before a crash", "Saved chat"]
            with pytest.raises(ReadOnly, match="read-only file system"):
                store.create_conversation("x", "tiny", GREEDY.snapshot())

        result = run_cli("personas", "add", "Ninja", "--system-prompt", "Hush", data_dir=data_dir)
        assert_one_line_error(result, "is on a read-only file system")
        assert "Pirate" in run_cli("personas", "list", data_dir=data_dir).stdout

        status, _, stderr = finish(headless(data_dir, jax_cache, "--model", "tiny", stdin="Hi\n"))
        assert status == 1 and "Traceback" not in stderr
        [line] = stderr.strip().splitlines()
        assert "cannot be written (it is on a read-only file system): add --no-save" in line
        assert "damaged" not in line

        status, stdout, stderr = finish(headless(data_dir, jax_cache, "--model", "tiny", "--no-save",
                                                 "--max-new-tokens", "3", stdin="Hi\n"))
        assert status == 0 and stdout.strip() and "Traceback" not in stderr, stderr

        assert_last_line_error(run_cli("setup", "--demo", data_dir=data_dir), "downloads is on a read-only file system")
    assert snapshot_of(data_dir) == before  # the history and everything else untouched


async def test_the_app_on_a_read_only_data_dir_shows_the_history_and_says_why_it_cannot_save(saved_data_dir):
    from chat_app.app import ChatApp

    with read_only(saved_data_dir):
        app = ChatApp(saved_data_dir)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            assert app.chat.conversation.title == "Written just before a crash"
            await app.chat.open_conversation(app.store.list_conversations()[1].id)
            assert [b.text for b in app.chat.chat_view.boxes] == ["remember this"]
            assert any("cannot be written (it is on a read-only file system)" in n.message
                       for n in app._notifications)


@pytest.mark.parametrize("blocked, command, fragment", [
    ("personas", ["personas", "add", "Ninja", "--system-prompt", "Hush"], "personas is a file where a folder should be"),
    ("downloads", ["setup", "--demo"], "downloads is a file where a folder should be"),
])
def test_a_folder_blocked_by_a_plain_file_gets_one_line(tmp_path, blocked, command, fragment):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / blocked).write_text("not a folder")
    assert_last_line_error(run_cli(*command, data_dir=data_dir), fragment)
    assert (data_dir / blocked).read_text() == "not a folder"


def test_convert_into_a_folder_blocked_by_a_file_gets_one_line(tmp_path, tiny_hf):
    (tmp_path / "blocker").write_text("a file")
    assert_one_line_error(run_cli("convert", tiny_hf, tmp_path / "blocker" / "out"),
                          f"{tmp_path / 'blocker'} is a file where a folder should be")


def test_personas_list_warns_about_a_blocked_personas_folder(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "personas").write_text("x")
    result = run_cli("personas", "list", data_dir=data_dir)
    assert result.returncode == 0 and "Assistant" in result.stdout
    assert "personas is a file where the personas folder should be" in result.stderr


# --- every command against damaged inputs --------------------------------------------------------------
@pytest.fixture(scope="module")
def wrecked_data_dir(tmp_path_factory, tiny_ckpt):
    """A data dir where everything is wrong at once: a garbage history, a corrupt model, a model whose
    manifest has the wrong shape, a malformed persona, folders blocked by files, garbage settings."""
    data_dir = tmp_path_factory.mktemp("wrecked") / "data"
    corrupt = install(tiny_ckpt, data_dir, "corrupt")
    flip_byte(corrupt / "model.safetensors", 5000)
    (install(tiny_ckpt, data_dir, "shapeless") / "manifest.json").write_text('{"files": "x"}')
    paths.history_path(data_dir).write_bytes(b"this is not SQLite" * 100)
    (data_dir / "downloads").write_text("a file")
    (data_dir / "settings.toml").write_text("default_model = [")
    (data_dir / "blocker").write_text("a file")
    return data_dir


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["models"], ["models", "--verify"], ["models", "--verify", "shapeless"], ["personas", "list"],
    ["personas", "show", "Assistant"], ["personas", "add", "X", "--system-prompt", "y"],
    ["personas", "export", "Assistant", "{data}/blocker/out.toml"], ["personas", "import", "{data}/blocker"],
    ["--headless", "--model", "corrupt"], ["--headless", "--model", "shapeless", "--no-save"],
    ["--headless", "--model", "{data}/models/corrupt", "--no-save"], ["--headless", "--demo", "--no-save"],
    ["--headless", "--no-save"], ["convert", "{hf}", "{data}/blocker/out"], ["setup", "--demo"],
    ["setup", "--local", "{hf}", "--yes"],
])
def test_no_command_shows_a_traceback_on_damaged_inputs(wrecked_data_dir, tiny_hf, jax_cache, command):
    args = [a.format(data=wrecked_data_dir, hf=tiny_hf) for a in command]
    result = run_cli(*args, data_dir=wrecked_data_dir, stdin="Hi\n", env={"XDG_CACHE_HOME": str(jax_cache)})
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr
    if result.returncode != 0:  # one line saying why (`models --verify` reports on stdout)
        last = (result.stderr.strip().splitlines() or [""])[-1]
        assert last.startswith("mixtral-chat") or ": DAMAGED: " in result.stdout, result.stderr
