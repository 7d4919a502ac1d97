"""`mixtral-chat setup --repo/--local` as a user runs it: real subprocesses against a real HTTP server standing
in for the hub (tests/fake_hub.py) serving a tiny random Mixtral, a real HF cache and data dir; plus the
planning rules (memory, dtype, names) on real configs, Mixtral-8x7B's included."""

from __future__ import annotations

import dataclasses
import json
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import BIG_SHARD, TINY_MIXTRAL_REPO_ID, FakeHub
from huggingface_hub import constants as hf_constants

import model
from chat_app import model_registry, paths
from chat_app.setup_flow import (
    DeviceMemory,
    SetupCancelled,
    SetupError,
    Source,
    default_name,
    folder_source,
    install,
    memory_need,
    name_problem,
    plan_setup,
    token_status,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIXTRAL_8X7B_CONFIG = {  # mistralai/Mixtral-8x7B-Instruct-v0.1's config.json (the fields that matter)
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rope_theta": 1e6, "rms_norm_eps": 1e-5, "sliding_window": None, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
GB = 10**9


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    return {"data": tmp_path / "data", "cache": tmp_path / "hf-cache", "home": tmp_path / "hf-home"}


def cli_env(dirs: dict[str, Path], **extra: str) -> dict[str, str]:
    """The environment of a user with no Hugging Face token or login (HF_HOME is empty)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE")}
    return {**env, "HF_HOME": str(dirs["home"]), "PYTHONPATH": str(REPO_ROOT), **extra}


def setup_command(hub: FakeHub, dirs: dict[str, Path], *options: str) -> list[str]:
    return [sys.executable, "-m", "chat_app", "setup", "--repo", hub.repo_id, "--endpoint", hub.url,
            "--hf-cache", str(dirs["cache"]), "--data-dir", str(dirs["data"]), *options]


def run(command: list[str], dirs: dict[str, Path], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=cli_env(dirs, **env), cwd=REPO_ROOT, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def installed_names(data_dir: Path) -> list[str]:
    return [m.name for m in model_registry.list_installed(data_dir)]


def blobs(dirs: dict[str, Path]) -> Path:
    return dirs["cache"] / "models--tiny-org--tiny-mixtral" / "blobs"


def repo_with_config(tmp_path: Path, repo_folder: Path, **config_changes) -> Path:
    """A copy of the tiny repo whose config.json describes another model (the weights stay tiny)."""
    folder = tmp_path / "repo-copy"
    shutil.copytree(repo_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def mixtral_sized(weights_bytes_at_least: int) -> dict:
    """Mixtral-8x7B's layer shapes with enough layers for float32 weights of at least that many bytes."""
    per_layer = memory_need({**MIXTRAL_8X7B_CONFIG, "num_hidden_layers": 1}, "float32", None).weights_bytes
    return {**MIXTRAL_8X7B_CONFIG, "num_hidden_layers": weights_bytes_at_least // per_layer + 1}


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---- the whole flow --------------------------------------------------------------------------------------------
def test_setup_downloads_converts_and_the_model_is_listed_and_intact(hub, dirs):
    result = run(setup_command(hub, dirs, "--yes"), dirs)
    assert result.returncode == 0, result.stderr

    checkpoint = paths.models_dir(dirs["data"]) / "tiny-mixtral"
    assert f"Installed 'tiny-mixtral' in {checkpoint}" in result.stdout
    assert "--model tiny-mixtral" in result.stdout
    stderr = result.stderr
    assert "Download:  8.9 MB in 10 files" in stderr and "Memory:    needs" in stderr and ": fits" in stderr
    assert "float32: the default on CPU" in stderr  # the dtype it picked, and why
    assert "Downloaded and verified 8.9 MB" in stderr
    assert "Converting: tensor 23 of 23" in stderr  # per-tensor progress, as plain lines off a terminal
    config = model.verify(checkpoint, deep=True)
    assert config.dtype == "float32" and config.quantization is None

    listing = run([sys.executable, "-m", "chat_app", "models", "--data-dir", str(dirs["data"])], dirs)
    assert listing.returncode == 0
    (row,) = [line for line in listing.stdout.splitlines() if line.startswith("tiny-mixtral ")]
    assert f"{hub.repo_id}@{hub.commit[:8]}" in row and "float32" in row


def test_a_second_setup_reuses_the_download_and_names_the_quantized_model(hub, dirs):
    assert run(setup_command(hub, dirs, "--yes"), dirs).returncode == 0
    hub.requests.clear()

    result = run(setup_command(hub, dirs, "--yes", "--quantize", "int4", "--dtype", "bfloat16"), dirs)
    assert result.returncode == 0, result.stderr
    assert "8.9 MB of it already downloaded" in result.stderr and "0 B left to download" in result.stderr
    assert not [r for r in hub.requests if r.file is not None and r.file.endswith(".safetensors")]
    config = model.verify(paths.models_dir(dirs["data"]) / "tiny-mixtral-int4", deep=True)
    assert (config.dtype, config.quantization) == ("bfloat16", "int4")
    assert installed_names(dirs["data"]) == ["tiny-mixtral", "tiny-mixtral-int4"]


def test_a_local_hf_folder_is_converted_under_its_own_name(tiny_hf, dirs):
    command = [sys.executable, "-m", "chat_app", "setup", "--local", str(tiny_hf), "--quantize", "int8",
               "--data-dir", str(dirs["data"]), "--yes"]
    result = run(command, dirs)
    assert result.returncode == 0, result.stderr
    name = f"{tiny_hf.name}-int8"
    assert "Download:" not in result.stderr  # nothing to fetch
    (installed,) = model_registry.list_installed(dirs["data"])
    assert (installed.name, installed.quantization, installed.source) == (name, "int8", str(tiny_hf.resolve()))
    model.verify(installed.path, deep=True)


def test_a_folder_that_is_not_an_hf_model_is_refused_saying_what_it_lacks(tmp_path, dirs):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MIXTRAL_8X7B_CONFIG))
    (folder / "pytorch_model.bin").write_bytes(bytes(10))
    command = [sys.executable, "-m", "chat_app", "setup", "--local", str(folder), "--data-dir", str(dirs["data"]),
               "--yes"]
    result = run(command, dirs)
    assert result.returncode == 1
    assert "has no weights in .safetensors format and no tokenizer" in result.stderr
    assert "Traceback" not in result.stderr


# ---- tokens and gated repos ------------------------------------------------------------------------------------
def test_gated_repo_says_where_to_request_access_and_works_with_a_granted_hf_token(hub, dirs):
    hub.gated = True
    hub.known_tokens = {"hf_waiting", "hf_granted"}
    hub.granted_tokens = {"hf_granted"}

    anonymous = run(setup_command(hub, dirs, "--yes"), dirs)
    assert anonymous.returncode == 1
    assert f"Request access at {hub.url}/{hub.repo_id}" in anonymous.stderr and "HF_TOKEN" in anonymous.stderr

    waiting = run(setup_command(hub, dirs, "--yes"), dirs, HF_TOKEN="hf_waiting")
    assert waiting.returncode == 1
    assert "not been granted access" in waiting.stderr and f"{hub.url}/{hub.repo_id}" in waiting.stderr
    assert not blobs(dirs).exists() and installed_names(dirs["data"]) == []

    granted = run(setup_command(hub, dirs, "--yes"), dirs, HF_TOKEN="hf_granted")
    assert granted.returncode == 0, granted.stderr
    assert installed_names(dirs["data"]) == ["tiny-mixtral"]
    for path in [*dirs["data"].rglob("*"), *dirs["cache"].rglob("*")]:  # the token is never written down
        if path.is_file():
            assert b"hf_granted" not in path.read_bytes(), path


def test_token_status_says_which_token_a_download_would_send(monkeypatch, tmp_path):
    login = tmp_path / "token"
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(login))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    assert token_status() == "none"
    login.write_text("hf_from_login\n")
    assert token_status() == "using your huggingface login"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert token_status() == "using HF_TOKEN"


