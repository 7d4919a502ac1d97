"""A checkpoint's files and their integrity: the config, the manifest (the size and sha256 of every
file) and `verify`, which checks the files against it. No jax here: `mixtral-chat models` and
`models --verify` use it without loading a model.

A checkpoint is a folder:
    config.json      MixtralConfig (ours, "format": "mixtral-chat")
    manifest.json    where it came from, dtype, quantization, and the size + sha256 of every file
    model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
    tokenizer files  tokenizer.model or tokenizer.json, tokenizer_config.json, generation_config.json
    .verified.json   which files' sha256 were checked, at what size and mtime (see `verify`)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

from .config import ConfigError, MixtralConfig
from .errors import UserError

CONFIG, MANIFEST = "config.json", "manifest.json"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json")


class CheckpointError(UserError):
    """A checkpoint that is missing, partial or corrupt; the message says which file and what to do."""


def read_config(ckpt_dir: Path) -> MixtralConfig:
    path = Path(ckpt_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a mixtral-chat checkpoint (no {CONFIG}); "
                              "convert a Hugging Face folder with `mixtral-chat convert HF_DIR OUT_DIR`")
    try:
        return MixtralConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_manifest(ckpt_dir: Path) -> dict:
    """manifest.json, checked for shape: a JSON object whose "files" maps plain file names to
    {"bytes": int, "sha256": 64 hex digits}."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_dir} is incomplete (no {MANIFEST}): the conversion did not finish; "
                              "convert it again") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); convert the model again") from None
    if problem := _manifest_problem(manifest):
        raise CheckpointError(f"{path} is damaged ({problem}); convert the model again")
    return manifest


def _manifest_problem(manifest: object) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__} instead of an object"
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return '"files" is not a table of file names'
    for name, entry in files.items():
        if Path(name).name != name or name in (".", ".."):
            return f"{name!r} is not a file name of the checkpoint folder"
        if not isinstance(entry, dict):
            return f"the entry of {name} is not an object"
        if not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool) or entry["bytes"] < 0:
            return f"the entry of {name} has no valid \"bytes\""
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            return f"the entry of {name} has no valid \"sha256\""
    if not any(n.endswith(".safetensors") for n in files):
        return "it lists no weights"
    return None


def sha256_file(path: Path, on_bytes: Callable[[int], None] | None = None, chunk: int = 16 << 20) -> str:
    """The file's sha256; `on_bytes(n)` after each chunk of n bytes read."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes:
                on_bytes(len(block))
    return h.hexdigest()


def verify(ckpt_dir: Path, deep: bool = False,
           on_progress: Callable[[float, str], None] | None = None) -> MixtralConfig:
    """Check that every file the manifest lists is there with its size and its sha256.

    Hashing reads the whole checkpoint (~1 GB/s here, bench/verify.py: Mixtral-8x7B's ~93 GB take about
    1.5 min), so it is done once:
    `VERIFIED` records each file's size and mtime when its sha256 matched, and a file is hashed again
    only when its size or mtime changed since (`deep`: hash every file now). `on_progress(fraction,
    what)` reports the hashing. The config of a checkpoint that passes is returned; CheckpointError
    names the first damaged file otherwise."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"no checkpoint at {ckpt_dir}")
    config = read_config(ckpt_dir)
    files = read_manifest(ckpt_dir)["files"]
    stats = {}
    for name, info in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            raise _damaged(ckpt_dir, f"{name} is missing")
        stats[name] = path.stat()
        if stats[name].st_size != info["bytes"]:
            raise _damaged(ckpt_dir, f"{name} has {stats[name].st_size} bytes, expected {info['bytes']} (partial?)")
    record = {} if deep else _read_record(ckpt_dir)
    stale = [name for name, info in files.items() if record.get(name) != _fingerprint(stats[name], info)]
    total, done = sum(files[name]["bytes"] for name in stale), 0

    def hashed(n: int, name: str) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(done / max(total, 1), f"verifying {name}")

    hashes = {name: sha256_file(ckpt_dir / name, lambda n, name=name: hashed(n, name)) for name in stale}
    for name, sha256 in hashes.items():
        if sha256 == files[name]["sha256"]:
            record[name] = _fingerprint(stats[name], files[name])
    if stale:
        _write_record(ckpt_dir, {name: record[name] for name in files if name in record})
    for name, sha256 in hashes.items():
        if sha256 != files[name]["sha256"]:
            raise _damaged(ckpt_dir, f"{name} does not match its sha256 in {MANIFEST} (its bytes changed)")
    return config


VERIFIED = ".verified.json"
"""In a checkpoint dir: {file name: [size, mtime_ns, sha256]} of each file whose sha256 was checked."""


def _fingerprint(stat, info: dict) -> list:
    return [stat.st_size, stat.st_mtime_ns, info["sha256"]]


def _read_record(ckpt_dir: Path) -> dict:
    try:
        record = json.loads((ckpt_dir / VERIFIED).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(ckpt_dir: Path, record: dict) -> None:
    """Best effort: a checkpoint on a read-only disk is verified again on its next use."""
    temporary = ckpt_dir / f"{VERIFIED}.tmp"
    try:
        temporary.write_text(json.dumps(record) + "\n", encoding="utf-8")
        temporary.replace(ckpt_dir / VERIFIED)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _damaged(ckpt_dir: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt_dir} is damaged: {problem}; install it again "
                           "(`mixtral-chat setup`) or convert it again (`mixtral-chat convert`)")


def vocabulary_problem(config: MixtralConfig, tokenizer_vocab_size: int, where: Path) -> str | None:
    """Why the tokenizer in `where` cannot go with the model: it makes ids past the embedding's rows."""
    if tokenizer_vocab_size > config.vocab_size:
        return (f"the tokenizer in {where} has {tokenizer_vocab_size} tokens but the model only "
                f"{config.vocab_size}: they do not belong together (use the model's own tokenizer)")
    return None
