"""Downloads from the Hugging Face hub into the standard HF cache: plan, disk-space check, resumable and
verified transfer, and a look-up of checkpoints already in the cache.

Why not `huggingface_hub.snapshot_download` (checked with huggingface_hub 2.4 against tests/fake_hub.py): it
writes each file to a process-unique temporary name, holds up to 10 MB of it in memory and deletes it on failure,
so a killed or failed download restarts the file from zero (a 5 GB shard lost); it does not check content
hashes; and it can only be cancelled by raising from a tqdm hook. So huggingface_hub does what it does well here
(the repo API, typed HTTP errors, the token look-up, its configured HTTP client) and the transfer is ours, in the
cache layout huggingface_hub defines, so that it, `transformers` and `hf cache` see our files and we reuse theirs:

    <cache>/models--org--name/blobs/<sha256 | git blob id>     file contents
    <cache>/models--org--name/blobs/<that>.incomplete          a partial download, continued with an HTTP Range
    <cache>/models--org--name/snapshots/<commit>/<path>        relative symlink to its blob
    <cache>/models--org--name/refs/<revision>                  the commit the revision pointed to
    <cache>/.locks/models--org--name/<blob name>.lock          the per-blob lock huggingface_hub also takes

Every function is synchronous, for a worker thread. `download` reports progress through a callback and looks at
`should_cancel` every 0.1 s, even while the network is silent. Every error is a `HubError` whose `message` tells
the user what to do. huggingface_hub reads its environment variables at import, so the endpoint, cache folder and
token are always passed to it explicitly.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import filelock
import httpx2
from huggingface_hub import HfApi, constants, get_token, scan_cache_dir
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from chat_app.errors import UserError
from chat_app.terminal import format_bytes

# The files a checkpoint conversion needs, at the repo root. Not *.bin / *.pt / consolidated.*: the same weights
# in other formats, which would double or triple the download.
WANTED_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
EXAMPLE_REPO = "mistralai/Mixtral-8x7B-Instruct-v0.1"

_LIBRARY_NAME = "mixtral-chat"
_TIMEOUT = httpx2.Timeout(10.0, read=30.0)  # no byte for 30 s: the connection is taken as lost
_POLL_S = 0.1  # how often a waiting download looks at should_cancel
_PROGRESS_EVERY_S = 0.1
_RATE_WINDOW_S = 5.0
_HASH_BLOCK = 8 * 1024 * 1024
_QUEUED_CHUNKS = 64  # network chunks (~64 kB each) buffered between the reader thread and the writer
_FIRST_RETRY_WAIT_S = 0.5
_MAX_RETRY_WAIT_S = 8.0
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
_LOGIN_HINT = "set HF_TOKEN or run `hf auth login`, or type a token"
# What talking to the hub can raise (huggingface_hub's typed HTTP errors, bad ids, offline mode, transport errors).
_HUB_ERRORS = (
    hf_errors.HfHubHTTPError,
    hf_errors.HFValidationError,
    hf_errors.OfflineModeIsEnabled,
    httpx2.TransportError,
)


# ---- errors ------------------------------------------------------------------------------------------------
class HubError(UserError):
    """A hub or download failure. The message says what to do next."""


class GatedRepoError(HubError):
    """The repo is gated and this account (or no account) has not been granted access; see `access_url`."""

    def __init__(self, message: str, access_url: str):
        super().__init__(message)
        self.access_url = access_url


class AuthError(HubError):
    """The hub rejected the token, or the token lacks a permission."""


class RepoNotFoundError(HubError):
    """No such repo (or it is private and the token cannot see it), or the id is malformed."""


class RevisionNotFoundError(HubError):
    """The repo has no such branch, tag or commit."""


class UnsupportedRepoError(HubError):
    """The repo is not a transformers checkpoint with safetensors weights, config.json and a tokenizer."""


class NetworkError(HubError):
    """The hub could not be reached, or the connection was lost; what was downloaded is kept."""


class DiskSpaceError(HubError):
    """Not enough free disk space (refused before starting, or the disk filled up); partial data is kept."""


class ChecksumError(HubError):
    """A file's content does not match the hub's hash; the bad copy has been deleted."""


class DownloadCancelled(HubError):
    """`should_cancel` returned True; what was downloaded is kept."""


# ---- what the functions return -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the planned commit, as the hub describes it."""

    path: str  # relative to the repo root, e.g. "model-00001-of-00019.safetensors"
    size: int  # bytes
    sha256: str | None  # content hash of LFS files (weights and other large files); None for plain git files
    git_oid: str  # git blob id: sha1 of b"blob <size>\0" + content for plain git files

    @property
    def blob_name(self) -> str:
        """Its blob's name in the HF cache: the ETag the hub serves (the sha256 for LFS files, else the git id)."""
        return self.sha256 or self.git_oid

    def new_hasher(self):
        """A hash object that, fed this file's content, ends at `blob_name`."""
        if self.sha256 is not None:
            return hashlib.sha256()
        hasher = hashlib.sha1()
        hasher.update(b"blob %d\0" % self.size)
        return hasher


