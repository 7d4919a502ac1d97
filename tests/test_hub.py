"""chat_app.hub against a real HTTP server standing in for the hub (tests/fake_hub.py), with a tiny random Mixtral
made by transformers and the real Mixtral tokenizer. Nothing is mocked: real sockets, real files, real cache."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import huggingface_hub
import pytest
from fake_hub import BIG_SHARD, DECOY_FILES, TINY_MIXTRAL_REPO_ID, FakeHub, partial_download_bytes
from huggingface_hub import constants as hf_constants

from chat_app.hub import (
    AuthError,
    ChecksumError,
    DiskSpaceError,
    DownloadCancelled,
    GatedRepoError,
    NetworkError,
    RepoNotFoundError,
    RevisionNotFoundError,
    UnsupportedRepoError,
    check_disk_space,
    download,
    find_cached_models,
    plan_download,
    resolve_token,
)
from chat_app.terminal import format_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
WANTED = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer_config.json",
    *(f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)),
}


def plan_from(hub: FakeHub, cache_dir: Path, **kwargs):
    return plan_download(hub.repo_id, endpoint=hub.url, cache_dir=cache_dir, **kwargs)


def blobs_dir(cache_dir: Path) -> Path:
    return cache_dir / "models--tiny-org--tiny-mixtral" / "blobs"


def partial_of(hub: FakeHub, cache_dir: Path, path: str) -> Path:
    return blobs_dir(cache_dir) / f"{hub.files[path].sha256}.incomplete"


def assert_snapshot_matches_repo(snapshot: Path, repo_folder: Path) -> None:
    assert {p.name for p in snapshot.iterdir()} == WANTED
    for name in WANTED:
        assert (snapshot / name).read_bytes() == (repo_folder / name).read_bytes(), name


# ---- planning ----------------------------------------------------------------------------------------------
def test_plan_lists_only_the_needed_files_with_their_sizes_hashes_and_config(hub, cache_dir, repo_folder):
    plan = plan_from(hub, cache_dir)

    assert plan.commit == hub.commit and plan.revision == "main"
    assert {f.path for f in plan.files} == WANTED  # no .bin / .pt / README / sub-folders
    assert not {f.path for f in plan.files} & set(DECOY_FILES)
    for f in plan.files:
        data = (repo_folder / f.path).read_bytes()
        assert f.size == len(data)
        lfs = f.path.endswith((".safetensors", ".model"))
        assert f.sha256 == (hashlib.sha256(data).hexdigest() if lfs else None)
    assert plan.total_bytes == sum((repo_folder / name).stat().st_size for name in WANTED)
    assert plan.cached_bytes == 0 and plan.bytes_to_download == plan.total_bytes
    assert plan.config["model_type"] == "mixtral" and plan.config["num_local_experts"] == 4
    assert not cache_dir.exists()  # planning writes nothing


def test_a_repo_without_safetensors_or_tokenizer_is_refused_saying_what_it_lacks(tmp_path, cache_dir):
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "mixtral"}')
    (folder / "pytorch_model.bin").write_bytes(bytes(100))
    with FakeHub("old-org/bin-only", folder) as old_hub:
        with pytest.raises(UnsupportedRepoError) as error:
            plan_download(old_hub.repo_id, endpoint=old_hub.url, cache_dir=cache_dir)
    assert "has no weights in .safetensors format and no tokenizer" in error.value.message


def test_unknown_revision_and_unknown_or_malformed_repo_are_named(hub, cache_dir):
    with pytest.raises(RevisionNotFoundError, match="'v9'"):
        plan_from(hub, cache_dir, revision="v9")
    with pytest.raises(RepoNotFoundError, match="tiny-org/nope") as missing:
        plan_download("tiny-org/nope", endpoint=hub.url, cache_dir=cache_dir)
    assert "HF_TOKEN" in missing.value.message  # it may be private: say how to log in
    with pytest.raises(RepoNotFoundError, match="not a valid repo id"):
        plan_download("not a repo", endpoint=hub.url, cache_dir=cache_dir)


def test_unreachable_hub_is_a_network_error_naming_it(cache_dir):
    with socket.socket() as sock:  # a port nothing listens on: bound, never listening, so connections are refused
        sock.bind(("127.0.0.1", 0))
        endpoint = "http://127.0.0.1:%d" % sock.getsockname()[1]
        with pytest.raises(NetworkError, match="Could not reach") as error:
            plan_download(TINY_MIXTRAL_REPO_ID, endpoint=endpoint, cache_dir=cache_dir)
    assert endpoint in error.value.message


# ---- tokens and gated repos --------------------------------------------------------------------------------
def test_gated_repo_without_token_says_where_to_request_access_and_how_to_log_in(hub, cache_dir):
    hub.gated = True
    with pytest.raises(GatedRepoError) as error:
        plan_from(hub, cache_dir)
    assert error.value.access_url == f"{hub.url}/{hub.repo_id}"
    assert error.value.access_url in error.value.message
    assert "HF_TOKEN" in error.value.message and "hf auth login" in error.value.message


def test_gated_repo_with_a_token_not_granted_access_says_where_to_request_it(hub, cache_dir):
    hub.gated = True
    hub.known_tokens = {"hf_waiting"}
    with pytest.raises(GatedRepoError, match="not been granted access") as error:
        plan_from(hub, cache_dir, token="hf_waiting")
    assert f"{hub.url}/{hub.repo_id}" in error.value.message


def test_rejected_token_says_how_to_get_a_new_one(hub, cache_dir):
    with pytest.raises(AuthError, match="rejected your token") as error:
        plan_from(hub, cache_dir, token="hf_expired")
    assert f"{hub.url}/settings/tokens" in error.value.message


def test_granted_token_downloads_a_gated_repo_and_goes_only_to_the_hub_and_nowhere_on_disk(
    hub, cache_dir, repo_folder
):
    hub.gated = True
    hub.known_tokens = hub.granted_tokens = {"hf_granted_secret"}
    snapshot = download(plan_from(hub, cache_dir, token="hf_granted_secret"), token="hf_granted_secret")

    assert_snapshot_matches_repo(snapshot, repo_folder)
    resolves = [r for r in hub.requests if "/resolve/" in r.path]
    cdn = [r for r in hub.requests if r.path.startswith("/cdn/")]
    assert resolves and cdn
    assert all(r.headers.get("authorization") == "Bearer hf_granted_secret" for r in resolves)
    assert all("authorization" not in r.headers for r in cdn)  # another origin: the token must not leak
    for path in cache_dir.rglob("*"):
        if path.is_file():
            assert b"hf_granted_secret" not in path.read_bytes(), path


def test_resolve_token_prefers_typed_then_hf_token_then_the_login(monkeypatch, tmp_path):
    login_file = tmp_path / "token"
    login_file.write_text("hf_from_login\n")
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(login_file))
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert resolve_token("  hf_typed  ") == "hf_typed"
    assert resolve_token("   ") == "hf_from_env"
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert resolve_token(None) == "hf_from_login"
    login_file.unlink()
    assert resolve_token(None) is None


# ---- a full download ---------------------------------------------------------------------------------------
def test_download_fills_the_standard_hf_cache_that_huggingface_hub_reads(hub, cache_dir, repo_folder):
    plan = plan_from(hub, cache_dir)
    snapshot = download(plan)

    assert snapshot == plan.snapshot_dir == cache_dir / "models--tiny-org--tiny-mixtral" / "snapshots" / hub.commit
    assert_snapshot_matches_repo(snapshot, repo_folder)
    for f in plan.files:  # each entry is a relative symlink to its content-addressed blob
        entry = snapshot / f.path
        assert entry.is_symlink() and not os.readlink(entry).startswith("/")
        assert entry.resolve() == blobs_dir(cache_dir) / f.blob_name
    assert not list(blobs_dir(cache_dir).glob("*.incomplete"))
    assert (cache_dir / "models--tiny-org--tiny-mixtral" / "refs" / "main").read_text() == hub.commit

    (repo,) = huggingface_hub.scan_cache_dir(cache_dir).repos
    assert repo.repo_id == hub.repo_id and repo.size_on_disk == plan.total_bytes
    (revision,) = repo.revisions
    assert revision.refs == {"main"} and revision.nb_files == len(WANTED)
    cached = huggingface_hub.try_to_load_from_cache(hub.repo_id, "config.json", cache_dir=cache_dir)
    assert cached == str(snapshot / "config.json")

    replan = plan_from(hub, cache_dir)
    assert replan.cached_bytes == replan.total_bytes and replan.bytes_to_download == 0
    hub.requests.clear()
    assert download(replan) == snapshot
    assert not [r for r in hub.requests if r.file is not None]  # nothing fetched again


def test_progress_reports_climb_to_the_total_with_a_rate(hub, cache_dir):
    hub.bytes_per_s = 8_000_000
    reports = []
    plan = plan_from(hub, cache_dir)
    download(plan, on_progress=reports.append)

    done = [r.done_bytes for r in reports]
    assert done == sorted(done) and len(reports) > 5
    assert reports[-1].done_bytes == reports[-1].total_bytes == plan.total_bytes
    assert reports[-1].stage == "done" and reports[-1].current_file is None
    assert {r.current_file for r in reports[:-1]} <= WANTED
    rated = [r for r in reports if r.bytes_per_s is not None]
    assert rated and all(r.bytes_per_s > 0 and r.eta_s >= 0 for r in rated)


def test_files_huggingface_hub_downloaded_are_reused_after_a_check(hub, cache_dir):
    snapshot = huggingface_hub.snapshot_download(
        hub.repo_id, endpoint=hub.url, cache_dir=cache_dir, token=False, allow_patterns=sorted(WANTED)
    )
    plan = plan_from(hub, cache_dir)
    assert plan.cached_bytes == plan.total_bytes

    hub.requests.clear()
    stages = set()
    assert download(plan, on_progress=lambda r: stages.add(r.stage)) == Path(snapshot)
    assert not hub.file_gets(BIG_SHARD) and stages == {"checking", "done"}


# ---- interruptions and resume ------------------------------------------------------------------------------
def test_lost_connection_keeps_the_partial_file_and_the_next_call_resumes_it(hub, cache_dir, repo_folder):
    cut_at = 1_500_000
    hub.cut_connection(BIG_SHARD, at_byte=cut_at)  # every attempt dies there
    plan = plan_from(hub, cache_dir)
    with pytest.raises(NetworkError, match=BIG_SHARD) as error:
        download(plan, give_up_after_s=0)
    assert "run the download again" in error.value.message
    assert partial_of(hub, cache_dir, BIG_SHARD).stat().st_size == cut_at
    assert plan_from(hub, cache_dir).bytes_on_disk[BIG_SHARD] == cut_at

    hub.clear_faults()
    hub.requests.clear()
    assert_snapshot_matches_repo(download(plan), repo_folder)
    (resumed,) = hub.file_gets(BIG_SHARD)
    assert resumed.headers["range"] == f"bytes={cut_at}-" and resumed.status == 206
    assert resumed.body_bytes == hub.files[BIG_SHARD].size - cut_at  # the bytes on disk were not fetched again


def test_dropped_connections_are_retried_and_resumed_within_the_same_call(hub, cache_dir, repo_folder):
    hub.cut_connection(BIG_SHARD, at_byte=1_000_000, times=2)  # the first retry gets nothing: it backs off
    assert_snapshot_matches_repo(download(plan_from(hub, cache_dir)), repo_folder)
    first, empty, last = hub.file_gets(BIG_SHARD)
    assert first.body_bytes == 1_000_000 and empty.body_bytes == 0
    assert empty.headers["range"] == last.headers["range"] == "bytes=1000000-"
    assert last.body_bytes == hub.files[BIG_SHARD].size - 1_000_000


def test_a_server_that_ignores_ranges_gets_the_whole_file_again(hub, cache_dir, repo_folder):
    hub.honour_ranges = False
    hub.cut_connection(BIG_SHARD, at_byte=1_000_000, times=1)
    assert_snapshot_matches_repo(download(plan_from(hub, cache_dir)), repo_folder)
    _, retry = hub.file_gets(BIG_SHARD)
    assert retry.headers["range"] == "bytes=1000000-" and retry.status == 200


def test_a_killed_process_leaves_a_partial_file_that_the_next_run_continues(hub, cache_dir, repo_folder):
    hub.bytes_per_s = 1_000_000
    script = textwrap.dedent(f"""
        from chat_app.hub import download, plan_download
        download(plan_download({hub.repo_id!r}, endpoint={hub.url!r}, cache_dir={str(cache_dir)!r}))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        while max(partial_download_bytes(blobs_dir(cache_dir)), default=0) < 200_000:
            assert child.poll() is None, "the download ended before it could be killed"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    (partial,) = blobs_dir(cache_dir).glob("*.incomplete")
    kept = partial.stat().st_size
    path = next(f.path for f in hub.lfs_files() if partial.name.startswith(f.sha256))

    hub.bytes_per_s = None
    hub.requests.clear()
    assert_snapshot_matches_repo(download(plan_from(hub, cache_dir)), repo_folder)
    assert hub.file_gets(path)[0].headers["range"] == f"bytes={kept}-"


