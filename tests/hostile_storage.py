"""Real hostile storage for tests: a small tmpfs that fills up, a folder mounted read-only.

Both need `mount` (root, or a user namespace that allows it; the CI and dev containers run as root).
Where mounting is refused, the test is skipped with the reason. `chmod` cannot stand in: root writes
through file modes, so a read-only mount is the only read-only folder that binds root too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    if shutil.which("mount") is None:
        pytest.skip("cannot mount here: no `mount` command")
    result = subprocess.run(["mount", *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (mount {' '.join(args)}: {result.stderr.strip() or result.returncode})")


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", "--lazy", str(folder)], check=True)


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_bytes: int) -> Iterator[Path]:
    """`folder` as a tmpfs of `size_bytes` (rounded up to whole 4 kB pages by the kernel)."""
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(folder))
    try:
        yield folder
    finally:
        _unmount(folder)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[Path]:
    """`folder` (with what is in it) bind-mounted read-only onto itself for the duration."""
    _mount("--bind", str(folder), str(folder))
    try:
        _mount("-o", "remount,ro,bind", str(folder))
        yield folder
    finally:
        _unmount(folder)


def fill(folder: Path, name: str = "filler") -> Path:
    """Write into `folder` until its disk is full; delete the file returned to give the space back."""
    filler = folder / name
    block = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    with open(filler, "ab", buffering=0) as f:  # the last partial block, byte by byte
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
    os.sync()
    return filler