@dataclass(frozen=True)
class DownloadPlan:
    """What `download` will fetch; built by `plan_download`, before anything is written."""

    repo_id: str
    revision: str  # as asked: a branch, a tag or a commit
    commit: str  # what it resolved to; the download is pinned to it
    endpoint: str
    cache_dir: Path  # the HF hub cache (the folder holding models--org--name)
    files: tuple[RemoteFile, ...]
    bytes_on_disk: dict[str, int]  # path -> bytes already in the cache (its size when complete, less when partial)
    config: dict  # the repo's config.json, read at planning time so the caller can estimate memory

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the files already complete in the cache (checked again by `download`, not fetched)."""
        return sum(f.size for f in self.files if self.bytes_on_disk[f.path] == f.size)

    @property
    def bytes_to_download(self) -> int:
        return self.total_bytes - sum(self.bytes_on_disk.values())

    @property
    def snapshot_dir(self) -> Path:
        """Where the files appear: the HF-format model folder to convert from."""
        return _RepoCache(self.cache_dir, self.repo_id).snapshot(self.commit)


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report from `download` (at most every 0.1 s per file and stage, and once at the end)."""

    done_bytes: int  # bytes of the plan on disk and hashed, out of total_bytes
    total_bytes: int
    bytes_per_s: float | None  # network rate over the last few seconds; None until known
    eta_s: float | None  # at that rate
    current_file: str | None  # None once done
    stage: Literal["checking", "downloading", "done"]  # checking: hashing bytes already on disk


