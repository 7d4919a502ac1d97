"""The transfer engine: fetches a `DownloadPlan`'s files into the HF cache, resumable (HTTP Range on the
`.incomplete` file a cancel, an error or a killed process left), verified against the hub's hashes, retried
with back-off while the network is down, cancellable every 0.1 s even while the network is silent, and
under huggingface_hub's per-blob locks."""

from __future__ import annotations

import errno
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

import filelock
from huggingface_hub.utils import get_session, hf_raise_for_status

from chat_app.hub.errors import (
    HUB_ERRORS,
    ChecksumError,
    DiskSpaceError,
    DownloadCancelled,
    HubError,
    NetworkError,
    describe,
    is_transient,
    translate,
)
from chat_app.hub.plan import TIMEOUT, DownloadPlan, RemoteFile, RepoCache, file_url, nearest_existing, request_headers
from chat_app.terminal import format_bytes

_POLL_S = 0.1  # how often a waiting download looks at should_cancel
_PROGRESS_EVERY_S = 0.1
_RATE_WINDOW_S = 5.0
_HASH_BLOCK = 8 * 1024 * 1024
_QUEUED_CHUNKS = 64  # network chunks (~64 kB each) buffered between the reader thread and the writer
_FIRST_RETRY_WAIT_S = 0.5
_MAX_RETRY_WAIT_S = 8.0


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report from `download` (at most every 0.1 s per file and stage, and once at the end)."""

    done_bytes: int  # bytes of the plan on disk and hashed, out of total_bytes
    total_bytes: int
    bytes_per_s: float | None  # network rate over the last few seconds; None until known
    eta_s: float | None  # at that rate
    current_file: str | None  # None once done
    stage: Literal["checking", "downloading", "done"]  # checking: hashing bytes already on disk


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
                "GET", url, headers=headers, timeout=TIMEOUT, follow_redirects=True
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
        self.cache = RepoCache(plan.cache_dir, plan.repo_id)
        self.token = token
        self.headers = request_headers(token)
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
            except HUB_ERRORS as error:
                if not is_transient(error):
                    raise self._hub_error(error) from error
                failure, reason = error, describe(error)
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
        stream = _ResponseStream(file_url(self.plan.endpoint, self.plan.repo_id, self.plan.commit, file.path), headers)
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
        return translate(
            error, repo_id=self.plan.repo_id, revision=self.plan.revision, endpoint=self.plan.endpoint, token=self.token
        )

    def _disk_error(self, error: OSError) -> HubError | None:
        """The HubError for a failed write to the cache, or None if `error` is something else."""
        where = self.plan.cache_dir
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(nearest_existing(where)).free
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
