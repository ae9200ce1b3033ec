"""Shared-memory segments: POSIX shared memory holding a shard's flat buffers, mapped as tensors.

A segment is a file of the shared-memory mount (``/dev/shm``, what ``shm_open`` makes on Linux), created with
``O_EXCL`` and mode 0600 under the name ``paramserver-<creator pid>-<128 random bits>``: only a process of the
same user that was told the name can open it. Its buffers start at 64-byte boundaries (a cache line), in the
order of the shard's layouts.

A name is a rendezvous, not a home. A segment meant for one other process (a worker's gradients) loses its
name when that process opens it (``claim``); a segment many open (a job's weights) keeps it while its
creator holds it and is unlinked when the creator lets it go. The memory itself is freed by the kernel with
the last mapping. A creator killed before it could unlink leaves a name whose pid is dead; ``sweep`` removes
those, and every shard process runs it when it starts and when it stops.

The stdlib's ``multiprocessing.shared_memory`` is not used: before Python 3.13 it registers every segment it
opens with a resource tracker that unlinks it when the opening process exits (which a segment with two
owners must not allow), and it cannot map read-only.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import socket
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "paramserver-"
ALIGN = 64


def available() -> bool:
    """Whether this host has POSIX shared memory where this module looks for it (Linux)."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def host_identity() -> str:
    """Who shares this process's shared memory: the host name, the kernel's boot id and the device of the
    shared-memory mount (two containers on one host with their own ``/dev/shm`` differ in the last). Equal
    identities are a hint, not a proof: the segment a worker then opens is the proof."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    try:
        device = os.stat(SHM_DIR).st_dev
    except OSError:
        return ""  # no shared memory here: matches no one
    return f"{socket.gethostname()}/{boot}/{device}"


def layout_offsets(sizes: Sequence[tuple[int, torch.dtype]]) -> tuple[list[int], int]:
    """Byte offsets of buffers of (numel, dtype) laid out one after another at ``ALIGN`` boundaries, and the
    segment's total size (at least one byte: an empty segment cannot be mapped)."""
    offsets, end = [], 0
    for numel, dtype in sizes:
        end = -(-end // ALIGN) * ALIGN
        offsets.append(end)
        end += numel * torch.empty((), dtype=dtype).element_size()
    return offsets, max(end, 1)


class Segment:
    """One mapped segment. ``create`` makes a new one; ``open`` maps one another process made."""

    def __init__(self, name: str, size: int, buffer: mmap.mmap, readonly: bool) -> None:
        self.name = name
        self.size = size
        self._map = buffer
        self.readonly = readonly
        self._pinned: int | None = None  # the address cudaHostRegister page-locked (``pin``)

    @classmethod
    def create(cls, size: int) -> Segment:
        """A new segment of ``size`` bytes (zeros). ``OSError`` where there is no shared memory."""
        name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        except BaseException:
            _unlink(name)
            raise
        finally:
            os.close(fd)
        return cls(name, size, buffer, readonly=False)

    def unlink(self) -> None:
        """Remove the name (mappings stay valid); again, or after the other side did: nothing happens."""
        _unlink(self.name)

    @classmethod
    def open(cls, name: str, size: int, readonly: bool = False, claim: bool = True) -> Segment:
        """Map the segment ``name`` of ``size`` bytes; ``claim``: remove its name once mapped (the caller is the
        other owner the creator handed it to). ``OSError`` when it is not there, not this user's, or smaller."""
        if not name.startswith(PREFIX) or "/" in name or name in (PREFIX, "."):
            raise ValueError(f"not a segment name of this service: {name!r}")
        fd = os.open(SHM_DIR / name, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            if os.fstat(fd).st_size < size:
                raise OSError(f"shared memory {name} holds {os.fstat(fd).st_size} bytes, not {size}")
            buffer = mmap.mmap(fd, size, prot=mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        if claim:
            _unlink(name)
        return cls(name, size, buffer, readonly)

    def pin(self) -> bool:
        """Page-lock the mapping for CUDA (``cudaHostRegister``), so that a GPU copies to and from it directly
        at the link's speed, not through the driver's staging buffers (a quarter of it, measured). False where
        CUDA refuses: the copies still work, slower. ``unpin`` must come before the mapping goes."""
        if self._pinned is not None:
            return True
        address = torch.frombuffer(self._map, dtype=torch.uint8, count=self.size).data_ptr()
        code = int(torch.cuda.cudart().cudaHostRegister(address, self.size, 0))
        if code != 0:
            log.warning("shared memory %s stays pageable: cudaHostRegister failed (cudaError %d)", self.name, code)
            return False
        self._pinned = address
        return True

    def unpin(self) -> None:
        """Undo ``pin``; not pinned: nothing happens."""
        if self._pinned is not None:
            address, self._pinned = self._pinned, None
            code = int(torch.cuda.cudart().cudaHostUnregister(address))
            if code != 0:
                log.warning("shared memory %s: cudaHostUnregister failed (cudaError %d)", self.name, code)

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    def tensors(self, sizes: Sequence[tuple[int, torch.dtype]]) -> list[torch.Tensor]:
        """Flat tensors over the segment, one per (numel, dtype), at ``layout_offsets``. They keep the mapping
        alive: it is unmapped when the last of them (and this object) is gone."""
        offsets, total = layout_offsets(sizes)
        assert total <= self.size, "the segment was made for these sizes"
        out = []
        with warnings.catch_warnings():
            # a read-only mapping makes read-only tensors: a write through them faults instead of changing the
            # service's weights behind its back
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            for (numel, dtype), offset in zip(sizes, offsets):
                out.append(torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset) if numel else torch.empty(0, dtype=dtype))
        return out


def leftover_names() -> list[str]:
    """The names of this service's segments in ``/dev/shm`` now (each one a segment nobody claimed yet)."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p.name for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX))


def sweep() -> list[str]:
    """Remove the names whose creator is no longer alive (killed before it could unlink them); returns them."""
    removed = []
    for name in leftover_names():
        pid = creator(name)
        if pid is not None and not alive(pid):
            _unlink(name)
            removed.append(name)
    return removed


def creator(name: str) -> int | None:
    """The pid of the process that made segment ``name`` (None for a name of another form)."""
    pid = name[len(PREFIX):].split("-", 1)[0]
    return int(pid) if name.startswith(PREFIX) and pid.isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _unlink(name: str) -> None:
    """Remove a name (mappings stay valid); one the other side removed already: nothing happens."""
    try:
        os.unlink(SHM_DIR / name)
    except FileNotFoundError:
        pass