@dataclass(frozen=True)
class CachedModel:
    """A complete safetensors checkpoint found in the HF cache."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]  # branches/tags known to point at this commit, e.g. ("main",)
    snapshot_dir: Path  # the HF-format model folder
    size_bytes: int
    model_type: str | None  # config.json "model_type", e.g. "mixtral"


# ---- token -------------------------------------------------------------------------------------------------
def resolve_token(typed: str | None = None) -> str | None:
    """The token to send: one the user typed (kept in memory only) > `HF_TOKEN` > the `hf auth login` token."""
    for candidate in (typed, os.environ.get("HF_TOKEN")):
        if candidate and candidate.strip():
            return candidate.strip()
    return get_token()


# ---- planning ----------------------------------------------------------------------------------------------
def plan_download(
    repo_id: str,
    revision: str | None = None,
    *,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | Path | None = None,
) -> DownloadPlan:
    """Resolve `revision` (default "main") to a commit, list the files to fetch with their sizes and hashes, see
    what the cache already holds, and read config.json.

    `token` is sent as given (None: anonymous); get it from `resolve_token`. Fetching config.json also tells
    whether the account may download at all: the hub lists a gated repo's files to anyone.
    Raises RepoNotFoundError, RevisionNotFoundError, GatedRepoError, AuthError, NetworkError, UnsupportedRepoError.
    """
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
    revision = revision or constants.DEFAULT_REVISION
    with _hub_errors(repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
        api = HfApi(endpoint=endpoint, token=token or False, library_name=_LIBRARY_NAME)
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=_TIMEOUT.read)
        if not info.sha:
            raise HubError(f"{endpoint} did not say which commit '{revision}' of {repo_id} is: is it a hub?")
        files = _wanted_files(repo_id, info.siblings or [], endpoint)
        response = get_session().get(
            _file_url(endpoint, repo_id, info.sha, "config.json"),
            headers=_request_headers(token),
            timeout=_TIMEOUT,
            follow_redirects=True,
        )
        hf_raise_for_status(response)
    try:
        config = json.loads(response.content)
    except ValueError as error:
        raise UnsupportedRepoError(f"The config.json of {repo_id} is not valid JSON ({error}).") from error
    cache = _RepoCache(cache_dir, repo_id)
    return DownloadPlan(
        repo_id=repo_id,
        revision=revision,
        commit=info.sha,
        endpoint=endpoint,
        cache_dir=cache_dir,
        files=files,
        bytes_on_disk={f.path: cache.bytes_on_disk(info.sha, f) for f in files},
        config=config,
    )


def _wanted_files(repo_id: str, siblings, endpoint: str) -> tuple[RemoteFile, ...]:
    files = []
    for sibling in siblings:
        name = sibling.rfilename
        if "/" in name or not any(fnmatch.fnmatchcase(name, pattern) for pattern in WANTED_FILES):
            continue
        if sibling.size is None or sibling.blob_id is None:
            raise HubError(
                f"{endpoint} did not report file sizes for {repo_id}: is it really a Hugging Face hub? "
                "(Check HF_ENDPOINT.)"
            )
        sha256 = sibling.lfs.sha256 if sibling.lfs is not None else None
        files.append(RemoteFile(path=name, size=sibling.size, sha256=sha256, git_oid=sibling.blob_id))
    names = {f.path for f in files}
    lacking = []
    if "config.json" not in names:
        lacking.append("config.json")
    if not any(name.endswith(".safetensors") for name in names):
        lacking.append("weights in .safetensors format")
    if not names & {"tokenizer.model", "tokenizer.json"}:
        lacking.append("tokenizer (tokenizer.model or tokenizer.json)")
    if lacking:
        raise UnsupportedRepoError(
            f"{repo_id} cannot be used: it has no {' and no '.join(lacking)}. "
            f"mixtral-chat needs a transformers-format repo such as {EXAMPLE_REPO}."
        )
    return tuple(sorted(files, key=lambda f: f.path))


# ---- disk space --------------------------------------------------------------------------------------------
def check_disk_space(plan: DownloadPlan, *, output_dir: str | Path, output_bytes: int) -> None:
    """Raise DiskSpaceError unless what is left to download fits on the cache's disk and `output_bytes` (the
    converted checkpoint, as the caller estimates it) fits on the output folder's disk; the two add up when they
    are on the same filesystem. Folders that do not exist yet are measured at their nearest existing parent."""
    needs: dict[int, tuple[list[Path], list[tuple[int, str]]]] = {}  # device -> (folders, [(bytes, what)])
    for folder, n_bytes, what in (
        (plan.cache_dir, plan.bytes_to_download, "to download"),
        (Path(output_dir).expanduser().resolve(), output_bytes, "for the converted model"),
    ):
        device = _nearest_existing(folder).stat().st_dev
        folders, parts = needs.setdefault(device, ([], []))
        folders.append(folder)
        parts.append((n_bytes, what))
    problems = []
    for folders, parts in needs.values():
        need = sum(n for n, _ in parts)
        free = shutil.disk_usage(_nearest_existing(folders[0])).free
        if need > free:
            detail = " + ".join(f"{format_bytes(n)} {what}" for n, what in parts)
            where = " and ".join(str(f) for f in folders)
            problems.append(
                f"{where} needs {format_bytes(need)} ({detail}) but that disk has only {format_bytes(free)} free "
                f"(free up {format_bytes(need - free)})"
            )
    if problems:
        raise DiskSpaceError(
            "Not enough disk space: " + "; ".join(problems) + ". Free up space or choose folders on a disk with "
            "more room, then try again."
        )


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    return folder


# ---- download ----------------------------------------------------------------------------------------------
def download(
    plan: DownloadPlan,
    *,
    token: str | None = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    give_up_after_s: float = 60.0,
) -> Path:
    """Fetch what `plan` lists into the HF cache and return the snapshot folder (the HF-format model folder).

    Partial files (from a cancel, an error or a killed process) are continued with an HTTP Range request. Every
    file is checked against the hub's hash (sha256 for LFS files, the git blob id otherwise), files that were
    already in the cache too; a mismatch deletes the bad copy and raises ChecksumError. A lost connection is
    retried with back-off until `give_up_after_s` pass without a byte, then NetworkError. `should_cancel` (e.g.
    `event.is_set`) is polled at least every 0.1 s; it raises DownloadCancelled. Whatever is raised, the bytes
    on disk are kept for the next call. Call `check_disk_space` first; a disk that fills up anyway raises
    DiskSpaceError. `on_progress` is called in this thread.
    """
    return _Download(plan, token, on_progress, should_cancel, give_up_after_s).run()


@dataclass(frozen=True)
class _RepoCache:
    """The paths of one repo in the HF cache (layout in the module docstring)."""

    cache_dir: Path
    repo_id: str

    @property
    def folder_name(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")

    def snapshot(self, commit: str) -> Path:
        return self.cache_dir / self.folder_name / "snapshots" / commit

    def pointer(self, commit: str, file: RemoteFile) -> Path:
        return self.snapshot(commit) / file.path

    def blob(self, file: RemoteFile) -> Path:
        return self.cache_dir / self.folder_name / "blobs" / file.blob_name

    def partial(self, file: RemoteFile) -> Path:
        return self.cache_dir / self.folder_name / "blobs" / f"{file.blob_name}.incomplete"

    def ref(self, revision: str) -> Path:
        return self.cache_dir / self.folder_name / "refs" / revision

    def lock(self, file: RemoteFile) -> Path:
        return self.cache_dir / ".locks" / self.folder_name / f"{file.blob_name}.lock"

    def complete_copy(self, commit: str, file: RemoteFile) -> Path | None:
        """The file's content of the right size in the cache (snapshot entry, else blob), if there is one."""
        for path in (self.pointer(commit, file), self.blob(file)):
            if path.is_file() and path.stat().st_size == file.size:
                return path
        return None

    def bytes_on_disk(self, commit: str, file: RemoteFile) -> int:
        if self.complete_copy(commit, file) is not None:
            return file.size
        partial = self.partial(file)
        size = partial.stat().st_size if partial.is_file() else 0
        return size if size <= file.size else 0  # a longer partial file is garbage: it will be restarted