def test_cancel_stops_the_download_and_a_second_call_resumes(hub, cache_dir, repo_folder):
    hub.bytes_per_s = 1_000_000
    cancel = threading.Event()

    def on_progress(report):
        if report.current_file == BIG_SHARD and report.done_bytes > 300_000:
            cancel.set()

    plan = plan_from(hub, cache_dir)
    with pytest.raises(DownloadCancelled, match="run the download again"):
        download(plan, on_progress=on_progress, should_cancel=cancel.is_set)
    kept = partial_of(hub, cache_dir, BIG_SHARD).stat().st_size
    assert 0 < kept < hub.files[BIG_SHARD].size  # stopped mid-file, not at its end

    hub.bytes_per_s = None
    hub.requests.clear()
    assert_snapshot_matches_repo(download(plan), repo_folder)
    assert hub.file_gets(BIG_SHARD)[0].headers["range"] == f"bytes={kept}-"


def test_cancel_works_while_the_server_is_silent(hub, cache_dir):
    """The hub stops sending mid-file without closing: cancel must not wait for the 30 s read timeout
    (with give_up_after_s=0 that wait would end in NetworkError, not DownloadCancelled)."""
    stall_at = 500_000
    hub.stall(BIG_SHARD, at_byte=stall_at)
    silent_since = None

    def should_cancel() -> bool:  # half a second after the hub sent its last byte
        nonlocal silent_since
        if silent_since is None and sum(r.body_bytes for r in hub.file_gets(BIG_SHARD)) >= stall_at:
            silent_since = time.monotonic()
        return silent_since is not None and time.monotonic() - silent_since > 0.5

    with pytest.raises(DownloadCancelled):
        download(plan_from(hub, cache_dir), should_cancel=should_cancel, give_up_after_s=0)
    assert partial_of(hub, cache_dir, BIG_SHARD).stat().st_size == stall_at  # every byte sent was kept


