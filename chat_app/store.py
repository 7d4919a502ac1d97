"""Chat history in SQLite: conversations, their messages, and the persona settings each one uses.

The app uses its `Store` from the UI thread only: the engine's worker thread never touches it (the
chat screen saves a reply as the worker's messages arrive), and headless mode is one thread. Every call
still takes a lock around the single connection, so a `Store` may be shared between threads (a slow
export or search could move to a thread without a second connection). The file is in WAL mode: a committed write survives the
process being killed, so a reply saved while it streams (see `ReplyRecorder`) loses at most its
last unsaved second, and a conversation once created is never lost.

The schema is versioned with `PRAGMA user_version`: `MIGRATIONS[i]` turns version i into i + 1, each
in one transaction. A file from a newer mixtral-chat, or one SQLite cannot read, is refused with a
message that names the file and says what to do; it is never modified or replaced.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from chat_app.errors import UserError

if TYPE_CHECKING:
    from model.engine_api import TurnDone

ROLES = ("system", "user", "assistant")
MESSAGE_STATUSES = ("complete", "streaming", "cancelled", "error")
APPLICATION_ID = 0x4D584348  # "MXCH" in the SQLite header: marks the file as ours

MIGRATIONS: tuple[str, ...] = (
    # 1: conversations and messages. `persona` and `stats` are JSON objects.
    f"""
    PRAGMA application_id = {APPLICATION_ID};
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        persona TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN {ROLES}),
        content TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN {MESSAGE_STATUSES}),
        created_at REAL NOT NULL,
        stats TEXT
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    CREATE INDEX conversations_by_update ON conversations(updated_at);
    """,
    # 2: full-text search over message text (indexing the messages table in place) and titles.
    """
    CREATE VIRTUAL TABLE message_search USING fts5(
        content, content='messages', content_rowid='id', tokenize='unicode61 remove_diacritics 2');
    CREATE TRIGGER message_search_insert AFTER INSERT ON messages BEGIN
        INSERT INTO message_search(rowid, content) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER message_search_delete AFTER DELETE ON messages BEGIN
        INSERT INTO message_search(message_search, rowid, content) VALUES ('delete', old.id, old.content);
    END;
    CREATE TRIGGER message_search_update AFTER UPDATE OF content ON messages BEGIN
        INSERT INTO message_search(message_search, rowid, content) VALUES ('delete', old.id, old.content);
        INSERT INTO message_search(rowid, content) VALUES (new.id, new.content);
    END;
    INSERT INTO message_search(message_search) VALUES ('rebuild');

    CREATE VIRTUAL TABLE title_search USING fts5(
        title, conversation_id UNINDEXED, tokenize='unicode61 remove_diacritics 2');
    CREATE TRIGGER title_search_insert AFTER INSERT ON conversations BEGIN
        INSERT INTO title_search(title, conversation_id) VALUES (new.title, new.id);
    END;
    CREATE TRIGGER title_search_delete AFTER DELETE ON conversations BEGIN
        DELETE FROM title_search WHERE conversation_id = old.id;
    END;
    CREATE TRIGGER title_search_update AFTER UPDATE OF title ON conversations BEGIN
        UPDATE title_search SET title = new.title WHERE conversation_id = old.id;
    END;
    INSERT INTO title_search(title, conversation_id) SELECT title, id FROM conversations;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
TITLE_LENGTH = 48  # characters of a title made from the first message

# Private-use characters around the matched words in FTS5 snippets, turned into `SearchHit.highlights`.
_MATCH_START, _MATCH_END = "\ue000", "\ue001"


class StoreError(UserError):
    """A history problem, in words fit for the user (which file, what is wrong, what to do)."""


class DatabaseCorrupt(StoreError):
    """The history file cannot be read. It is left as it is; `move_aside` sets it aside on request."""

    def __init__(self, path: Path, detail: str):
        self.path = path
        super().__init__(
            f"the history file {path} is damaged or not a mixtral-chat history ({detail}); it has not been "
            f"changed. To start a new history, move it aside (mv '{path}' '{path}.damaged'); "
            f"`sqlite3 '{path}' .recover` may rescue old conversations from it")


class SchemaTooNew(StoreError):
    """The file was written by a newer mixtral-chat; it is not touched."""


@dataclass(frozen=True)
class Conversation:
    id: str
    title: str
    model: str
    persona: dict  # the persona settings snapshot (chat_app.personas.Persona.snapshot())
    created_at: float  # unix seconds
    updated_at: float


