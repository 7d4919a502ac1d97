"""The models installed in DATA/models/, and turning `--model NAME|PATH` into a checkpoint dir.

Each installed model is a converted checkpoint dir (config.json, manifest.json, *.safetensors,
tokenizer files) named after the model. What is listed comes from the files themselves, so a
checkpoint copied in by hand shows up like one made by `setup`.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from chat_app import paths
from chat_app.errors import UserError


class ModelError(UserError):
    """No such model, or not a usable checkpoint, in words fit for the user."""


@dataclass(frozen=True)
class InstalledModel:
    name: str
    path: Path
    source: str | None  # where it came from (hub repo, local folder, demo), from manifest.json
    dtype: str | None
    quantization: str | None  # None, "int8" or "int4"
    size_bytes: int  # on disk, all files
    n_params: int | None
    problem: str | None = None  # why it cannot be used (the other fields may then be None)


def list_installed(data_dir: Path) -> list[InstalledModel]:
    """Every model dir under DATA/models, by name; broken ones too, with their `problem`."""
    root = paths.models_dir(data_dir)
    if not root.is_dir():
        return []
    return [_describe(path) for path in sorted(root.iterdir(), key=lambda p: p.name.casefold())
            if path.is_dir() and not path.name.startswith(".")]  # dot-dirs: conversions in progress


def resolve(data_dir: Path, name_or_path: str) -> Path:
    """The checkpoint dir for an installed model's name or a checkpoint dir's path; ModelError
    saying why otherwise (unknown name, not a checkpoint, an HF folder not converted yet)."""
    installed = paths.models_dir(data_dir) / name_or_path
    looks_like_name = "/" not in name_or_path and "\\" not in name_or_path and name_or_path not in (".", "..")
    if looks_like_name and installed.is_dir():
        path = installed
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser().absolute()
    else:
        names = [m.name for m in list_installed(data_dir)]
        listing = f"installed: {', '.join(names)}" if names else "none installed; try `mixtral-chat setup --demo`"
        raise ModelError(f"no model named {name_or_path!r} and no such folder ({listing})")
    problem = _describe(path).problem
    if problem:
        raise ModelError(f"{path}: {problem}")
    return path


def default_model(data_dir: Path) -> Path | None:
    """The model to open when none is named: settings.toml's `default_model`, else the only
    installed one. None when there is no model, or several and no default."""
    settings_file = paths.settings_path(data_dir)
    try:
        settings = tomllib.loads(settings_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        settings = {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ModelError(f"cannot read {settings_file}: {e}") from None
    if "default_model" in settings:
        try:
            return resolve(data_dir, str(settings["default_model"]))
        except ModelError as e:
            raise ModelError(f"the default_model in {settings_file} is not usable: {e}") from None
    usable = [m for m in list_installed(data_dir) if m.problem is None]
    return usable[0].path if len(usable) == 1 else None


def _describe(path: Path) -> InstalledModel:
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    manifest = _read_json(path / "manifest.json")
    blank = InstalledModel(path.name, path, _source(manifest), None, None, size, None)
    config_file = path / "config.json"
    if not config_file.is_file():
        return dataclasses.replace(blank, problem="not a converted checkpoint (no config.json)")
    if "model_type" in (_read_json(config_file) or {}):
        return dataclasses.replace(blank, problem="a Hugging Face model folder, not converted yet (convert it "
                                                  "with `mixtral-chat convert` or `mixtral-chat setup --local`)")
    from model.config import ConfigError, MixtralConfig  # the model package: only when needed

    try:
        config = MixtralConfig.load(config_file)
    except ConfigError as e:
        return dataclasses.replace(blank, problem=str(e))
    if not any(path.glob("*.safetensors")):
        return dataclasses.replace(blank, problem="the checkpoint has no weights (*.safetensors)")
    return InstalledModel(path.name, path, blank.source, config.dtype, config.quantization, size, config.num_params)


def _source(manifest: object) -> str | None:
    """Where the checkpoint came from, in short: the hub repo (and commit) or the folder converted."""
    source = manifest.get("source") if isinstance(manifest, dict) else None
    if not isinstance(source, dict):
        return source if isinstance(source, str) else None
    if source.get("description"):
        return source["description"]
    if source.get("repo_id"):
        return source["repo_id"] + (f"@{source['commit'][:8]}" if source.get("commit") else "")
    return source.get("path")


def _read_json(path: Path) -> object:
    """The file's JSON, or None when it is missing or unreadable (the caller reports what matters)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def model_label(data_dir: Path, model_dir: Path) -> str:
    """How a conversation records its model so `resolve` finds it again: the installed name, or the
    checkpoint dir's full path for one outside DATA/models."""
    model_dir = Path(model_dir).absolute()
    return model_dir.name if model_dir.parent == paths.models_dir(data_dir).absolute() else str(model_dir)