# ---- interruptions and damage ----------------------------------------------------------------------------------
@pytest.mark.parametrize("signum, exit_status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "kill"])
def test_a_stop_signal_stops_the_download_keeps_it_and_the_same_command_resumes(hub, dirs, tmp_path, signum,
                                                                               exit_status):
    hub.bytes_per_s = 1_000_000
    command = setup_command(hub, dirs, "--yes")
    with open(tmp_path / "stderr", "w+") as stderr:
        child = subprocess.Popen(command, env=cli_env(dirs), cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                 stderr=stderr, stdin=subprocess.DEVNULL)
        try:
            while not [p for p in blobs(dirs).glob("*.incomplete") if p.stat().st_size >= 300_000]:
                assert child.poll() is None, "the download ended before the signal"
                time.sleep(0.02)
            child.send_signal(signum)
            assert child.wait(timeout=60) == exit_status
        finally:
            if child.poll() is None:
                child.kill()
        stderr.seek(0)
        said = stderr.read()
    assert "Interrupted. Download cancelled." in said and "kept" in said
    assert f"run the same command again: mixtral-chat setup --repo {hub.repo_id}" in said
    (partial,) = blobs(dirs).glob("*.incomplete")
    kept = partial.stat().st_size
    assert 300_000 <= kept < hub.files[BIG_SHARD].size and installed_names(dirs["data"]) == []

    hub.bytes_per_s = None
    hub.requests.clear()
    result = run(command, dirs)
    assert result.returncode == 0, result.stderr
    assert hub.file_gets(BIG_SHARD)[0].headers["range"] == f"bytes={kept}-"  # resumed, not restarted
    model.verify(paths.models_dir(dirs["data"]) / "tiny-mixtral", deep=True)


def test_cancel_during_the_conversion_installs_nothing_and_leaves_nothing_behind(tiny_hf, tmp_path):
    plan = plan_setup(folder_source(tiny_hf), data_dir=tmp_path)
    converted = []
    with pytest.raises(SetupCancelled, match="nothing was installed"):
        install(plan, on_convert=lambda done, total, tensor: converted.append((done, total)),
                should_cancel=lambda: len(converted) == 3)
    assert [done for done, _ in converted] == [1, 2, 3] and converted[0][1] > 3  # stopped between tensors
    assert list(paths.models_dir(tmp_path).iterdir()) == []  # no model, no partial folder


def test_a_corrupted_shard_is_named_and_nothing_is_installed(hub, dirs):
    shard = "model-00003-of-00005.safetensors"
    hub.corrupt(shard)
    result = run(setup_command(hub, dirs, "--yes"), dirs)
    assert result.returncode == 1
    assert f"{shard} arrived corrupted" in result.stderr and "Run the download again" in result.stderr
    assert not (blobs(dirs) / hub.files[shard].sha256).exists()
    assert installed_names(dirs["data"]) == [] and "Traceback" not in result.stderr


# ---- refusals before anything is written -----------------------------------------------------------------------
def test_not_enough_disk_is_refused_with_the_numbers_before_downloading(tmp_path, repo_folder, dirs):
    free = shutil.disk_usage(tmp_path).free
    folder = repo_with_config(tmp_path, repo_folder, **mixtral_sized(2 * free))
    with FakeHub(TINY_MIXTRAL_REPO_ID, folder) as big:
        result = run(setup_command(big, dirs, "--yes"), dirs)
    assert result.returncode == 1
    assert "cannot set up this model" in result.stderr and "Not enough disk space" in result.stderr
    assert "for the converted model" in result.stderr and "Free up space" in result.stderr
    assert not blobs(dirs).exists() and not paths.models_dir(dirs["data"]).exists()


def test_a_model_too_big_for_memory_is_refused_saying_what_would_fit(tmp_path, repo_folder, dirs):
    folder = repo_with_config(tmp_path, repo_folder, **mixtral_sized(2 * ram_bytes()))
    with FakeHub(TINY_MIXTRAL_REPO_ID, folder) as big:
        result = run(setup_command(big, dirs, "--yes"), dirs)
    assert result.returncode == 1
    assert "Not enough memory: as float32 the model needs" in result.stderr
    assert "of RAM" in result.stderr and "It would fit as: " in result.stderr and "+int4" in result.stderr
    assert not blobs(dirs).exists()


def test_without_yes_and_without_a_terminal_nothing_happens(hub, dirs):
    result = run(setup_command(hub, dirs), dirs)
    assert result.returncode == 1 and "add --yes" in result.stderr
    assert not blobs(dirs).exists()


def test_on_a_terminal_it_asks_and_no_means_nothing_is_downloaded(hub, dirs):
    def answer(text: str) -> subprocess.CompletedProcess:
        controller, terminal = pty.openpty()
        try:
            os.write(controller, text.encode())  # typed ahead; read when the question is asked
            return subprocess.run(setup_command(hub, dirs), env=cli_env(dirs), cwd=REPO_ROOT, stdin=terminal,
                                  capture_output=True, text=True, timeout=300)
        finally:
            os.close(controller)
            os.close(terminal)

    no = answer("\n")  # the default is no
    assert no.returncode == 1 and "Download 8.9 MB and install 'tiny-mixtral'? [y/N]" in no.stderr
    assert "nothing was changed" in no.stderr and not blobs(dirs).exists()

    yes = answer("y\n")
    assert yes.returncode == 0, yes.stderr
    assert installed_names(dirs["data"]) == ["tiny-mixtral"]


def test_an_installed_name_is_never_replaced_without_asking(hub, dirs, tiny_ckpt):
    existing = paths.models_dir(dirs["data"]) / "tiny-mixtral"
    shutil.copytree(tiny_ckpt, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}

    result = run(setup_command(hub, dirs, "--yes"), dirs)
    assert result.returncode == 1
    assert "a model named 'tiny-mixtral' is already installed" in result.stderr and "--name" in result.stderr
    assert {p.name: p.read_bytes() for p in existing.iterdir()} == before

    bad_name = run(setup_command(hub, dirs, "--yes", "--name", "../elsewhere"), dirs)
    assert bad_name.returncode == 1 and "cannot be a model name" in bad_name.stderr


# ---- the planning rules ----------------------------------------------------------------------------------------
def memory_problems(plan) -> list[str]:
    """(The disk check is real: on this disk the full-size models may not fit either.)"""
    return [p for p in plan.problems if p.startswith("Not enough memory")]


def h100s(count: int) -> DeviceMemory:
    return DeviceMemory("gpu", count, "NVIDIA H100 80GB HBM3", count * 80 * GB)


def mixtral_source(tmp_path: Path) -> Source:
    """Mixtral-8x7B-Instruct's real config in a folder with stand-in weights (planning reads only the config)."""
    folder = tmp_path / "Mixtral-8x7B-Instruct-v0.1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MIXTRAL_8X7B_CONFIG))
    (folder / "model-00001-of-00019.safetensors").write_bytes(b"")
    (folder / "tokenizer.model").write_bytes(b"")
    return folder_source(folder)


def test_mixtral_8x7b_needs_two_80gb_gpus_in_bfloat16_or_one_with_int8(tmp_path):
    source = mixtral_source(tmp_path)
    one_gpu = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(1))
    assert one_gpu.dtype == "bfloat16" and "bfloat16: the default on GPU" in one_gpu.dtype_reason
    assert 93 * GB < one_gpu.memory.weights_bytes < 94 * GB  # 46.7B parameters at 2 bytes
    assert one_gpu.memory.kv_cache_bytes == 2 * 32 * 8 * 128 * 4096 * 2  # K and V, 32 layers, 4096 tokens
    (problem,) = memory_problems(one_gpu)
    assert problem.startswith("Not enough memory: as bfloat16 the model needs 103.3 GB (weights 93.4 GB + KV cache "
                              "536.9 MB + 10% headroom) but this machine has 1 x NVIDIA H100 80GB HBM3, 80.0 GB in all")
    assert re.search(r"It would fit as: bfloat16\+int8 \(5\d\.\d GB\), bfloat16\+int4 \([23]\d\.\d GB\)\.", problem)
    assert not one_gpu.can_start

    assert memory_problems(plan_setup(source, data_dir=tmp_path / "data", devices=h100s(2))) == []
    int8 = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(1), quantization="int8")
    assert memory_problems(int8) == [] and int8.name == "Mixtral-8x7B-Instruct-v0.1-int8"