@dataclass(frozen=True)
class Message:
    id: int  # increasing in the order the messages were added
    conversation_id: str
    role: str  # one of ROLES
    content: str
    status: str  # one of MESSAGE_STATUSES; "streaming" left behind means the writer was killed
    created_at: float
    stats: dict | None  # for replies: token counts and timings (model.engine_api.TurnDone fields)


@dataclass(frozen=True)
class SearchHit:
    conversation_id: str
    conversation_title: str
    message_id: int | None  # None: the title matched
    snippet: str  # the matching part of the text, "…" where cut
    highlights: tuple[tuple[int, int], ...]  # [start, end) of each matched word in `snippet`


class Store:
    """The chat history database at `path` (created if missing). Safe to share between threads (see above)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        in_memory = str(path) == ":memory:"
        if not in_memory:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create the folder for the history file {self.path}: {e}") from None
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the history file {self.path}: {e}") from None
        try:
            self._open()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def in_memory(cls) -> Store:
        """A history that is never written to disk (headless `--no-save`)."""
        return cls(":memory:")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- opening and migrating ------------------------------------------------------------------
    def _open(self) -> None:
        """Check the file before anything writes to it, then switch on WAL and bring the schema up to date."""
        version, app_id, has_tables = self._inspect()
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"the history file {self.path} was written by a newer mixtral-chat (schema version {version}; "
                f"this one knows up to {SCHEMA_VERSION}); it has not been changed. Upgrade mixtral-chat, "
                f"or use another --data-dir")
        if app_id not in (0, APPLICATION_ID) or (version == 0 and has_tables):
            raise DatabaseCorrupt(self.path, "it is an SQLite file of another program")
        if version > 0:
            try:
                problems = [row[0] for row in self._db.execute("PRAGMA quick_check").fetchall()]
            except sqlite3.DatabaseError as e:
                problems = [str(e)]
            if problems != ["ok"]:
                raise DatabaseCorrupt(self.path, "; ".join(problems[:3]))
        with self._translating_errors():
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")  # in WAL mode: durable unless the OS crashes
            self._db.execute("PRAGMA foreign_keys = ON")
            for target, script in enumerate(MIGRATIONS, start=1):
                self._migrate_to(target, script)

    def _inspect(self) -> tuple[int, int, bool]:
        """(schema version, application id, whether any table exists), reading only."""
        try:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            has_tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0
        except sqlite3.DatabaseError as e:
            raise DatabaseCorrupt(self.path, str(e)) from None
        return version, app_id, has_tables

    def _migrate_to(self, target: int, script: str) -> None:
        """Apply one migration in its own transaction, unless another process got there first."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("PRAGMA user_version").fetchone()[0] < target:
                for statement in _split_sql(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # --- plumbing -------------------------------------------------------------------------------
    @contextmanager
    def _translating_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorname", "") in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
                raise DatabaseCorrupt(self.path, str(e)) from None
            raise StoreError(f"history file {self.path}: {e}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (all or nothing), under the lock."""
        with self._lock, self._translating_errors():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock, self._translating_errors():
            return self._db.execute(sql, params).fetchall()

    # --- conversations --------------------------------------------------------------------------
    def create_conversation(self, title: str, model: str, persona: dict) -> Conversation:
        now = time.time()
        conversation = Conversation(uuid.uuid4().hex, title, model, dict(persona), now, now)
        with self._write() as db:
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?)",
                       (conversation.id, title, model, json.dumps(conversation.persona), now, now))
        return conversation

    def list_conversations(self) -> list[Conversation]:
        """Most recently updated first."""
        rows = self._read("SELECT * FROM conversations ORDER BY updated_at DESC, rowid DESC")
        return [_conversation(row) for row in rows]

    def get_conversation(self, conversation_id: str) -> Conversation:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", (conversation_id,))
        if not rows:
            raise StoreError(f"no conversation with id {conversation_id!r} in {self.path}")
        return _conversation(rows[0])

    def rename_conversation(self, conversation_id: str, title: str) -> None:
        self._update_conversation(conversation_id, "title = ?", (title,))

    def set_persona(self, conversation_id: str, persona: dict) -> None:
        self._update_conversation(conversation_id, "persona = ?", (json.dumps(persona),))

    def _update_conversation(self, conversation_id: str, assignment: str, values: tuple) -> None:
        with self._write() as db:
            cursor = db.execute(f"UPDATE conversations SET {assignment}, updated_at = ? WHERE id = ?",
                                (*values, time.time(), conversation_id))
            if cursor.rowcount == 0:
                raise StoreError(f"no conversation with id {conversation_id!r} in {self.path}")

    def delete_conversation(self, conversation_id: str) -> None:
        with self._write() as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise StoreError(f"no conversation with id {conversation_id!r} in {self.path}")

    # --- messages -------------------------------------------------------------------------------
    def messages(self, conversation_id: str) -> list[Message]:
        """The conversation's messages, oldest first."""
        self.get_conversation(conversation_id)  # an unknown id is an error, not an empty list
        rows = self._read("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
        return [_message(row) for row in rows]

    def chat_messages(self, conversation_id: str) -> list[dict]:
        """What the engine is given for this conversation: the persona's system prompt (if any), then
        every user and assistant message except failed ones. A stopped reply stays: the user saw it."""
        conversation = self.get_conversation(conversation_id)
        system_prompt = conversation.persona.get("system_prompt", "")
        chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
        chat += [{"role": m.role, "content": m.content} for m in self.messages(conversation_id)
                 if m.status != "error" and m.content]
        return chat

    def add_message(self, conversation_id: str, role: str, content: str, status: str = "complete") -> Message:
        _check_choice("role", role, ROLES)
        _check_choice("status", status, MESSAGE_STATUSES)
        now = time.time()
        with self._write() as db:
            if db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?",
                          (now, conversation_id)).rowcount == 0:
                raise StoreError(f"no conversation with id {conversation_id!r} in {self.path}")
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, created_at) VALUES (?, ?, ?, ?, ?)",
                (conversation_id, role, content, status, now))
        return Message(cursor.lastrowid, conversation_id, role, content, status, now, None)

    def update_message(self, message_id: int, content: str, status: str | None = None,
                       stats: dict | None = None) -> None:
        """Replace a message's text (and status / stats when given): a reply saved while it streams."""
        if status is not None:
            _check_choice("status", status, MESSAGE_STATUSES)
        with self._write() as db:
            rows = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchall()
            if not rows:
                raise StoreError(f"no message with id {message_id} in {self.path}")
            db.execute("UPDATE messages SET content = ?, status = coalesce(?, status), "
                       "stats = coalesce(?, stats) WHERE id = ?",
                       (content, status, None if stats is None else json.dumps(stats), message_id))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), rows[0][0]))

    def delete_messages_from(self, conversation_id: str, message_id: int) -> None:
        """Delete this message and every later one of the conversation (edit and resend, regenerate)."""
        with self._write() as db:
            owner = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchall()
            if owner != [(conversation_id,)]:
                raise StoreError(f"conversation {conversation_id!r} has no message with id {message_id}")
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conversation_id, message_id))
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (time.time(), conversation_id))

    def start_reply(self, conversation_id: str, save_interval_s: float = 1.0) -> ReplyRecorder:
        """An empty assistant message with status "streaming", to be filled in as the reply arrives."""
        message = self.add_message(conversation_id, "assistant", "", status="streaming")
        return ReplyRecorder(self, message.id, save_interval_s)

    # --- search and export ----------------------------------------------------------------------
    def search(self, query: str, limit: int = 50) -> list[SearchHit]:
        """Conversations whose title or messages contain every word of `query` (as typed: each word
        also matches as a prefix, so results come while typing). Title hits first, then by relevance."""
        match = _fts_query(query)
        if not match:
            return []
        marks = (_MATCH_START, _MATCH_END)
        rows = self._read(
            """
            SELECT conversation_id, title, NULL, highlight(title_search, 0, ?, ?), 0, bm25(title_search)
              FROM title_search WHERE title_search MATCH ?
            UNION ALL
            SELECT m.conversation_id, c.title, m.id, snippet(message_search, 0, ?, ?, '…', 16), 1,
                   bm25(message_search)
              FROM message_search
              JOIN messages m ON m.id = message_search.rowid
              JOIN conversations c ON c.id = m.conversation_id
             WHERE message_search MATCH ?
            ORDER BY 5, 6 LIMIT ?
            """,
            (*marks, match, *marks, match, limit))
        return [SearchHit(cid, title, message_id, *_highlights(marked))
                for cid, title, message_id, marked, _, _ in rows]

    def export_json(self, conversation_id: str) -> dict:
        conversation = self.get_conversation(conversation_id)
        return {
            "format": "mixtral-chat-conversation",
            "format_version": 1,
            "id": conversation.id,
            "title": conversation.title,
            "model": conversation.model,
            "persona": conversation.persona,
            "created_at": conversation.created_at,
            "updated_at": conversation.updated_at,
            "messages": [
                {"role": m.role, "content": m.content, "status": m.status, "created_at": m.created_at,
                 "stats": m.stats}
                for m in self.messages(conversation_id)
            ],
        }

    def export_markdown(self, conversation_id: str) -> str:
        conversation = self.get_conversation(conversation_id)
        persona_name = conversation.persona.get("name", "Assistant")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(conversation.created_at))
        parts = [f"# {conversation.title}",
                 f"*Model: {conversation.model} · Persona: {persona_name} · Started {created}*"]
        if conversation.persona.get("system_prompt"):
            parts.append("## System\n\n" + conversation.persona["system_prompt"])
        for m in self.messages(conversation_id):
            heading = {"user": "You", "assistant": persona_name, "system": "System"}[m.role]
            note = {"cancelled": "\n\n*(stopped)*", "error": "\n\n*(failed)*",
                    "streaming": "\n\n*(interrupted)*"}.get(m.status, "")
            parts.append(f"## {heading}\n\n{m.content}{note}")
        return "\n\n".join(parts) + "\n"


