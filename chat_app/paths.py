"""Where mixtral-chat keeps its files.

Everything the user owns lives under one data dir (platformdirs' per-user data location, or
`--data-dir DIR`, which tests use so they never touch the real one):

    DATA/models/<name>/        converted checkpoints (config.json, manifest.json, *.safetensors, tokenizer)
    DATA/history.sqlite3       conversations and messages (chat_app.store)
    DATA/personas/<name>.toml  the user's personas (chat_app.personas)
    DATA/downloads/            partial and finished hub downloads
    DATA/settings.toml         default model, key remaps
    DATA/bandwidth.json        this machine's measured memory read speed (chat_app.bandwidth)

The JAX compilation cache is not the user's data (it can be rebuilt), so it lives in the cache dir.
These functions only compute paths; the module that writes a place creates it.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "mixtral-chat"


def resolve_data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data dir: `override` (from `--data-dir`) if given, else the platform's per-user location."""
    if override is not None:
        return Path(override).expanduser().absolute()
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def models_dir(data_dir: Path) -> Path:
    return data_dir / "models"


def history_path(data_dir: Path) -> Path:
    return data_dir / "history.sqlite3"


def personas_dir(data_dir: Path) -> Path:
    return data_dir / "personas"


def downloads_dir(data_dir: Path) -> Path:
    return data_dir / "downloads"


def settings_path(data_dir: Path) -> Path:
    return data_dir / "settings.toml"


def bandwidth_path(data_dir: Path) -> Path:
    return data_dir / "bandwidth.json"


def executables_dir() -> Path:
    """Compiled programs of the engine (model/executables.py): a warm start loads them instead of compiling."""
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "executables"