def test_when_nothing_fits_it_says_to_use_a_smaller_model_or_more_memory(tmp_path):
    laptop = DeviceMemory("cpu", 1, "cpu", 16 * GB, available_bytes=8 * GB)
    plan = plan_setup(mixtral_source(tmp_path), data_dir=tmp_path / "data", devices=laptop)
    assert plan.dtype == "float32" and "faster" in plan.dtype_reason
    (problem,) = memory_problems(plan)
    assert re.search(r"Even the smallest setting, bfloat16\+int4, needs [23]\d\.\d GB", problem)
    assert "smaller model" in problem and "more memory" in problem


def test_a_model_that_fits_ram_but_not_what_is_free_now_gets_a_warning(tiny_hf, tmp_path):
    busy = DeviceMemory("cpu", 1, "cpu", 16 * GB, available_bytes=1000)
    plan = plan_setup(folder_source(tiny_hf), data_dir=tmp_path, devices=busy)
    assert plan.can_start and "close other programs" in plan.warnings[0]


def test_unsupported_configs_and_bad_names_are_problems_not_crashes(tmp_path):
    source = mixtral_source(tmp_path)
    broken = dict(MIXTRAL_8X7B_CONFIG)
    del broken["hidden_size"]
    plan = plan_setup(dataclasses.replace(source, hf_config=broken), data_dir=tmp_path,
                      devices=h100s(8))
    assert "cannot be set up: its config.json lacks or garbles 'hidden_size'" in plan.problems[0]
    bert = {"model_type": "bert"}
    plan = plan_setup(dataclasses.replace(source, hf_config=bert), data_dir=tmp_path,
                      devices=h100s(8))
    assert "unsupported model_type 'bert'" in plan.problems[0]
    for name in ("", ".hidden", "a/b", " padded"):
        assert name_problem(name) is not None, name
    assert name_problem("Mixtral-8x7B-Instruct-v0.1-int4") is None
    assert default_name(source, "int4") == "Mixtral-8x7B-Instruct-v0.1-int4"


def test_folder_source_recognises_a_checkpoint_already_converted(tiny_ckpt):
    with pytest.raises(SetupError, match="already a converted mixtral-chat model"):
        folder_source(tiny_ckpt)


def test_each_device_must_hold_its_share_as_the_mesh_really_splits_it(tmp_path):
    """Mixtral-8x7B in bfloat16 fits 6 x 80 GB in all (103 GB), but 6 devices divide none of its 8 kv
    heads, 14336 intermediate or 32000 vocabulary: each device would hold nearly all of it."""
    source = mixtral_source(tmp_path)
    six = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(6))
    (problem,) = memory_problems(six)
    assert problem.startswith("Not enough memory per device: as bfloat16 each of the 6 devices would hold ")
    assert ("(attention replicated on 6 devices; the experts' intermediate dim replicated on 6 devices; the "
            "vocabulary replicated on 6 devices), but has 80.0 GB") in problem
    assert "Attention replicated on 6 devices: the mesh does not divide it (--mesh can choose another split)." in six.warnings
    eight = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(8))
    assert memory_problems(eight) == [] and eight.warnings == ()
