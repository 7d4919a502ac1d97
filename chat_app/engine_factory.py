"""How the app and headless mode get their engine: an `EngineFactory` builds one for a checkpoint dir,
reporting progress as it loads. `engine_factory(...)` gives the real one (`model.engine.Engine`); tests
give the app a scripted engine instead (tests/scripted_engine.py). No jax until a factory is called.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chat_app import paths
from model.engine_api import ChatEngine

if TYPE_CHECKING:
    from model.multihost import Link

Progress = Callable[[float, str], None]  # (fraction done, what is happening)
EngineFactory = Callable[[Path, Progress], ChatEngine]
"""Builds the engine for a checkpoint dir, reporting progress as it loads (called on the worker thread)."""


def engine_factory(*, mesh_shape: tuple[int, int] | None = None, context_length: int | None = None,
                   compilation_cache: bool = False, link: Link | None = None) -> EngineFactory:
    """The real engine (`model.engine.Engine`) on `mesh_shape`, seeing `context_length` tokens.
    `compilation_cache`: keep compiled programs on disk (`paths.executables_dir()`), so the next start on
    the same model and devices neither traces nor compiles the model's programs. Only the real app
    turns it on, not tests (which count what they compile). `link`: this process drives others
    (model/multihost.py), which mirror what its engine runs."""

    def open_engine(ckpt_dir: Path, on_progress: Progress) -> ChatEngine:
        from model.engine import Engine  # imports jax: kept off the UI thread

        engine = Engine(ckpt_dir, mesh_shape=mesh_shape, context_length=context_length, on_progress=on_progress,
                        executable_cache=paths.executables_dir() if compilation_cache else None)
        if link is None:
            return engine
        from model.multihost import DriverEngine

        return DriverEngine(engine, link)

    return open_engine
