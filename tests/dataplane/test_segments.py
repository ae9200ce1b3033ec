"""Shared-memory segments: names, permissions, layout, claiming, and the sweep of a killed creator's names.
Real /dev/shm, real processes; no Ray, no network."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest
import torch

from paramserver.dataplane import segments
from paramserver.dataplane.segments import ALIGN, PREFIX, Segment, host_identity, layout_offsets, leftover_names, sweep

pytestmark = pytest.mark.skipif(not segments.available(), reason="no /dev/shm on this host")

SIZES = [(5, torch.float32), (3, torch.float64), (0, torch.float32), (7, torch.bfloat16)]


def test_layout_offsets_align_every_buffer_to_a_cache_line():
    offsets, size = layout_offsets(SIZES)
    assert offsets == [0, 64, 128, 128]  # an empty buffer takes no room
    assert size == 128 + 7 * 2
    assert all(o % ALIGN == 0 for o in offsets)
    assert layout_offsets([]) == ([], 1)  # a shard with no parameters still maps one byte


def test_a_segment_is_private_to_its_user_and_its_name_unguessable():
    segment = Segment.create(layout_offsets(SIZES)[1])
    try:
        path = segments.SHM_DIR / segment.name
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert segment.name.startswith(f"{PREFIX}{os.getpid()}-")
        assert len(segment.name.rsplit("-", 1)[1]) == 32  # 128 random bits
        assert segment.name in leftover_names()
    finally:
        segment.unlink()
    assert segment.name not in leftover_names()


def test_two_mappings_see_the_same_bytes_and_claiming_removes_the_name():
    size = layout_offsets(SIZES)[1]
    mine = Segment.create(size)
    theirs = Segment.open(mine.name, size, claim=True)
    assert mine.name not in leftover_names()  # claimed: nothing left in /dev/shm, both mappings live on
    a, b = mine.tensors(SIZES), theirs.tensors(SIZES)
    for t in a:
        t.copy_(torch.arange(t.numel()).to(t.dtype))
    for x, y in zip(a, b):
        assert torch.equal(x, y) and (x.data_ptr() != y.data_ptr() or not x.numel())
    assert all(t.data_ptr() % ALIGN == 0 for t in b if t.numel())
    b[0].fill_(-1.0)
    assert a[0].eq(-1.0).all()
    mine.unlink()  # again after the claim: nothing happens


@pytest.mark.parametrize(
    ("name", "error"),
    [("not-ours", ValueError), (PREFIX + "../etc", ValueError), (PREFIX + "123-" + "0" * 32, FileNotFoundError)],
)
def test_opening_what_is_not_a_live_segment_fails(name, error):
    with pytest.raises(error):
        Segment.open(name, 16)


def test_a_segment_smaller_than_asked_is_refused():
    segment = Segment.create(16)
    try:
        with pytest.raises(OSError, match="holds 16 bytes"):
            Segment.open(segment.name, 4096, claim=False)
    finally:
        segment.unlink()


def test_sweep_removes_the_names_of_a_creator_killed_by_sigkill_and_keeps_live_ones():
    mine = Segment.create(64)
    code = (
        "import os, signal, sys; from paramserver.dataplane.segments import Segment; "
        "s = Segment.create(64); print(s.name, flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL
    orphan = child.stdout.strip()
    try:
        assert orphan in leftover_names()
        assert orphan in sweep()
        assert orphan not in leftover_names() and mine.name in leftover_names()
    finally:
        mine.unlink()


def test_the_host_identity_names_host_boot_and_shared_memory_mount():
    identity = host_identity()
    assert identity == host_identity() and identity.count("/") >= 2
