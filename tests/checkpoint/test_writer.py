"""The Checkpointer's bound on memory: a job's next copy waits for its write under way, so checkpoints that come
faster than they are written never pile up copies of the state; one whose write before is stuck is not taken."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from paramserver.checkpoint import Checkpointer, io, steps
from paramserver.core.shard import Shard
from tests.checkpoint.test_store import _engine, _train


def _count_fresh_copies(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every copy into new memory (``Shard._copy_new``), not into the buffers a finished write gave back."""
    made: list[int] = []
    fresh = Shard._copy_new

    def counted(self: Shard) -> dict:
        made.append(self.shard_id)
        return fresh(self)

    monkeypatch.setattr(Shard, "_copy_new", counted)
    return made


def test_checkpoints_faster_than_their_writes_wait_and_keep_one_copy_in_flight(tmp_path, monkeypatch, caplog):
    engine = _engine()
    made = _count_fresh_copies(monkeypatch)
    monkeypatch.setattr(io, "before", lambda op, path: time.sleep(0.05) if op == "fsync" else None)  # slow disk
    ckpt = Checkpointer(str(tmp_path), keep=5)
    try:
        futures = []
        with caplog.at_level(logging.WARNING, logger="paramserver"):
            for _ in range(3):
                _train(engine, 1)
                futures.append(ckpt.save(engine, "j"))
                assert all(f.done() for f in futures[:-1])  # the copy waited for the write before it
        assert [f.result(30) for f in futures] == [1, 2, 3]
        assert sorted(made) == [0, 1]  # one fresh copy per shard: the later ones went into the buffers given back
        slow = [r for r in caplog.records if "come faster than they are written" in r.getMessage()]
        assert len(slow) == 1, "warned once for the job"
        assert steps(str(tmp_path), "j") == [1, 2, 3]
    finally:
        ckpt.close()


def test_a_checkpoint_whose_write_before_is_stuck_is_not_taken(tmp_path, monkeypatch):
    engine = _engine()
    made = _count_fresh_copies(monkeypatch)
    stuck, release = threading.Event(), threading.Event()

    def hold_the_first_write(op: str, path: str) -> None:
        if op == "write" and not stuck.is_set():
            stuck.set()
            assert release.wait(30), "the test did not release the write"

    monkeypatch.setattr(io, "before", hold_the_first_write)
    ckpt = Checkpointer(str(tmp_path), keep=5, shard_timeout=0.3)
    try:
        _train(engine, 1)
        first = ckpt.save(engine, "j")
        assert stuck.wait(30)
        _train(engine, 1)
        second = ckpt.save(engine, "j")
        with pytest.raises(TimeoutError, match="before step 2 is still under way"):
            second.result(1)
        assert len(made) == 2 and ckpt.failures == 1  # nothing copied for step 2
        release.set()
        assert first.result(30) == 1
        assert steps(str(tmp_path), "j") == [1]
        _train(engine, 1)
        assert ckpt.save(engine, "j").result(30) == 3  # the next checkpoint goes on as usual
    finally:
        release.set()
        ckpt.close()


def test_every_copy_is_reported_once_with_its_time(tmp_path):
    """``on_copy`` (the service's metric of how long a copy held its job): once per copy, not for a save of a
    step already under way or written."""
    engine = _engine()
    copies: list[tuple[str, float]] = []
    ckpt = Checkpointer(str(tmp_path), keep=2, on_copy=lambda job, seconds: copies.append((job, seconds)))
    try:
        _train(engine, 1)
        first = ckpt.save(engine, "j")
        assert ckpt.save(engine, "j").result(30) == first.result(30) == 1  # the same step: no second copy
        _train(engine, 1)
        assert ckpt.save(engine, "j").result(30) == 2
        assert [job for job, _ in copies] == ["j", "j"] and all(seconds > 0 for _, seconds in copies)
        assert copies[-1][1] == ckpt.last_copy_s
    finally:
        ckpt.close()


def test_pushes_go_on_during_a_copy_and_the_update_waits_for_it(monkeypatch):
    """The copy runs without the shard's lock: the next step's pushes (and the mean taken ahead) are not held by
    it; an update, which changes what the copy reads, waits until it is done, so the copy is of one version."""
    engine = _engine()
    _train(engine, 1)
    shard = engine.shards.shards[0]
    before = [w.clone() for w in shard.weights]
    copying, finish = threading.Event(), threading.Event()
    fresh = Shard._copy_new

    def slow_copy(self: Shard) -> dict:
        copying.set()
        assert finish.wait(30), "the test did not let the copy finish"
        return fresh(self)

    monkeypatch.setattr(Shard, "_copy_new", slow_copy)
    writes: list = []
    copier = threading.Thread(target=lambda: writes.append(shard.save_snapshot("unused")))
    copier.start()
    try:
        assert copying.wait(10)
        grads = _flat_grads(engine, 0)
        assert shard.push(0, 1, grads) and shard.push(1, 1, grads)  # both pushes of the next step, the copy under way
        shard.reduce(1, 2.0, None)  # the step's mean and norms, too
        updated = threading.Event()
        updater = threading.Thread(target=lambda: (shard.apply(1, None, engine.schedule.hyperparameters()), updated.set()))
        updater.start()
        assert not updated.wait(0.3), "the update ran during the copy"
    finally:
        finish.set()
        copier.join(10)
    updater.join(10)
    assert updated.is_set() and shard.version == 2
    (write,) = writes
    assert write.version == 1 and all(torch.equal(a, b) for a, b in zip(write.piece["weights"], before))
    assert not all(torch.equal(a, b) for a, b in zip(shard.weights, before))  # and the update came after it


def _flat_grads(engine, shard_id: int) -> list[torch.Tensor]:
    return [torch.ones(layout.numel, dtype=layout.dtype) for layout in engine.plan.buffers(shard_id)]
