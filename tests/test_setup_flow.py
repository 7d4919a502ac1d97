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
from fake_hub import BIG_SHARD, TINY_MIXTRAL_REPO_ID, FakeHub, partial_download_bytes
from huggingface_hub import constants as hf_constants

import model
from chat_app import model_registry, paths
from chat_app.bandwidth import Bandwidth, cpu_bandwidth, measure_read_bandwidth
from chat_app.setup_flow import (
    DeviceMemory,
    SetupCancelled,
    SetupError,
    Source,
    default_name,
    default_quantization,
    folder_source,
    install,
    plan_memory,
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
    per_layer = plan_memory({**MIXTRAL_8X7B_CONFIG, "num_hidden_layers": 1}, "float32", None).weights_bytes
    return {**MIXTRAL_8X7B_CONFIG, "num_hidden_layers": weights_bytes_at_least // per_layer + 1}


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---- the whole flow --------------------------------------------------------------------------------------------
def test_setup_downloads_converts_and_the_model_is_listed_and_intact(hub, dirs):
    result = run(setup_command(hub, dirs, "--yes"), dirs)
    assert result.returncode == 0, result.stderr

    checkpoint = paths.models_dir(dirs["data"]) / "tiny-mixtral-int4"  # int4: the default on a CPU
    assert f"Installed 'tiny-mixtral-int4' in {checkpoint}" in result.stdout
    assert "--model tiny-mixtral-int4" in result.stdout
    stderr = result.stderr
    assert "Download:  8.9 MB in 10 files" in stderr and "Memory:    needs" in stderr and ": fits" in stderr
    assert "int4: the default on CPU" in stderr and "float32: the default dtype on CPU" in stderr  # what, and why
    assert re.search(r"reads memory at [\d.]+ GB/s \(measured\)", stderr)
    table = stderr[stderr.index("Settings:"):]  # each setting's memory and speed, before the download starts
    assert table.index("float32+int4") < table.index("<- chosen") < stderr.index("Downloaded and verified 8.9 MB")
    assert "Converting: tensor 53 of 53" in stderr  # per-tensor progress, as plain lines off a terminal
    config = model.verify(checkpoint, deep=True)
    assert config.dtype == "float32" and config.quantization == "int4"
    assert json.loads(paths.bandwidth_path(dirs["data"]).read_text())["bytes_per_s"] > 0  # kept for next time

    listing = run([sys.executable, "-m", "chat_app", "models", "--data-dir", str(dirs["data"])], dirs)
    assert listing.returncode == 0
    (row,) = [line for line in listing.stdout.splitlines() if line.startswith("tiny-mixtral-int4 ")]
    assert f"{hub.repo_id}@{hub.commit[:8]}" in row and "float32+int4" in row


def test_a_second_setup_reuses_the_download_and_names_the_quantized_model(hub, dirs):
    first = run(setup_command(hub, dirs, "--yes", "--quantize", "none"), dirs)  # an explicit choice wins
    assert first.returncode == 0 and "no quantization: as chosen" in first.stderr
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
    assert installed_names(dirs["data"]) == ["tiny-mixtral-int4"]
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
            while max(partial_download_bytes(blobs(dirs)), default=0) < 300_000:
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
    model.verify(paths.models_dir(dirs["data"]) / "tiny-mixtral-int4", deep=True)


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
    folder = repo_with_config(tmp_path, repo_folder, **mixtral_sized(10 * free))  # int4: about twice the free disk
    with FakeHub(TINY_MIXTRAL_REPO_ID, folder) as big:
        result = run(setup_command(big, dirs, "--yes"), dirs)
    assert result.returncode == 1
    assert "cannot set up this model" in result.stderr and "Not enough disk space" in result.stderr
    assert "for the converted model" in result.stderr and "Free up space" in result.stderr
    assert not blobs(dirs).exists() and not paths.models_dir(dirs["data"]).exists()


def test_a_model_too_big_for_memory_is_refused_saying_what_would_fit(tmp_path, repo_folder, dirs):
    folder = repo_with_config(tmp_path, repo_folder, **mixtral_sized(2 * ram_bytes()))
    with FakeHub(TINY_MIXTRAL_REPO_ID, folder) as big:
        result = run(setup_command(big, dirs, "--yes", "--quantize", "none"), dirs)
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
    assert no.returncode == 1 and "Download 8.9 MB and install 'tiny-mixtral-int4'? [y/N]" in no.stderr
    assert "nothing was changed" in no.stderr and not blobs(dirs).exists()

    yes = answer("y\n")
    assert yes.returncode == 0, yes.stderr
    assert installed_names(dirs["data"]) == ["tiny-mixtral-int4"]


def test_an_installed_name_is_never_replaced_without_asking(hub, dirs, tiny_ckpt):
    existing = paths.models_dir(dirs["data"]) / "tiny-mixtral-int4"  # the name setup picks on a CPU
    shutil.copytree(tiny_ckpt, existing)
    before = {p.name: p.read_bytes() for p in existing.iterdir()}

    result = run(setup_command(hub, dirs, "--yes"), dirs)
    assert result.returncode == 1
    assert "a model named 'tiny-mixtral-int4' is already installed" in result.stderr and "--name" in result.stderr
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
    one_gpu = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(1), quantization="none")
    assert one_gpu.dtype == "bfloat16" and "bfloat16: the default on GPU" in one_gpu.dtype_reason
    assert 93 * GB < one_gpu.memory.weights_bytes < 94 * GB  # 46.7B parameters at 2 bytes
    assert one_gpu.memory.kv_cache_bytes == 2 * 32 * 8 * 128 * 4096 * 2  # K and V, 32 layers, 4096 tokens
    (problem,) = memory_problems(one_gpu)
    assert problem.startswith("Not enough memory: as bfloat16 the model needs 103.3 GB (weights 93.4 GB + KV cache "
                              "536.9 MB + 10% headroom) but this machine has 1 x NVIDIA H100 80GB HBM3, 80.0 GB in all")
    assert re.search(r"It would fit as: bfloat16\+int8 \(5\d\.\d GB\), bfloat16\+int4 \([23]\d\.\d GB\)\.", problem)
    assert not one_gpu.can_start

    # with no choice made: bfloat16 where it fits, else the most exact quantization that does
    two_gpus = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(2))
    assert (two_gpus.dtype, two_gpus.quantization) == ("bfloat16", None) and memory_problems(two_gpus) == []
    assert two_gpus.quantization_reason == "no quantization: the default on GPU when bfloat16 fits"
    auto = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(1))
    assert (auto.dtype, auto.quantization) == ("bfloat16", "int8") and memory_problems(auto) == []
    assert auto.name == "Mixtral-8x7B-Instruct-v0.1-int8" and "does not fit and int8 does" in auto.quantization_reason
    small_gpu = DeviceMemory("gpu", 1, "NVIDIA L4", 48 * GB)
    assert plan_setup(source, data_dir=tmp_path / "data", devices=small_gpu).quantization == "int4"


