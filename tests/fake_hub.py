"""A stand-in for the Hugging Face hub on 127.0.0.1, serving one model repo from a folder.

It speaks the part of the hub's HTTP API that `huggingface_hub` 2.4 and `chat_app.hub` use, with the headers
they read (checked against huggingface_hub's `file_download.py`, `hf_api.py` and `utils/_http.py`):

    GET  /api/models/{repo}[/revision/{rev}][?blobs=true]   repo info: commit `sha`, `gated`, `siblings`
                                                            (with `blobs=true`: size, blobId, lfs.sha256)
    GET  /api/models/{repo}/tree/{rev}[?recursive=true]     file list as `snapshot_download` reads it
    HEAD/GET /{repo}/resolve/{rev}/{path}                   a file; LFS files answer 302 to the "CDN" below,
                                                            with X-Repo-Commit, X-Linked-Etag, X-Linked-Size
    HEAD/GET /cdn/{sha256}                                  LFS bytes, on another origin (http://localhost:PORT)
                                                            so a client must drop its Authorization header

Files ending in `.safetensors`, `.model`, `.bin`, `.pt` or `.pth` are LFS files (ETag = sha256, like the hub's
default `.gitattributes`); the others are plain git files (ETag = git blob id). Ranges (`bytes=N-` and
`bytes=N-M`) answer 206. Errors carry `X-Error-Code` / `X-Error-Message` and a JSON `{"error": ...}` body with
the real hub's wording, so `huggingface_hub.utils.hf_raise_for_status` types them as it would in production.

Switches a test flips between calls (all plain attributes or methods on `FakeHub`):
    gated, known_tokens, granted_tokens   gated repo: 401 without a token, 403 for a token not granted access;
                                          any token not in `known_tokens` is rejected with 401 invalid credentials
    missing                               the repo does not exist (RepoNotFound)
    bytes_per_s                           slow link (per response)
    honour_ranges                         False: answer every Range request with the whole file (200)
    cut_connection(path, at_byte, times)  the connection drops when the file offset reaches `at_byte`
    stall(path, at_byte)                  the server goes silent at `at_byte` (until the hub is closed)
    corrupt(path)                         the right number of bytes, but some of them wrong
Every request is recorded in `requests` (method, path, headers, status, body bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".model", ".bin", ".pt", ".pth")
_SEND_CHUNK = 16 * 1024
_INVALID_TOKEN = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class HubFile:
    """One file of the served repo, as the hub describes it."""

    path: str
    data: bytes
    git_oid: str  # git blob id (of the LFS pointer, for LFS files)
    sha256: str | None  # content sha256, LFS files only

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def etag(self) -> str:
        return self.sha256 or self.git_oid

    @property
    def lfs_pointer_size(self) -> int:
        return len(_lfs_pointer(self.data))


@dataclass
class RecordedRequest:
    method: str
    path: str  # URL path, percent-decoded, without the query
    headers: dict[str, str]  # lower-cased names
    file: str | None = None  # the repo file whose bytes this request was served (resolve or CDN), else None
    status: int = 0
    body_bytes: int = 0  # bytes of the response body actually sent (less than the length when cut or cancelled)


@dataclass
class _Cut:
    at_byte: int
    times: int | None  # None: every time


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


def load_repo_files(folder: Path) -> dict[str, HubFile]:
    """Read every file under `folder` (flat or nested) into `HubFile`s keyed by repo path."""
    files = {}
    for file_path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path = file_path.relative_to(folder).as_posix()
        data = file_path.read_bytes()
        if path.endswith(LFS_SUFFIXES):
            files[path] = HubFile(path, data, _git_oid(_lfs_pointer(data)), hashlib.sha256(data).hexdigest())
        else:
            files[path] = HubFile(path, data, _git_oid(data), None)
    return files


class FakeHub:
    """The fake hub server; use as a context manager. `url` is the endpoint to pass as `endpoint=`."""

    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.files = load_repo_files(folder)
        self.commit = hashlib.sha1(
            "".join(f"{f.path}\0{f.git_oid}\n" for f in self.files.values()).encode()
        ).hexdigest()
        self.gated = False
        self.known_tokens: set[str] = set()
        self.granted_tokens: set[str] = set()
        self.missing = False
        self.bytes_per_s: float | None = None
        self.honour_ranges = True
        self.requests: list[RecordedRequest] = []
        self._cuts: dict[str, _Cut] = {}
        self._stalls: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cdn_url(self) -> str:
        """Same server, another origin (as the real hub's CDN is another host)."""
        return f"http://localhost:{self.port}/cdn"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()  # releases stalled responses
        self._server.shutdown()
        self._server.server_close()

    # ---- fault switches ------------------------------------------------------------------------------------
    def cut_connection(self, path: str, at_byte: int, times: int | None = None) -> None:
        """Drop the connection when the offset in `path` reaches `at_byte` (`times` responses, None: always)."""
        self._cuts[path] = _Cut(at_byte, times)

    def stall(self, path: str, at_byte: int) -> None:
        """Stop sending `path` at `at_byte` and hold the connection open without a byte until the hub closes."""
        self._stalls[path] = at_byte

    def corrupt(self, path: str) -> None:
        """Serve `path` with its size intact but some bytes flipped."""
        self._corrupt.add(path)

    def clear_faults(self) -> None:
        self._cuts.clear()
        self._stalls.clear()
        self._corrupt.clear()

    # ---- what a test asserts on ----------------------------------------------------------------------------
    def file_gets(self, path: str) -> list[RecordedRequest]:
        """GET requests answered with the bytes of `path` (from resolve or the CDN), oldest first."""
        return [r for r in list(self.requests) if r.method == "GET" and r.file == path]

    def lfs_files(self) -> list[HubFile]:
        return [f for f in self.files.values() if f.sha256 is not None]

    def body(self, path: str) -> bytes:
        """The bytes served for `path` right now (corrupted if `corrupt(path)` is on)."""
        data = self.files[path].data
        if path not in self._corrupt:
            return data
        middle = len(data) // 2
        return data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :]

    def _take_cut(self, path: str) -> int | None:
        with self._lock:
            cut = self._cuts.get(path)
            if cut is None:
                return None
            if cut.times is not None:
                cut.times -= 1
                if cut.times <= 0:
                    del self._cuts[path]
            return cut.at_byte