# ---- integrity ---------------------------------------------------------------------------------------------
def test_a_corrupted_shard_is_detected_named_and_removed(hub, cache_dir, repo_folder):
    shard = "model-00003-of-00005.safetensors"
    hub.corrupt(shard)
    plan = plan_from(hub, cache_dir)
    with pytest.raises(ChecksumError, match=shard):
        download(plan)
    sha = hub.files[shard].sha256
    assert not (blobs_dir(cache_dir) / sha).exists()
    assert not partial_of(hub, cache_dir, shard).exists()
    assert not (plan.snapshot_dir / shard).exists()

    hub.clear_faults()
    assert_snapshot_matches_repo(download(plan), repo_folder)


def test_a_corrupted_file_already_in_the_cache_is_deleted_and_fetched_again_next_time(hub, cache_dir, repo_folder):
    plan = plan_from(hub, cache_dir)
    download(plan)
    blob = blobs_dir(cache_dir) / hub.files[BIG_SHARD].sha256
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF  # bit rot: same size, so a size check alone would accept it
    blob.write_bytes(bytes(data))

    with pytest.raises(ChecksumError, match=f"{BIG_SHARD} in the Hugging Face cache is corrupt"):
        download(plan_from(hub, cache_dir))
    assert not blob.exists() and not (plan.snapshot_dir / BIG_SHARD).is_symlink()
    assert_snapshot_matches_repo(download(plan_from(hub, cache_dir)), repo_folder)


