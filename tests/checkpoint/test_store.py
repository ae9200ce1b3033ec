"""The on-disk format: a crash at any file operation of a write leaves the previous checkpoint valid; old
checkpoints are kept up to ``keep``."""

from __future__ import annotations

import os

import pytest
import torch

import paramserver as ps
from paramserver.checkpoint import Checkpointer, io, load_torch_state, steps, store
from tests.helpers.reference import assert_state_equal, make_model, push_step, worker_grads


def _engine() -> ps.StepEngine:
    return ps.StepEngine(make_model().parameters(), "Adam", lr=1e-2, config=ps.JobConfig(num_workers=2), num_shards=2)


def _train(engine: ps.StepEngine, steps_: int) -> None:
    params = [torch.empty(p.shape, dtype=p.dtype) for p in engine.plan.params]
    for _ in range(steps_):
        push_step(engine, engine.step, worker_grads(params, engine.step, 2))


class Crash(Exception):
    pass


def _count_ops(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(io, "before", lambda op, path: seen.append((op, os.path.basename(path))))
    return seen


def test_a_crash_at_any_file_operation_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    engine = _engine()
    ckpt = Checkpointer(str(tmp_path), keep=1)
    _train(engine, 2)
    assert ckpt.save(engine, "j").result(30) == 2
    before = load_torch_state(str(tmp_path), "j")
    _train(engine, 1)
    ops = _count_ops(monkeypatch)
    part, writes = ps.checkpoint.take(engine, str(tmp_path), "j")
    shards = [w.piece for w in writes]  # shards in this process: their copies, for the writer to write
    store.write(str(tmp_path), "j-count", 3, part, shards, keep=1)  # how many operations a write makes
    write_ops = [op for op in ops if op[0] != "remove"]
    assert [op for op, _ in write_ops].count("rename") == 1 and len(write_ops) >= 10
    rename_at = [op for op, _ in write_ops].index("rename")
    for k in range(len(write_ops)):
        calls = 0

        def fail_kth(op: str, path: str, k: int = k) -> None:
            nonlocal calls
            if op != "remove":
                calls += 1
                if calls == k + 1:
                    raise Crash(f"{op} {path}")

        monkeypatch.setattr(io, "before", fail_kth)
        with pytest.raises(Crash):
            store.write(str(tmp_path), "j", 3, part, shards, keep=1)
        monkeypatch.setattr(io, "before", None)
        # the old checkpoint is there and loads as it was; the broken one counts only once its manifest is in
        assert_state_equal(load_torch_state(str(tmp_path), "j", step=2), before)
        latest = store.read_latest(str(tmp_path), "j")[0]["step"]
        assert latest == (3 if k > rename_at else 2), f"crash at {write_ops[k]}"
        if k <= rename_at:
            assert steps(str(tmp_path), "j") == [2]
        # the next write cleans up and succeeds
        store.write(str(tmp_path), "j", 3, part, shards, keep=2)
        assert steps(str(tmp_path), "j") == [2, 3]
        assert load_torch_state(str(tmp_path), "j")["scheduler"] is None
        for name in os.listdir(store.job_dir(str(tmp_path), "j")):
            if name != store.step_dir(str(tmp_path), "j", 2).rsplit(os.sep, 1)[1]:
                io.remove_tree(os.path.join(store.job_dir(str(tmp_path), "j"), name))
    ckpt.close()


def test_a_disk_that_fills_up_in_the_middle_of_a_file_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    """A file is written as torch.save streams it out: a write that fails half-way (ENOSPC) leaves half a file,
    which no manifest lists; the next write removes it."""
    import errno

    engine = _engine()
    ckpt = Checkpointer(str(tmp_path), keep=2)
    _train(engine, 2)
    assert ckpt.save(engine, "j").result(30) == 2
    ckpt.close()
    before = load_torch_state(str(tmp_path), "j")
    _train(engine, 1)
    part, writes = ps.checkpoint.take(engine, str(tmp_path), "j")
    shards = [w.piece for w in writes]
    real_write, written = os.write, 0

    def fills_up(fd: int, data: memoryview) -> int:
        nonlocal written
        if written > 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += real_write(fd, data[:1000])  # a short write: the rest is written by the next call
        return min(len(data), 1000)

    monkeypatch.setattr(io.os, "write", fills_up)
    with pytest.raises(OSError, match="No space left"):
        store.write(str(tmp_path), "j", 3, part, shards, keep=2)
    monkeypatch.setattr(io.os, "write", real_write)
    half = os.path.join(store.step_dir(str(tmp_path), "j", 3), store.shard_file(0))
    assert 2000 < os.path.getsize(half) <= 3000  # half a file, in no manifest
    assert steps(str(tmp_path), "j") == [2] and store.read_latest(str(tmp_path), "j")[0]["step"] == 2
    assert_state_equal(load_torch_state(str(tmp_path), "j"), before)
    store.write(str(tmp_path), "j", 3, part, shards, keep=2)  # the disk has room again
    assert steps(str(tmp_path), "j") == [2, 3] and store.read_latest(str(tmp_path), "j")[0]["step"] == 3


def test_a_corrupted_file_makes_a_checkpoint_invalid_and_the_older_one_is_used(tmp_path):
    engine = _engine()
    ckpt = Checkpointer(str(tmp_path), keep=3)
    _train(engine, 1)
    ckpt.save(engine, "j").result(30)
    _train(engine, 1)
    ckpt.save(engine, "j").result(30)
    path = os.path.join(store.step_dir(str(tmp_path), "j", 2), store.shard_file(1))
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    assert store.read_latest(str(tmp_path), "j")[0]["step"] == 1
    with pytest.raises(ValueError, match="checksum"):
        load_torch_state(str(tmp_path), "j", step=2)
    ckpt.close()


def test_a_file_is_written_as_torch_saves_it_with_the_crc_of_its_bytes(tmp_path, monkeypatch):
    import io as bytes_io
    import zlib

    monkeypatch.setattr(io, "READ_CHUNK", 4096)  # the check reads the file in many chunks

    piece = {"weights": [torch.randn(70_000)], "state": [{"exp_avg": torch.randn(5, 7), "step": torch.tensor(3.0)}]}
    entry = store.write_file(str(tmp_path / "s" / "shard.pt"), piece)  # its directory made on the way
    expected = bytes_io.BytesIO()
    torch.save(piece, expected)
    written = (tmp_path / "s" / "shard.pt").read_bytes()
    assert written == expected.getvalue()  # streamed out as torch.save writes it, byte for byte
    assert entry == {"crc32": zlib.crc32(written), "bytes": len(written)}
    assert io.file_matches(str(tmp_path / "s" / "shard.pt"), entry)
    for changed in (written[:-1], written[:100] + bytes([written[100] ^ 1]) + written[101:]):
        (tmp_path / "s" / "changed.pt").write_bytes(changed)
        assert not io.file_matches(str(tmp_path / "s" / "changed.pt"), entry)


def test_a_checkpoint_of_format_1_checked_by_sha256_still_reads(tmp_path, monkeypatch):
    import hashlib
    import json

    monkeypatch.setattr(io, "READ_CHUNK", 4096)

    engine = _engine()
    _train(engine, 1)
    ckpt = Checkpointer(str(tmp_path), keep=3)
    ckpt.save(engine, "j").result(30)
    ckpt.close()
    saved = load_torch_state(str(tmp_path), "j")
    step_dir = store.step_dir(str(tmp_path), "j", 1)
    manifest_path = os.path.join(step_dir, store.MANIFEST)
    manifest = json.loads(open(manifest_path).read())
    assert manifest["format"] == store.FORMAT == 2
    manifest["format"] = 1
    for name in manifest["files"]:
        data = open(os.path.join(step_dir, name), "rb").read()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    assert_state_equal(load_torch_state(str(tmp_path), "j"), saved)
    with open(os.path.join(step_dir, store.shard_file(0)), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(ValueError, match="checksum"):
        load_torch_state(str(tmp_path), "j", step=1)


def test_keeps_the_newest_checkpoints(tmp_path):
    engine = _engine()
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for _ in range(4):
        _train(engine, 1)
        ckpt.save(engine, "a/b")  # any job name is one directory
    ckpt.close()
    assert steps(str(tmp_path), "a/b") == [3, 4]
    assert ps.checkpoint.jobs(str(tmp_path)) == ["a/b"]
    with pytest.raises(FileNotFoundError):
        load_torch_state(str(tmp_path), "nope")


def test_a_write_leaves_the_files_of_a_write_under_way_and_never_rewrites_a_valid_checkpoint(tmp_path, monkeypatch):
    root = str(tmp_path)
    engine = _engine()
    _train(engine, 1)
    part, writes = ps.checkpoint.take(engine, root, "j")
    shards = [w.piece for w in writes]
    # shards in their own processes write step 2's files while the writer still finishes step 1's checkpoint
    unfinished, under_way = store.step_dir(root, "j", 0), store.step_dir(root, "j", 2)
    for path in (unfinished, under_way):
        store.write_file(os.path.join(path, store.shard_file(0)), shards[0])
    assert store.begin(root, "j", 1, in_flight={2})
    assert not os.path.exists(unfinished) and os.path.exists(os.path.join(under_way, store.shard_file(0)))
    store.finish(root, "j", 1, part, [store.write_file(w.path, w.piece) for w in writes], keep=2)
    assert steps(root, "j") == [1] and os.path.exists(under_way)  # pruning keeps what has no manifest yet

    ckpt = Checkpointer(root, keep=2)
    ops = _count_ops(monkeypatch)
    assert ckpt.save(engine, "j").result(30) == 1  # step 1 is valid already: nothing copied, nothing written
    assert ops == []
    ckpt.close()


def test_a_shards_next_copy_reuses_the_buffers_its_last_write_released():
    import paramserver as ps

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine = ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, num_shards=1)
    shard = engine.shards.shards[0]

    def train(step: int) -> None:
        engine.push(0, step, [torch.full_like(p, step + 1.0) for p in model.parameters()])

    def same(piece: dict, fresh: dict) -> None:
        assert piece["version"] == fresh["version"]
        assert all(torch.equal(a, b) for a, b in zip(piece["weights"], fresh["weights"]))
        for a, b in zip(piece["state"], fresh["state"]):
            assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)

    train(0)
    first = shard.save_snapshot("unused")
    train(1)
    unreleased = shard.save_snapshot("unused")  # the first is still being written: new buffers
    assert unreleased.piece["weights"][0].data_ptr() != first.piece["weights"][0].data_ptr()
    first.release()
    train(2)
    second = shard.save_snapshot("unused")
    assert second.piece is first.piece  # the released buffers, holding step 3's state now
    same(second.piece, shard.snapshot())
    assert second.piece["version"] == 3