class _ProgressMeter:
    """Turns byte counts into throttled DownloadProgress reports, with the network rate over a sliding window."""

    def __init__(self, total_bytes: int, on_progress: Callable[[DownloadProgress], None] | None):
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self._on_progress = on_progress
        self._network_bytes = 0
        self._samples: deque[tuple[float, int]] = deque()  # (monotonic time, network bytes so far)
        self._last_report = (float("-inf"), None, None)  # (time, file, stage)

    def add(self, n_bytes: int, *, file: str, stage: Literal["checking", "downloading"]) -> None:
        now = time.monotonic()
        self.done_bytes += n_bytes
        if stage == "downloading":
            self._network_bytes += n_bytes
            self._samples.append((now, self._network_bytes))
            while len(self._samples) > 2 and self._samples[1][0] < now - _RATE_WINDOW_S:
                self._samples.popleft()
        last_time, last_file, last_stage = self._last_report
        if (file, stage) == (last_file, last_stage) and now - last_time < _PROGRESS_EVERY_S:
            return
        self._report(now, file, stage)

    def discard(self, n_bytes: int, *, file: str) -> None:
        """Bytes counted as done that were thrown away (a server that ignored a resume request)."""
        self.done_bytes -= n_bytes
        self._report(time.monotonic(), file, "downloading")

    def finish(self) -> None:
        self._report(time.monotonic(), None, "done")

    def _report(self, now: float, file: str | None, stage: Literal["checking", "downloading", "done"]) -> None:
        self._last_report = (now, file, stage)
        if self._on_progress is None:
            return
        rate = None
        if self._samples and now - self._samples[0][0] >= 0.5:
            rate = (self._network_bytes - self._samples[0][1]) / (now - self._samples[0][0])
        eta = (self.total_bytes - self.done_bytes) / rate if rate else None
        self._on_progress(DownloadProgress(self.done_bytes, self.total_bytes, rate, eta, file, stage))