def test_on_a_cpu_the_default_is_int4_and_an_explicit_choice_wins(tmp_path):
    desktop = DeviceMemory("cpu", 1, "cpu", 64 * GB, available_bytes=60 * GB)
    source = mixtral_source(tmp_path)
    plan = plan_setup(source, data_dir=tmp_path / "data", devices=desktop, bandwidth=Bandwidth(20e9, "measured"))
    assert (plan.dtype, plan.quantization, plan.name) == ("float32", "int4", "Mixtral-8x7B-Instruct-v0.1-int4")
    assert plan.quantization_reason.startswith("int4: the default on CPU") and memory_problems(plan) == []
    for chosen in ("none", "int8"):
        plan = plan_setup(source, data_dir=tmp_path / "data", devices=desktop, quantization=chosen,
                          bandwidth=Bandwidth(20e9, "measured"))
        assert plan.quantization == (None if chosen == "none" else chosen)
        assert plan.quantization_reason == ("no quantization" if chosen == "none" else chosen) + ": as chosen"
    # without the native kernels (only float32 at memory speed): the most exact setting that fits, as on a GPU
    assert default_quantization(source.hf_config, "float32", desktop, cpu_kernels=False) == (
        "int8", "int8: the default on CPU without the native kernels when float32 does not fit and int8 does")
    assert default_quantization(source.hf_config, "float32", dataclasses.replace(desktop, total_bytes=512 * GB),
                                cpu_kernels=False)[0] is None
    # a model whose inputs int4's groups of 32 cannot split: int8
    odd = dataclasses.replace(source, hf_config={**MIXTRAL_8X7B_CONFIG, "intermediate_size": 14336 + 16})
    plan = plan_setup(odd, data_dir=tmp_path / "data", devices=desktop, bandwidth=Bandwidth(20e9, "measured"))
    assert plan.quantization == "int8" and "groups of 32" in plan.quantization_reason
    assert [s.label for s in plan.settings] == ["float32", "bfloat16", "float32+int8"]
    plan = plan_setup(odd, data_dir=tmp_path / "data", devices=desktop, quantization="int4",
                      bandwidth=Bandwidth(20e9, "measured"))
    assert "int4 needs every layer's input size to be a multiple of 32" in plan.problems[0] and not plan.can_start