# ---- disk space --------------------------------------------------------------------------------------------
def test_disk_space_check_refuses_with_the_numbers(hub, cache_dir, tmp_path):
    plan = plan_from(hub, cache_dir)
    output_dir = tmp_path / "converted" / "not-created-yet"
    check_disk_space(plan, output_dir=output_dir, output_bytes=0)  # 9 MB fits

    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(DiskSpaceError) as error:
        check_disk_space(plan, output_dir=output_dir, output_bytes=free)
    message = error.value.message
    assert f"{format_bytes(free)} for the converted model" in message
    assert f"{format_bytes(plan.bytes_to_download)} to download" in message  # same disk: they add up
    assert str(output_dir) in message and "free up" in message.lower()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs /dev/shm")
def test_disk_space_is_checked_per_filesystem(hub, tmp_path):
    shm_free = shutil.disk_usage("/dev/shm").free
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev or shutil.disk_usage(tmp_path).free <= shm_free:
        pytest.skip("needs /dev/shm on its own filesystem, smaller than the temporary folder's")
    plan = plan_from(hub, tmp_path / "hf-cache")
    with pytest.raises(DiskSpaceError) as error:
        check_disk_space(plan, output_dir="/dev/shm/mixtral-chat-test", output_bytes=shm_free + 1)
    assert "/dev/shm/mixtral-chat-test needs" in error.value.message
    assert str(tmp_path / "hf-cache") not in error.value.message  # the cache's disk has room


