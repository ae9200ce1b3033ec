"""glibc's allocator settings (paramserver.core.malloc), in a process of their own: the fixed mmap threshold and
giving the arenas' free memory back."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")

# A thread allocates 64 MB in 1 MiB tensors (below the fixed 4 MiB threshold: they come from its heap arena) and
# frees them; a second thread allocates and keeps one small tensor at the arena's top, so the free memory is a
# hole that only malloc_trim gives back. Prints RssAnon (kB) after the free and after the trim.
SCRIPT = textwrap.dedent("""
    import threading
    import torch
    from paramserver.core.malloc import fix_mmap_threshold, release_free_memory

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    assert fix_mmap_threshold()
    kept = []
    def burst():
        chunks = [torch.ones(1 << 18) for _ in range(64)]
        kept.append(torch.ones(16))
        del chunks
    t = threading.Thread(target=burst)
    t.start()
    t.join()
    before = anon_kb()
    assert release_free_memory()
    print(before, anon_kb())
""")


def test_release_free_memory_gives_a_threads_freed_chunks_back():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True).stdout
    before, after = map(int, out.split())
    assert before - after > 32 * 1024, (before, after)  # most of the 64 MB freed in the thread's arena
