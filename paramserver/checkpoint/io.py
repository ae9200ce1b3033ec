"""Every file operation of a checkpoint write, in one place: a test can fail the k-th one (``before``) to show
that a crash at any point leaves the previous checkpoint valid."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

# Called with (operation, path) before every operation below; a test sets it to raise at a chosen one.
before: Callable[[str, str], None] | None = None


def _hook(op: str, path: str) -> None:
    if before is not None:
        before(op, path)


def makedirs(path: str) -> None:
    _hook("makedirs", path)
    os.makedirs(path, exist_ok=True)


def write(path: str, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (two operations: "write", then "fsync")."""
    _hook("write", path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        _hook("fsync", path)
        os.fsync(fd)
    finally:
        os.close(fd)


def rename(src: str, dst: str) -> None:
    """Atomic replace: a reader sees the old ``dst`` or the whole new one."""
    _hook("rename", dst)
    os.replace(src, dst)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable."""
    _hook("fsync_dir", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    _hook("remove", path)
    shutil.rmtree(path, ignore_errors=True)