def test_a_full_disk_is_a_clear_error_and_the_download_continues_once_there_is_room(hub, cache_dir, repo_folder):
    partial = partial_of(hub, cache_dir, BIG_SHARD)
    partial.parent.mkdir(parents=True)
    partial.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
    with pytest.raises(DiskSpaceError, match=f"is full while saving {BIG_SHARD}"):
        download(plan_from(hub, cache_dir))

    partial.unlink()
    assert_snapshot_matches_repo(download(plan_from(hub, cache_dir)), repo_folder)


# ---- reusing what is cached --------------------------------------------------------------------------------
def test_find_cached_models_lists_complete_checkpoints_only(hub, cache_dir):
    assert find_cached_models(cache_dir) == []  # no cache folder at all

    hub.cut_connection(BIG_SHARD, at_byte=100_000)
    with pytest.raises(NetworkError):
        download(plan_from(hub, cache_dir), give_up_after_s=0)
    assert find_cached_models(cache_dir) == []  # a shard is missing

    hub.clear_faults()
    plan = plan_from(hub, cache_dir)
    download(plan)
    (model,) = find_cached_models(cache_dir)
    assert model.repo_id == hub.repo_id and model.commit == hub.commit and model.refs == ("main",)
    assert model.snapshot_dir == plan.snapshot_dir
    assert model.size_bytes == plan.total_bytes and model.model_type == "mixtral"