def _handler_class(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(_HubRequestHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real hub; every response has a Content-Length
    hub: FakeHub

    _INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
    _TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.+))?$")
    _RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
    _CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (cancelled or killed): nothing to answer

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    # ---- routing -------------------------------------------------------------------------------------------
    def _dispatch(self, send_body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.query = parse_qs(url.query)
        self.record = RecordedRequest(self.command, path, {k.lower(): v for k, v in self.headers.items()})
        self.hub.requests.append(self.record)
        if match := self._CDN.match(path):
            return self._serve_cdn(match["sha"], send_body)
        if not self._authenticated():
            return
        if match := self._INFO.match(path):
            return self._serve_info(match["repo"], match["rev"] or "main")
        if match := self._TREE.match(path):
            return self._serve_tree(match["repo"], match["rev"], match["sub"])
        if match := self._RESOLVE.match(path):
            return self._serve_resolve(match["repo"], match["rev"], match["path"], send_body)
        self._error(404, None, "Not Found")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip() or None

    def _authenticated(self) -> bool:
        token = self._token()
        if token is not None and token not in self.hub.known_tokens:
            self._error(401, None, _INVALID_TOKEN)
            return False
        return True

    def _repo_ok(self, repo: str) -> bool:
        if repo != self.hub.repo_id or self.hub.missing:
            # Like the hub: 401 when anonymous (it might be private), 404 when authenticated.
            self._error(401 if self._token() is None else 404, "RepoNotFound", "Repository not found")
            return False
        return True

    def _commit_ok(self, rev: str) -> bool:
        if rev not in ("main", self.hub.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return False
        return True

    def _access_ok(self, repo: str) -> bool:
        if not self.hub.gated:
            return True
        token = self._token()
        if token is None:
            message = (
                f"Access to model {repo} is restricted. You must have access to it and be authenticated to access"
                " it. Please log in."
            )
            self._error(401, "GatedRepo", message)
            return False
        if token not in self.hub.granted_tokens:
            message = (
                f"Access to model {repo} is restricted and you are not in the authorized list. "
                f"Visit {self.hub.url}/{repo} to ask for access."
            )
            self._error(403, "GatedRepo", message)
            return False
        return True

    # ---- endpoints -----------------------------------------------------------------------------------------
    def _serve_info(self, repo: str, rev: str) -> None:
        if not (self._repo_ok(repo) and self._commit_ok(rev)):
            return
        with_blobs = self.query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for f in self.hub.files.values():
            sibling: dict = {"rfilename": f.path}
            if with_blobs:
                sibling.update(size=f.size, blobId=f.git_oid)
                if f.sha256 is not None:
                    sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.lfs_pointer_size}
            siblings.append(sibling)
        info = {
            "_id": "0" * 24,
            "id": repo,
            "modelId": repo,
            "sha": self.hub.commit,
            "private": False,
            "gated": "manual" if self.hub.gated else False,
            "disabled": False,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors", "mixtral"],
            "siblings": siblings,
        }
        self._json(info)

    def _serve_tree(self, repo: str, rev: str, sub: str | None) -> None:
        if not (self._repo_ok(repo) and self._commit_ok(rev)):
            return
        prefix = f"{sub}/" if sub else ""
        entries = []
        for f in self.hub.files.values():
            if not f.path.startswith(prefix):
                continue
            entry: dict = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.path}
            if f.sha256 is not None:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.lfs_pointer_size}
            entries.append(entry)
        self._json(entries)

    def _serve_resolve(self, repo: str, rev: str, path: str, send_body: bool) -> None:
        if not (self._repo_ok(repo) and self._commit_ok(rev) and self._access_ok(repo)):
            return
        hub_file = self.hub.files.get(path)
        if hub_file is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"")
            return
        if hub_file.sha256 is not None:
            # The hub redirects LFS files to its CDN; the metadata rides on the redirect itself.
            self.record.status = 302
            self.send_response(302)
            self.send_header("Location", f"{self.hub.cdn_url}/{hub_file.sha256}")
            self.send_header("X-Repo-Commit", self.hub.commit)
            self.send_header("X-Linked-Etag", f'"{hub_file.sha256}"')
            self.send_header("X-Linked-Size", str(hub_file.size))
            self.send_header("ETag", f'"{hub_file.git_oid}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._serve_bytes(hub_file, send_body)

    def _serve_cdn(self, sha: str, send_body: bool) -> None:
        hub_file = next((f for f in self.hub.files.values() if f.sha256 == sha), None)
        if hub_file is None:
            self._error(404, None, "Not Found")
            return
        self._serve_bytes(hub_file, send_body)

    def _serve_bytes(self, hub_file: HubFile, send_body: bool) -> None:
        self.record.file = hub_file.path
        data = self.hub.body(hub_file.path)
        size = len(data)
        start, end = 0, size  # [start, end)
        range_header = self.headers.get("Range") if self.hub.honour_ranges else None
        status = 200
        if range_header:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())
            if match is None or int(match[1]) >= size:
                self._error(416, None, "Requested Range Not Satisfiable", extra={"Content-Range": f"bytes */{size}"})
                return
            start = int(match[1])
            end = min(size, int(match[2]) + 1) if match[2] else size
            status = 206
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hub_file.etag}"')
        self.send_header("X-Repo-Commit", self.hub.commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if send_body:
            self._send_body(hub_file.path, data, start, end)

    def _send_body(self, path: str, data: bytes, start: int, end: int) -> None:
        cut = self.hub._take_cut(path)
        stall = self.hub._stalls.get(path)
        position = start
        while position < end:
            if stall is not None and position >= stall:
                self.wfile.flush()
                self.hub._closing.wait()  # silent until the hub shuts down
                self.close_connection = True
                return
            if cut is not None and position >= cut:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees the body end early
                self.close_connection = True
                return
            limit = min([end, *(x for x in (cut, stall) if x is not None and x > position)])
            n = min(_SEND_CHUNK, limit - position)
            self.wfile.write(data[position : position + n])
            self.record.body_bytes += n
            position += n
            if self.hub.bytes_per_s:
                self.wfile.flush()
                time.sleep(n / self.hub.bytes_per_s)

    # ---- response helpers ----------------------------------------------------------------------------------
    def _json(self, payload) -> None:
        body = json.dumps(payload).encode()
        self.record.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.record.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Error-Message", message)
        if code is not None:
            self.send_header("X-Error-Code", code)
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def partial_download_bytes(blobs: Path) -> list[int]:
    """The sizes of the partial downloads (`*.incomplete`) in an HF cache's blobs folder now; one that is
    finished (renamed) between the listing and its size is not counted."""
    sizes = []
    for partial in blobs.glob("*.incomplete"):
        try:
            sizes.append(partial.stat().st_size)
        except FileNotFoundError:
            pass
    return sizes


# ---- the repo it serves ------------------------------------------------------------------------------------
TINY_MIXTRAL_REPO_ID = "tiny-org/tiny-mixtral"
DECOY_FILES = ("consolidated.00.pt", "pytorch_model.bin", "README.md", "original/params.json")


def make_tiny_mixtral_repo(folder: Path) -> Path:
    """Write a tiny random Mixtral in HF format into `folder` (several safetensors shards + index, the real
    Mixtral tokenizer) plus files a Mixtral repo also carries that a download must skip (`DECOY_FILES`).

    ~8.4 MB; takes a few seconds (imports torch + transformers), so build it once per session.
    """
    from tiny_model import build_hf_mixtral

    build_hf_mixtral(folder, max_shard_size="100KB", hidden_size=32, intermediate_size=64, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512)
    for decoy in DECOY_FILES:
        (folder / decoy).parent.mkdir(parents=True, exist_ok=True)
        (folder / decoy).write_bytes(f"not needed: {decoy}\n".encode() * 10)
    return folder


BIG_SHARD = "model-00001-of-00005.safetensors"  # ~4 MB, an LFS file served through the "CDN"


@pytest.fixture(scope="session")
def repo_folder(tmp_path_factory) -> Path:
    """The tiny Mixtral repo the fake hub serves (built once per session)."""
    return make_tiny_mixtral_repo(tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture
def hub(repo_folder):
    """A fake hub on 127.0.0.1 serving the tiny repo as TINY_MIXTRAL_REPO_ID."""
    with FakeHub(TINY_MIXTRAL_REPO_ID, repo_folder) as fake:
        yield fake


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    """An empty Hugging Face cache for one test."""
    return tmp_path / "hf-cache"