def test_each_setting_shows_its_memory_and_the_decode_speed_the_measured_bandwidth_allows(tmp_path):
    desktop = DeviceMemory("cpu", 1, "cpu", 64 * GB, available_bytes=60 * GB)
    plan = plan_setup(mixtral_source(tmp_path), data_dir=tmp_path / "data", devices=desktop,
                      bandwidth=Bandwidth(20e9, "measured"))
    by_label = {s.label: s for s in plan.settings}
    assert list(by_label) == ["float32", "bfloat16", "float32+int8", "float32+int4"]
    # Mixtral-8x7B in int4: 12.6e9 linear weights a token uses (attention, 2 of 8 experts; 32 layers) and the
    # LM head at 4 bits + a float16 scale and offset per 32; router and norms in float32; the cache half full
    # (2048 tokens of float32 K and V)
    linear = 32 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 2 * 4096 * 14336) + 32000 * 4096
    others = 32 * (4096 * 8 + 2 * 4096) + 2 * 4096
    int4_token = linear // 2 + linear // 32 * 4 + others * 4 + 2 * 32 * 8 * 128 * 2048 * 4
    assert by_label["float32+int4"].token_read_bytes == int4_token == 8_509_358_080
    assert by_label["float32+int4"].needed_bytes == plan.memory.needed_bytes
    assert 33 * GB < by_label["float32+int4"].needed_bytes < 34 * GB
    assert by_label["float32"].needed_bytes > 200 * GB and 50 * GB < by_label["float32+int8"].needed_bytes < 55 * GB

    lines = plan.describe()
    assert "Devices:   CPU, 64.0 GB of RAM, 60.0 GB free now; reads memory at 20.0 GB/s (measured)" in lines
    table = lines[lines.index(next(line for line in lines if line.startswith("Settings:"))):]
    assert table[0].split() == ["Settings:", "setting", "memory", "decode,", "at", "most"]
    rows = {row.split()[0]: row.split()[1:] for row in table[1:5]}
    assert rows["float32"] == ["206.7", "GB", "0.39", "tok/s", "too", "big"]  # 51.5 GB a token
    assert rows["bfloat16"] == ["103.3", "GB", "0.78", "tok/s", "too", "big"]  # 25.8 GB a token
    assert rows["float32+int8"][2:4] == ["1.5", "tok/s"] and len(rows["float32+int8"]) == 4  # fits
    assert rows["float32+int4"] == ["33.8", "GB", "2.4", "tok/s", "<-", "chosen"]  # 20e9 / int4_token = 2.35
    assert "memory speed bounds it" in table[5]


def test_on_gpus_memory_is_shown_per_device_and_speed_from_the_spec_or_unknown(tmp_path):
    source = mixtral_source(tmp_path)
    plan = plan_setup(source, data_dir=tmp_path / "data", devices=h100s(2))
    bf16 = plan.memory
    assert plan.bandwidth == Bandwidth(2 * 3.35e12, "spec sheet, 2 devices")
    halves = int((bf16.weights_bytes / 2 + bf16.kv_cache_bytes / 2) * 1.1)  # each device holds the norms and
    assert bf16.devices == 2 and halves < bf16.per_device_bytes < halves + 2 * 10**6  # routers whole (1.3 MB)
    lines = plan.describe()
    assert "reads memory at 6.70 TB/s (spec sheet, 2 devices)" in lines[lines.index(
        next(line for line in lines if line.startswith("Devices:")))]
    (row,) = [line for line in lines if line.split()[0] == "bfloat16"]
    assert "103.3 GB (51.7 GB)" in row and f"{6.7e12 / bf16.token_read_bytes:.0f} tok/s" in row and "<- chosen" in row

    unknown = plan_setup(source, data_dir=tmp_path / "data", devices=DeviceMemory("gpu", 1, "Some New GPU", 200 * GB))
    assert unknown.bandwidth.bytes_per_s is None
    lines = unknown.describe()
    assert any("memory speed unknown (no figure for Some New GPU)" in line for line in lines)
    assert all("unknown" in row for row in lines if "tok/s" not in row and "+int" in row)


def test_the_cpu_bandwidth_is_measured_once_per_machine_and_kept_in_the_data_dir(tmp_path):
    measured = []

    def measure() -> float:
        measured.append(1)
        return 12.5e9

    assert cpu_bandwidth(tmp_path, measure) == 12.5e9 and cpu_bandwidth(tmp_path, measure) == 12.5e9
    assert len(measured) == 1
    saved = json.loads(paths.bandwidth_path(tmp_path).read_text())
    paths.bandwidth_path(tmp_path).write_text(json.dumps({**saved, "machine": "another machine"}))
    assert cpu_bandwidth(tmp_path, measure) == 12.5e9 and len(measured) == 2  # another machine: measured again
    paths.bandwidth_path(tmp_path).write_text("{garbage")
    assert cpu_bandwidth(tmp_path, measure) == 12.5e9 and len(measured) == 3
    (tmp_path / "a-file").write_text("")
    assert cpu_bandwidth(tmp_path / "a-file" / "data", lambda: 7e9) == 7e9  # cannot be kept: still answers

    started = time.perf_counter()
    real = measure_read_bandwidth()
    assert 1e9 < real < 1e13 and time.perf_counter() - started < 3  # quick enough for the wizard's check


def test_when_nothing_fits_it_says_to_use_a_smaller_model_or_more_memory(tmp_path):
    laptop = DeviceMemory("cpu", 1, "cpu", 16 * GB, available_bytes=8 * GB)
    plan = plan_setup(mixtral_source(tmp_path), data_dir=tmp_path / "data", devices=laptop)
    assert (plan.dtype, plan.quantization) == ("float32", "int4")
    (problem,) = memory_problems(plan)
    assert problem.startswith("Not enough memory: as float32+int4 the model needs 33.8 GB")
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
