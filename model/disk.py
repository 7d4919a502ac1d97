"""Disk trouble in words: a folder that cannot be made (a file in its way, a read-only disk), a full disk.

Used wherever the program writes the user's files (checkpoints, personas, downloads, the history), so
every one of those says the same thing about the same problem, in one line.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import UserError


class DiskError(UserError):
    """A folder or file that cannot be written, in words fit for the user."""


def describe(error: OSError, path: Path, needed: int | None = None) -> str:
    """Why writing `path` failed, in words: what is wrong, and what to do. `needed`: the bytes the
    write needs, said when the disk is full."""
    path = Path(path)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        need = f"{format_bytes(needed)} needed, " if needed else ""
        return f"the disk holding {path} is full ({need}{format_bytes(free_bytes(path))} free)"
    if error.errno == errno.EROFS:
        return f"{path} is on a read-only file system"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {path}"
    if error.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file where a folder should be: move it away"
    return f"cannot write {path}: {error.strerror or error}"


def make_folder(path: Path) -> Path:
    """`path` as an existing folder (made with its parents if missing); DiskError saying why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiskError(describe(e, path)) from None
    return path


def free_bytes(path: Path) -> int:
    """Free space on the disk holding `path` (or its nearest existing parent)."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(existing if existing.is_dir() else existing.parent).free


def format_bytes(n_bytes: int) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"
