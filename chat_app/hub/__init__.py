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

One module per concern: `errors` (HubError, and huggingface_hub's errors translated into it), `plan` (what
to fetch, the cache layout, disk space), `transfer` (the download itself), `cache_scan` (checkpoints already
in the cache); import the names below from `chat_app.hub`. Every function is synchronous, for a worker
thread. `download` reports progress through a callback and looks at `should_cancel` every 0.1 s, even while
the network is silent. Every error is a `HubError` whose message tells the user what to do. huggingface_hub
reads its environment variables at import, so the endpoint, cache folder and token are always passed to it
explicitly.
"""

from chat_app.hub.cache_scan import CachedModel, find_cached_models
from chat_app.hub.errors import (
    EXAMPLE_REPO,
    AuthError,
    ChecksumError,
    DiskSpaceError,
    DownloadCancelled,
    GatedRepoError,
    HubError,
    NetworkError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsupportedRepoError,
)
from chat_app.hub.plan import WANTED_FILES, DownloadPlan, RemoteFile, check_disk_space, plan_download, resolve_token
from chat_app.hub.transfer import DownloadProgress, download

__all__ = [
    "EXAMPLE_REPO", "WANTED_FILES", "AuthError", "CachedModel", "ChecksumError", "DiskSpaceError", "DownloadCancelled",
    "DownloadPlan", "DownloadProgress", "GatedRepoError", "HubError", "NetworkError", "RemoteFile", "RepoNotFoundError",
    "RevisionNotFoundError", "UnsupportedRepoError", "check_disk_space", "download", "find_cached_models",
    "plan_download", "resolve_token",
]
