"""No import cycles: every module of both packages imports cleanly when it is the first one a fresh
interpreter imports (a cycle fails only for the module it is entered from, so each gets its turn), and
nothing in `model` imports `chat_app`."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "chat_app")


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        names.append(package)
        for module in pkgutil.walk_packages([str(REPO_ROOT / package)], prefix=f"{package}."):
            if not module.name.endswith(".__main__"):  # importing it runs the program
                names.append(module.name)
    return sorted(names)


def _import_first(module: str) -> tuple[str, int, str]:
    probe = (f"import sys\nimport {module}\n"
             f"if {module!r}.startswith('model'):\n"
             "    assert not [m for m in sys.modules if m.split('.')[0] == 'chat_app'], 'model imported chat_app'\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return module, done.returncode, done.stderr


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    modules = _modules()
    assert {"chat_app.cli", "chat_app.setup_flow", "chat_app.screens.chat", "model.mixtral"} <= set(modules)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f"{module}: {stderr.strip().splitlines()[-1] if stderr.strip() else f'exit {status}'}"
                    for module, status, stderr in pool.map(_import_first, modules) if status != 0]
    assert not failures, "\n".join(failures)
