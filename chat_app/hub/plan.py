"""Planning a download: which files of a repo at which commit, their sizes and hashes, what the HF
cache already holds, and whether it all fits on the disk. Nothing is written. Also the cache layout
(`RepoCache`) and the HTTP basics the transfer shares."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx2
from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from chat_app.hub.errors import EXAMPLE_REPO, DiskSpaceError, HubError, UnsupportedRepoError, hub_errors
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
LIBRARY_NAME = "mixtral-chat"
TIMEOUT = httpx2.Timeout(10.0, read=30.0)  # no byte for 30 s: the connection is taken as lost


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
        return RepoCache(self.cache_dir, self.repo_id).snapshot(self.commit)


@dataclass(frozen=True)
class RepoCache:
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
    with hub_errors(repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
        api = HfApi(endpoint=endpoint, token=token or False, library_name=LIBRARY_NAME)
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=TIMEOUT.read)
        if not info.sha:
            raise HubError(f"{endpoint} did not say which commit '{revision}' of {repo_id} is: is it a hub?")
        files = _wanted_files(repo_id, info.siblings or [], endpoint)
        response = get_session().get(
            file_url(endpoint, repo_id, info.sha, "config.json"),
            headers=request_headers(token),
            timeout=TIMEOUT,
            follow_redirects=True,
        )
        hf_raise_for_status(response)
    try:
        config = json.loads(response.content)
    except ValueError as error:
        raise UnsupportedRepoError(f"The config.json of {repo_id} is not valid JSON ({error}).") from error
    cache = RepoCache(cache_dir, repo_id)
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
        device = nearest_existing(folder).stat().st_dev
        folders, parts = needs.setdefault(device, ([], []))
        folders.append(folder)
        parts.append((n_bytes, what))
    problems = []
    for folders, parts in needs.values():
        need = sum(n for n, _ in parts)
        free = shutil.disk_usage(nearest_existing(folders[0])).free
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


def nearest_existing(folder: Path) -> Path:
    while not folder.exists():
        folder = folder.parent
    return folder


# ---- HTTP ----------------------------------------------------------------------------------------------------
def file_url(endpoint: str, repo_id: str, commit: str, path: str) -> str:
    return f"{endpoint}/{repo_id}/resolve/{commit}/{quote(path)}"


def request_headers(token: str | None) -> dict[str, str]:
    headers = build_hf_headers(token=token or False, library_name=LIBRARY_NAME)
    headers["Accept-Encoding"] = "identity"  # byte ranges and sizes must refer to the file itself
    return headers
