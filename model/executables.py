"""Compiled programs kept on disk as executables, so that a warm start neither traces nor compiles.

JAX's persistent compilation cache skips XLA's compiler but is asked only after the program has been
traced and lowered (seconds for a 32-layer model). This cache keeps the compiled executable itself
(`jax.experimental.serialize_executable`) under a key computed without tracing: everything that changes
the program (`model_key`: the model's config, the mesh and its devices, the CPU's features, jax and
jaxlib, the source of `model/` and of its native kernels) plus the program's name and shapes. A file
that is stale never matches a key; one that is corrupt, fails to load or was made for parameters laid
out otherwise is deleted and rebuilt, silently. The key needs no weights, so a start deserializes its
first programs while the weights load: those the last start's first turn ran (`first_turn`, kept beside
the programs), so a start that asks what the last one asked has them ready when its weights are.

Do not combine it with JAX's persistent compilation cache: an executable that XLA:CPU took from that cache
serializes without some of its functions ("Function ... not found" when the copy runs). Around the
model's programs nothing is compiled: the cache, the random seed and the sampling settings are made on
the host and copied (generate.py, kv_cache.py).
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
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cache
from pathlib import Path

import jax
from jax.experimental import serialize_executable

SUFFIX = ".executable"
FIRST_TURN_SUFFIX = ".first-turn.json"
WEIGHTS_PLAN_SUFFIX = ".weights-plan.json"


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


def model_key(config_json: dict, mesh) -> str:
    """What makes one model's programs differ from another's, known before its weights load: the
    config, the mesh and its devices, the CPU's features, jax and jaxlib, XLA's flags, the source of
    `model/` and of its native kernels (which decide every parameter's layout). Computed without
    tracing anything."""
    devices = [f"{d.platform}:{d.device_kind}:{d.id}:{d.process_index}" for d in mesh.devices.flat]
    parts = {"config": config_json, "mesh": dict(mesh.shape), "devices": devices, "jax": jax.__version__,
             "jaxlib": importlib.metadata.version("jaxlib"), "cpu": _cpu_features(), "code": _code_digest(),
             "xla_flags": os.environ.get("XLA_FLAGS", "")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def layout_digest(params: list[jax.Array]) -> str:
    """Each parameter's shape, dtype and placement: a program is used only with the parameters it was
    compiled for (a check behind `model_key`, which implies them)."""
    arrays = [(a.shape, str(a.dtype), str(a.sharding.spec) if hasattr(a.sharding, "spec") else str(a.sharding))
              for a in params]
    return hashlib.sha256(json.dumps(arrays, default=str).encode()).hexdigest()


class ExecutableCache:
    """A folder of serialized executables, one file per (model key, program), for one model on `devices`.

    `start_loading` deserializes programs in a background thread (XLA does it without holding the GIL)
    while the weights load; `get` takes a program from there, or from disk, or compiles it (and saves it
    there)."""

    def __init__(self, directory: str | Path, model: str, devices: list):
        self.directory, self.model, self.devices = Path(directory), model, devices
        self._loading: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def _path(self, program: str, suffix: str = SUFFIX) -> Path:
        return self.directory / (hashlib.sha256(f"{self.model}\0{program}".encode()).hexdigest()[:32] + suffix)

    def first_turn(self) -> list[str]:
        """The programs the first turn of the last start on this model ran, in that order ([] if unknown)."""
        programs = self._record("first turn", FIRST_TURN_SUFFIX)
        return [p for p in programs if isinstance(p, str)] if isinstance(programs, list) else []

    def remember_first_turn(self, programs: list[str]) -> None:
        """What this start's first turn runs: the next start loads these first."""
        if programs != self.first_turn():
            self._write(self._path("first turn", FIRST_TURN_SUFFIX), json.dumps(programs).encode())

    def weights_plan(self) -> object:
        """What the last start kept of how its model's arrays were made (`remember_weights_plan`; None if
        nothing, or not JSON: the caller checks the rest)."""
        return self._record("weights plan", WEIGHTS_PLAN_SUFFIX)

    def remember_weights_plan(self, plan: object) -> None:
        """How this start's model made its arrays (JSON): the next start makes them so, without building
        the model (engine.py)."""
        if plan != self.weights_plan():
            self._write(self._path("weights plan", WEIGHTS_PLAN_SUFFIX), json.dumps(plan).encode())

    def _record(self, name: str, suffix: str) -> object:
        try:
            return json.loads(self._path(name, suffix).read_text())
        except (OSError, ValueError):
            return None

    def has(self, program: str) -> bool:
        return program in self._loading or self._path(program).is_file()

    def _background(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="executables")
        return self._pool

    def start_loading(self, programs: list[str]) -> None:
        """Deserialize these programs (those on disk), in this order, in a background thread. The native
        code they call (FFI targets) must be registered before."""
        for program in programs:
            if program not in self._loading and self._path(program).is_file():
                self._loading[program] = self._background().submit(self._load, program)

    def wait(self) -> None:
        """Until the background thread has done what it was given (loads, saves)."""
        if self._pool is not None:
            self._pool.submit(lambda: None).result()

    def get(self, program: str, layout: str, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
        """The program compiled for parameters of this `layout` (`layout_digest`): loaded (or being
        loaded) from disk if it is there and loads; else lowered and compiled, and saved in the
        background thread (serializing and writing it took ~0.5 s of the demo's cold first token)."""
        loading = self._loading.pop(program, None)
        found = loading.result() if loading is not None and not loading.cancel() else self._load(program)
        if found is not None:
            if found[0] == layout:
                return found[1]
            self._path(program).unlink(missing_ok=True)  # made for other parameters (a stale key)
        compiled = lower().compile()
        self._background().submit(self._save, program, layout, compiled)
        return compiled

    def _load(self, program: str) -> tuple[str, jax.stages.Compiled] | None:
        """(layout, program) from disk; None if absent. One that is truncated, corrupt or from another
        build is deleted (and rebuilt by `get`)."""
        path = self._path(program)
        try:
            layout, payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            return layout, serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                     execution_devices=self.devices)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 (truncated, corrupt or from another build: rebuild it)
            path.unlink(missing_ok=True)
            return None

    def _save(self, program: str, layout: str, compiled: jax.stages.Compiled) -> None:
        try:
            data = pickle.dumps((layout, *serialize_executable.serialize(compiled)))
        except (ValueError, NotImplementedError, pickle.PicklingError):
            return  # this backend cannot serialize it: the next start compiles it again
        self._write(self._path(program), data)

    def _write(self, path: Path, data: bytes) -> None:
        """Atomically; a cache that cannot be written (read-only, full disk) only costs the next start."""
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
