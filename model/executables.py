"""Compiled programs kept on disk as executables, so that a warm start neither traces nor compiles.

JAX's persistent compilation cache skips XLA's compiler but is asked only after the program has been
traced and lowered (seconds for a 32-layer model). This cache keeps the compiled executable itself
(`jax.experimental.serialize_executable`) under a key computed without tracing: everything that changes
the program (`fingerprint`: the model's config, each parameter's shape, dtype and placement, the mesh and
its devices, the CPU's features, jax and jaxlib, the source of `model/` and of its native kernels) plus
the program's name and shapes. A file that is stale never matches a key; one that is corrupt or fails to
load is deleted and rebuilt, silently.

Do not combine it with JAX's persistent compilation cache: an executable that XLA:CPU took from that cache
serializes without some of its functions ("Function ... not found" when the copy runs). The small
programs around the model's (a zeroed cache, a random key) compile in well under a second, which is
below what that cache keeps by default anyway.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import pickle
import platform
from collections.abc import Callable
from functools import cache
from pathlib import Path

import jax
from jax.experimental import serialize_executable

SUFFIX = ".executable"


@cache
def _code_digest() -> str:
    """The source of model/ and its native kernels: a change to either changes the programs."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".cc", ".h", ".inc", ".so") and p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@cache
def _cpu_features() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return platform.processor()


def fingerprint(config_json: dict, params: list[jax.Array], mesh) -> str:
    """What makes one model's programs differ from another's (computed without tracing anything)."""
    devices = [f"{d.platform}:{d.device_kind}:{d.id}:{d.process_index}" for d in mesh.devices.flat]
    arrays = [(a.shape, str(a.dtype), str(a.sharding.spec) if hasattr(a.sharding, "spec") else str(a.sharding))
              for a in params]
    parts = {"config": config_json, "arrays": arrays, "mesh": dict(mesh.shape), "devices": devices,
             "jax": jax.__version__, "jaxlib": importlib.metadata.version("jaxlib"),
             "cpu": _cpu_features(), "code": _code_digest()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class ExecutableCache:
    """A folder of serialized executables, one file per (model fingerprint, program)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def _path(self, model: str, program: str) -> Path:
        return self.directory / (hashlib.sha256(f"{model}\0{program}".encode()).hexdigest()[:32] + SUFFIX)

    def has(self, model: str, program: str) -> bool:
        return self._path(model, program).is_file()

    def load_or_compile(self, model: str, program: str, devices: list, lower: Callable[[], jax.stages.Lowered]
                        ) -> jax.stages.Compiled:
        """The program for `devices` from disk if it is there and loads; else lowered, compiled and saved."""
        path = self._path(model, program)
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
        except FileNotFoundError:
            pass
        except Exception:  # noqa: BLE001 (truncated, corrupt or from another build: rebuild it)
            path.unlink(missing_ok=True)
        compiled = lower().compile()
        self._save(path, compiled)
        return compiled

    def _save(self, path: Path, compiled: jax.stages.Compiled) -> None:
        """Atomically; a cache that cannot be written (read-only, full disk) only costs the next start."""
        try:
            data = pickle.dumps(serialize_executable.serialize(compiled))
        except (ValueError, NotImplementedError, pickle.PicklingError):
            return  # this backend cannot serialize it: the next start compiles it again
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
