"""What the HF cache already holds: complete safetensors checkpoints, for "reuse weights already downloaded"."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub import errors as hf_errors


@dataclass(frozen=True)
class CachedModel:
    """A complete safetensors checkpoint found in the HF cache."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]  # branches/tags known to point at this commit, e.g. ("main",)
    snapshot_dir: Path  # the HF-format model folder
    size_bytes: int
    model_type: str | None  # config.json "model_type", e.g. "mixtral"


def find_cached_models(cache_dir: str | Path | None = None) -> list[CachedModel]:
    """Snapshots in the HF cache that hold a complete safetensors checkpoint with its config.json (every shard an
    index names, or a single-file checkpoint), sorted by repo id; for "reuse weights already downloaded"."""
    try:
        cache_info = scan_cache_dir(cache_dir or constants.HF_HUB_CACHE)
    except hf_errors.CacheNotFound:
        return []
    models = []
    for repo in cache_info.repos:  # repos the scan found corrupted are left out (cache_info.warnings)
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            config = _complete_checkpoint_config(revision.snapshot_path)
            if config is not None:
                models.append(
                    CachedModel(
                        repo_id=repo.repo_id,
                        commit=revision.commit_hash,
                        refs=tuple(sorted(revision.refs)),
                        snapshot_dir=revision.snapshot_path,
                        size_bytes=revision.size_on_disk,
                        model_type=config.get("model_type"),
                    )
                )
    return sorted(models, key=lambda m: (m.repo_id, m.commit))


def _complete_checkpoint_config(snapshot: Path) -> dict | None:
    """The snapshot's config.json if it holds a complete safetensors checkpoint, else None."""
    try:
        config = json.loads((snapshot / "config.json").read_text())
        indexes = [json.loads(p.read_text()) for p in snapshot.glob("*.safetensors.index.json")]
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    if indexes:
        shards = {name for index in indexes for name in index.get("weight_map", {}).values()}
        complete = bool(shards) and all((snapshot / shard).is_file() for shard in shards)
    else:
        complete = any(p.is_file() for p in snapshot.glob("*.safetensors"))
    return config if complete else None