class _PartialBlob:
    """A blob's `.incomplete` file, open for appending, with the running hash of all its bytes: a resumed
    download reads what is already on disk once, and a finished one is verified without reading it again."""

    def __init__(self, path: Path, file: RemoteFile):
        self.path = path
        self.file = file
        path.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(path, "ab")
        self.size = self._out.tell()
        self._hasher = file.new_hasher()

    def __enter__(self) -> _PartialBlob:
        return self

    def __exit__(self, *exc_info) -> None:
        self._out.close()

    def hash_existing(self, on_block: Callable[[int], None]) -> None:
        """Hash the bytes a previous run left (they are not fetched again); `on_block(n)` after each block."""
        if self.size > self.file.size:
            self.restart()
            return
        with open(self.path, "rb") as existing:
            while block := existing.read(min(_HASH_BLOCK, self.size - existing.tell())):
                self._hasher.update(block)
                on_block(len(block))

    def append(self, chunk: bytes) -> None:
        self._out.write(chunk)
        self._hasher.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        self._out.seek(0)
        self._out.truncate()
        self.size = 0
        self._hasher = self.file.new_hasher()

    def matches(self) -> bool:
        self._out.flush()
        return self.size == self.file.size and self._hasher.hexdigest() == self.file.blob_name


class _ResponseStream:
    """A GET whose body a daemon thread reads into a small queue, so the downloading thread can look at
    should_cancel every _POLL_S even while the network is silent (a blocked socket read cannot be interrupted).

    Items, in order: the response (status >= 400 already raised as huggingface_hub's typed error), its body
    chunks, then `END`; or an exception at any point."""

    END = object()

    def __init__(self, url: str, headers: dict[str, str]):
        self._items: queue.Queue = queue.Queue(maxsize=_QUEUED_CHUNKS)
        self._closed = threading.Event()
        threading.Thread(target=self._read, args=(url, headers), name="hub-download", daemon=True).start()

    def _read(self, url: str, headers: dict[str, str]) -> None:
        try:
            with get_session().stream(
                "GET", url, headers=headers, timeout=_TIMEOUT, follow_redirects=True
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                self._put(response)
                for chunk in response.iter_bytes():
                    if not self._put(chunk):
                        return
            self._put(self.END)
        except Exception as error:  # handed to the downloading thread, which decides what it means
            self._put(error)

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._items.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                pass
        return False

    def get(self, timeout: float):
        """The next item; raises queue.Empty after `timeout` seconds without one."""
        return self._items.get(timeout=timeout)

    def close(self) -> None:
        """Stop reading (the thread ends at its next chunk or at the read timeout)."""
        self._closed.set()


class _Download:
    """One `download` call: fetches and checks the plan's files one at a time, under huggingface_hub's locks."""

    def __init__(
        self,
        plan: DownloadPlan,
        token: str | None,
        on_progress: Callable[[DownloadProgress], None] | None,
        should_cancel: Callable[[], bool] | None,
        give_up_after_s: float,
    ):
        self.plan = plan
        self.cache = _RepoCache(plan.cache_dir, plan.repo_id)
        self.token = token
        self.headers = _request_headers(token)
        self.should_cancel = should_cancel or (lambda: False)
        self.give_up_after_s = give_up_after_s
        self.meter = _ProgressMeter(plan.total_bytes, on_progress)
        self.current_file: RemoteFile | None = None

    def run(self) -> Path:
        snapshot = self.plan.snapshot_dir
        try:
            snapshot.mkdir(parents=True, exist_ok=True)
            if self.plan.revision != self.plan.commit:
                _write_atomically(self.cache.ref(self.plan.revision), self.plan.commit)
            # Files already complete first: a corrupt one is reported before a long download.
            files = sorted(self.plan.files, key=lambda f: self.cache.complete_copy(self.plan.commit, f) is None)
            for file in files:
                self.current_file = file
                with self._locked(file):
                    self._obtain(file)
        except OSError as error:
            disk_error = self._disk_error(error)
            if disk_error is None:
                raise
            raise disk_error from error
        self.meter.finish()
        return snapshot

    # ---- one file -------------------------------------------------------------------------------------------
    def _obtain(self, file: RemoteFile) -> None:
        existing = self.cache.complete_copy(self.plan.commit, file)
        if existing is not None:
            self._verify_existing(file, existing)
        else:
            self._fetch(file)
        pointer = self.cache.pointer(self.plan.commit, file)
        if not pointer.is_file():  # else: a symlink to this (just verified) content, or a copy of it
            link = pointer.with_name(f".{pointer.name}.link")
            link.unlink(missing_ok=True)
            os.symlink(os.path.relpath(self.cache.blob(file), pointer.parent), link)
            os.replace(link, pointer)

    def _verify_existing(self, file: RemoteFile, path: Path) -> None:
        hasher = file.new_hasher()
        with open(path, "rb") as content:
            while block := content.read(_HASH_BLOCK):
                hasher.update(block)
                self._checked(file, len(block))
        if hasher.hexdigest() != file.blob_name:
            for stale in (self.cache.pointer(self.plan.commit, file), self.cache.blob(file)):
                stale.unlink(missing_ok=True)
            raise ChecksumError(
                f"{file.path} in the Hugging Face cache is corrupt (its hash does not match the hub's). "
                "The bad copy was deleted: run the download again to fetch it afresh."
            )

    def _fetch(self, file: RemoteFile) -> None:
        partial_path = self.cache.partial(file)
        with _PartialBlob(partial_path, file) as partial:
            partial.hash_existing(lambda n: self._checked(file, n))
            self._transfer(file, partial)
            intact = partial.matches()
        if not intact:
            partial_path.unlink()
            raise ChecksumError(
                f"{file.path} arrived corrupted (its hash does not match the hub's), so it was deleted. Run the "
                "download again; if it happens again, something between you and the hub (a proxy, antivirus or "
                "faulty network hardware) is altering the data."
            )
        os.replace(partial_path, self.cache.blob(file))

    def _transfer(self, file: RemoteFile, partial: _PartialBlob) -> None:
        """Fill `partial` up to the file's size, resuming after every dropped connection."""
        last_byte_at = time.monotonic()
        wait_s = _FIRST_RETRY_WAIT_S
        while partial.size < file.size:
            size_before = partial.size
            try:
                self._stream_once(file, partial)
                failure, reason = None, "the server sent no data"
            except _HUB_ERRORS as error:
                if not _is_transient(error):
                    raise self._hub_error(error) from error
                failure, reason = error, _describe(error)
            if partial.size > size_before:  # it moved: continue from where it stopped, at once
                last_byte_at = time.monotonic()
                wait_s = _FIRST_RETRY_WAIT_S
                continue
            silent_s = time.monotonic() - last_byte_at
            if silent_s >= self.give_up_after_s:
                raise NetworkError(
                    f"Lost the connection to the hub while downloading {file.path} ({reason}). "
                    f"{self._kept()} downloaded so far are kept: check your connection and run the download again "
                    "to continue from there."
                ) from failure
            self._sleep(min(wait_s, self.give_up_after_s - silent_s))
            wait_s = min(2 * wait_s, _MAX_RETRY_WAIT_S)

    def _stream_once(self, file: RemoteFile, partial: _PartialBlob) -> None:
        headers = dict(self.headers)
        if partial.size:
            headers["Range"] = f"bytes={partial.size}-"
        stream = _ResponseStream(_file_url(self.plan.endpoint, self.plan.repo_id, self.plan.commit, file.path), headers)
        try:
            response = self._next(stream)
            if partial.size and response.status_code != 206:  # the server ignored the Range: take it all
                self.meter.discard(partial.size, file=file.path)
                partial.restart()
            while (chunk := self._next(stream)) is not _ResponseStream.END:
                partial.append(chunk)
                self.meter.add(len(chunk), file=file.path, stage="downloading")
        finally:
            stream.close()

    def _next(self, stream: _ResponseStream):
        while True:
            self._check_cancel()
            try:
                item = stream.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, Exception):
                raise item
            return item

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _checked(self, file: RemoteFile, n_bytes: int) -> None:
        self._check_cancel()
        self.meter.add(n_bytes, file=file.path, stage="checking")

    def _check_cancel(self) -> None:
        if self.should_cancel():
            raise DownloadCancelled(
                f"Download cancelled. {self._kept()} are on disk and kept: run the download again to continue."
            )

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check_cancel()
            time.sleep(min(_POLL_S, left))

    @contextmanager
    def _locked(self, file: RemoteFile) -> Iterator[None]:
        """huggingface_hub's per-blob lock, so a concurrent hf/transformers download of the blob waits for us."""
        path = self.cache.lock(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(path, mode=0o664)
        while True:
            try:
                lock.acquire(timeout=_POLL_S)
                break
            except filelock.Timeout:
                self._check_cancel()
        try:
            yield
        finally:
            lock.release()

    def _bytes_on_disk(self) -> int:
        return sum(self.cache.bytes_on_disk(self.plan.commit, f) for f in self.plan.files)

    def _kept(self) -> str:
        return f"{format_bytes(self._bytes_on_disk())} of {format_bytes(self.plan.total_bytes)}"

    def _hub_error(self, error: Exception) -> HubError:
        return _translate(
            error, repo_id=self.plan.repo_id, revision=self.plan.revision, endpoint=self.plan.endpoint, token=self.token
        )

    def _disk_error(self, error: OSError) -> HubError | None:
        """The HubError for a failed write to the cache, or None if `error` is something else."""
        where = self.plan.cache_dir
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(_nearest_existing(where)).free
            left = self.plan.total_bytes - self._bytes_on_disk()
            saving = f" while saving {self.current_file.path}" if self.current_file else ""
            return DiskSpaceError(
                f"The disk holding {where} is full{saving} ({format_bytes(free)} free). Free up at least {format_bytes(left)} and "
                f"run the download again; the {self._kept()} already downloaded are kept."
            )
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return HubError(
                f"Cannot write to the Hugging Face cache at {where} ({error.strerror}). Choose a writable cache "
                "folder (HF_HUB_CACHE) and try again."
            )
        return None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ---- HTTP and error translation ----------------------------------------------------------------------------
def _file_url(endpoint: str, repo_id: str, commit: str, path: str) -> str:
    return f"{endpoint}/{repo_id}/resolve/{commit}/{quote(path)}"


def _request_headers(token: str | None) -> dict[str, str]:
    headers = build_hf_headers(token=token or False, library_name=_LIBRARY_NAME)
    headers["Accept-Encoding"] = "identity"  # byte ranges and sizes must refer to the file itself
    return headers


def _is_transient(error: Exception) -> bool:
    """Worth retrying: the connection failed or dropped, or the hub is overloaded or briefly down."""
    if isinstance(error, hf_errors.HfHubHTTPError):
        return error.response is not None and error.response.status_code in _TRANSIENT_STATUS
    return isinstance(error, httpx2.TransportError)


def _describe(error: Exception) -> str:
    if isinstance(error, hf_errors.HfHubHTTPError) and error.response is not None:
        return f"the hub answered HTTP {error.response.status_code}"
    return str(error) or type(error).__name__


@contextmanager
def _hub_errors(**where) -> Iterator[None]:
    """Turn huggingface_hub / HTTP errors raised inside into HubErrors; `where`: see `_translate`."""
    try:
        yield
    except _HUB_ERRORS as error:
        raise _translate(error, **where) from error


def _translate(error: Exception, *, repo_id: str, revision: str, endpoint: str, token: str | None) -> HubError:
    """The HubError for a huggingface_hub or httpx2 error, with a message that says what to do."""
    repo_url = f"{endpoint}/{repo_id}"
    if isinstance(error, hf_errors.GatedRepoError):  # (a subclass of RepositoryNotFoundError: test it first)
        if token is None:
            message = (
                f"{repo_id} is a gated model: only accounts granted access may download it. Request access at "
                f"{repo_url}, then {_LOGIN_HINT}."
            )
        else:
            message = (
                f"Your Hugging Face account has not been granted access to {repo_id} yet. Request access at "
                f"{repo_url} (some authors review requests by hand), then try again."
            )
        return GatedRepoError(message, access_url=repo_url)
    if isinstance(error, hf_errors.RevisionNotFoundError):
        return RevisionNotFoundError(
            f"{repo_id} has no branch, tag or commit named '{revision}'. Check the revision, or leave it out to "
            "use 'main'."
        )
    if isinstance(error, hf_errors.RepositoryNotFoundError):
        if token is None:
            private = f"If it is private, {_LOGIN_HINT}."
        else:
            private = "If it is private, check that your token's account can read it."
        return RepoNotFoundError(
            f"There is no model repo '{repo_id}' on {endpoint}. Check the name (it looks like org/name, e.g. "
            f"{EXAMPLE_REPO}). {private}"
        )
    if isinstance(error, hf_errors.HFValidationError):
        return RepoNotFoundError(f"'{repo_id}' is not a valid repo id: it looks like org/name, e.g. {EXAMPLE_REPO}.")
    if isinstance(error, hf_errors.OfflineModeIsEnabled):
        return NetworkError(f"HF_HUB_OFFLINE is set, so nothing can be downloaded: unset it to download {repo_id}.")
    if isinstance(error, hf_errors.HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        server_says = f" The hub said: {error.server_message}" if error.server_message else ""
        if status == 401:
            return AuthError(
                f"The Hugging Face hub rejected your token (it is invalid, expired or revoked). Create a read "
                f"token at {endpoint}/settings/tokens, then {_LOGIN_HINT}."
            )
        if status == 403:
            return AuthError(
                f"Your token is not allowed to read {repo_id}.{server_says} Use a token with read access (for a "
                "fine-grained token, allow reading public gated repos), then try again."
            )
        if status == 429:
            return NetworkError("The hub is limiting how fast you can download: wait a few minutes and try again.")
        if status >= 500:
            return NetworkError(f"The Hugging Face hub is having trouble (HTTP {status}): try again in a few minutes.")
        return HubError(f"The hub refused the request for {repo_id} (HTTP {status}).{server_says}")
    return NetworkError(
        f"Could not reach {endpoint} ({_describe(error)}). Check your internet connection and proxy settings, "
        "then try again."
    )


# ---- what the cache already holds --------------------------------------------------------------------------
def find_cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Snapshots in the HF cache that hold a complete safetensors checkpoint with its config.json (every shard an
    index names, or a single-file checkpoint), sorted by repo id; for "reuse weights already downloaded"."""
    try:
        cache_info = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except hf_errors.CacheNotFound:
        return []
    models = []
    for repo in cache_info.repos:  # repos the scan found corrupted are left out (cache_info.warnings)
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            config = _complete_checkpoint_config(revision.snapshot_path)
            if config is not None:
                models.append(
                    CachedModel(
                        repo_id=repo.repo_id,
                        commit=revision.commit_hash,
                        refs=tuple(sorted(revision.refs)),
                        snapshot_dir=revision.snapshot_path,
                        size_bytes=revision.size_on_disk,
                        model_type=config.get("model_type"),
                    )
                )
    return sorted(models, key=lambda m: (m.repo_id, m.commit))


def _complete_checkpoint_config(snapshot: Path) -> dict | None:
    """The snapshot's config.json if it holds a complete safetensors checkpoint, else None."""
    try:
        config = json.loads((snapshot / "config.json").read_text())
        indexes = [json.loads(p.read_text()) for p in snapshot.glob("*.safetensors.index.json")]
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if indexes:
        shards = {name for index in indexes for name in index.get("weight_map", {}).values()}
        complete = bool(shards) and all((snapshot / shard).is_file() for shard in shards)
    else:
        complete = any(p.is_file() for p in snapshot.glob("*.safetensors"))
    return config if complete else None