class ReplyRecorder:
    """A reply being generated, saved as it grows; the one record of a turn's life for the chat screen
    and headless mode alike:

        reply = store.start_reply(conversation_id)  # an empty "streaming" message
        reply.append(delta.text)                    # each TextDelta
        reply.finish(*turn_outcome(done), text=done.text)   # the engine's TurnDone
        reply.finish("error") / reply.finish("cancelled")   # failed, or stopped before the engine ended it

    Saving every token would cost a commit per token; saving at most every `save_interval_s` bounds
    both the cost and what a killed process loses (the text added since the last save).
    """

    def __init__(self, store: Store, message_id: int, save_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.message_id = message_id
        self.save_interval_s = save_interval_s
        self._clock = clock
        self._text = ""
        self._saved_chars = 0
        self._last_save = clock()

    @property
    def text(self) -> str:
        return self._text

    @property
    def saved_chars(self) -> int:
        """How much of `text` is on disk."""
        return self._saved_chars

    def append(self, delta: str) -> None:
        self._text += delta
        if self._clock() - self._last_save >= self.save_interval_s:
            self._save("streaming", None)

    def finish(self, status: str, stats: dict | None = None, text: str | None = None) -> None:
        """Save the final text (`text` if given, e.g. TurnDone.text) with its final status."""
        if text is not None:
            self._text = text
        self._save(status, stats)

    def _save(self, status: str, stats: dict | None) -> None:
        self.store.update_message(self.message_id, self._text, status=status, stats=stats)
        self._saved_chars = len(self._text)
        self._last_save = self._clock()


def turn_outcome(done: TurnDone) -> tuple[str, dict]:
    """How a reply the engine finished is saved: its status ("cancelled" if the user stopped it, else
    "complete") and its stats (the turn's finish reason, token counts and timings)."""
    status = "cancelled" if done.finish_reason == "cancelled" else "complete"
    return status, {name: value for name, value in dataclasses.asdict(done).items() if name != "text"}


def title_from(text: str) -> str:
    """A new conversation's title: the first line of its first message, shortened."""
    line = next((line for line in text.splitlines() if line.strip()), text)
    line = " ".join(line.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


def move_aside(path: Path) -> Path:
    """Rename a damaged history file (with its -wal and -shm companions, which may hold recent
    writes) to `<name>.damaged-<time>`, so a fresh one can be created. Only on the user's request."""
    path = Path(path)
    target = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("-wal", "-shm", ""):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, target.with_name(target.name + suffix))
    return target


def _split_sql(script: str) -> list[str]:
    """The statements of a migration script; a trigger body's `;` stays inside its statement."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return [s for s in statements if s]


def _fts_query(text: str) -> str:
    """The user's words as an FTS5 query: each word a quoted prefix phrase, so no character typed
    can be read as FTS5 syntax (AND, NEAR, quotes, *, ...)."""
    words = [w for w in text.split() if re.search(r"\w", w)]
    return " ".join('"' + w.replace('"', '""') + '"*' for w in words)


def _highlights(marked: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """Snippet text with the match markers removed, and where the marked spans were."""
    plain, spans, length, start = [], [], 0, 0
    for piece in re.split(f"([{_MATCH_START}{_MATCH_END}])", marked):
        if piece == _MATCH_START:
            start = length
        elif piece == _MATCH_END:
            spans.append((start, length))
        else:
            plain.append(piece)
            length += len(piece)
    return "".join(plain), tuple(spans)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise StoreError(f"{what} must be one of {', '.join(allowed)}, got {value!r}")


def _conversation(row: tuple) -> Conversation:
    cid, title, model, persona, created_at, updated_at = row
    return Conversation(cid, title, model, json.loads(persona), created_at, updated_at)


def _message(row: tuple) -> Message:
    mid, cid, role, content, status, created_at, stats = row
    return Message(mid, cid, role, content, status, created_at, None if stats is None else json.loads(stats))
