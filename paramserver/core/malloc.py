"""Hand big buffers back to the OS when they are freed.

glibc serves an allocation above its mmap threshold with its own mmap, returned to the OS on free, but it
raises that threshold (up to 32 MiB) each time such a block is freed; from then on the data path's
megabyte-sized chunks and buffers come from the heap arenas of many threads, fragment them, and the
process's RSS creeps up step after step. Measured on the 2-worker x 2-shard benchmark job: a shard's peak
RSS 1004 MB with the dynamic threshold, about 530 MB with it fixed at 4 MiB (chunks, 2 MiB, still come
from the heap and are reused; whole buffers are mapped and unmapped).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

_M_MMAP_THRESHOLD = -3


@functools.cache
def fix_mmap_threshold(nbytes: int = 4 * 2**20) -> bool:
    """Fix glibc's mmap threshold for this process; False where there is no glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False
