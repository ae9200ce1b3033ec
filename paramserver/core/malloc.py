"""Hand big buffers back to the OS when they are freed.

glibc serves an allocation above its mmap threshold with its own mmap, returned to the OS on free, but it
raises that threshold (up to 32 MiB) each time such a block is freed; from then on the data path's
megabyte-sized chunks and buffers come from the heap arenas of many threads, fragment them, and the
process's RSS creeps up step after step. Measured on the 2-worker x 2-shard benchmark job: a shard's peak
RSS 1004 MB with the dynamic threshold, about 530 MB with it fixed at 4 MiB (chunks, 1-2 MiB, still come
from the heap and are reused; whole buffers are mapped and unmapped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@functools.cache
def fix_mmap_threshold(nbytes: int = 4 * 2**20) -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc (nothing to do there)."""
    libc = _libc()
    try:
        return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except AttributeError:
        return False


def release_free_memory() -> bool:
    """Give the free memory of every heap arena back to the OS (glibc's ``malloc_trim``); False where there is
    no glibc. A thread's arena keeps what it freed for its next allocations: after a one-off burst of them (a
    job's initial weights received in chunks, its first step) that memory would stay in the RSS for good."""
    libc = _libc()
    if libc is None:
        return False
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return False
    return True
