"""A shard host's shared-memory plane without a network: attach, push and pull through the segments, the
weights shared under synchronous steps and copied under asynchronous ones, and every way a segment goes."""

from __future__ import annotations

import copy

import pytest
import torch

import paramserver as ps
from paramserver.core.errors import NotAMemberError
from paramserver.dataplane import segments
from paramserver.dataplane.segments import Segment, leftover_names
from paramserver.service.shard_host import ShardHost

pytestmark = pytest.mark.skipif(not segments.available(), reason="no /dev/shm on this host")


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _hosted(optimizer: str = "Adam", **config) -> tuple[torch.nn.Module, ps.StepEngine, ShardHost]:
    model = _model()
    engine = ps.StepEngine(model.named_parameters(), optimizer, lr=0.1, config=ps.JobConfig(num_workers=2, **config))
    host = ShardHost(0)
    host.add_job("j", engine.shards.shards[0], engine)
    return model, engine, host


def _grads(model: torch.nn.Module, step: int, worker: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + worker)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def _write(buffers: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    buffers[0].copy_(torch.cat([g.reshape(-1) for g in grads]))  # one fp32 buffer, the parameters in order


def test_synchronous_steps_share_the_live_weights_and_train_as_torch_does():
    model, engine, host = _hosted()
    shard = host.shard("j")
    reference = copy.deepcopy(model)
    reference_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    a0, a1 = host.attach_shared_memory("j", 0), host.attach_shared_memory("j", 1)
    assert a0.shared_weights and a0.weights is a1.weights  # one segment of weights for the job
    assert a0.grads is not a1.grads  # gradients: one segment per worker
    assert shard.weights[0].data_ptr() == a0.weight_buffers[0].data_ptr()  # the shard updates the segment itself
    assert all(t.untyped_storage().data_ptr() == shard.weights[0].untyped_storage().data_ptr() for t in shard.tensors)
    for step in range(3):
        g0, g1 = _grads(model, step, 0), _grads(model, step, 1)
        _write(a0.grad_buffers, g0)
        _write(a1.grad_buffers, g1)
        assert host.push_shared("j", 0, step) == (True, step)
        assert host.push_shared("j", 1, step)[0]  # the last push: its report closes the step, in the background
        assert shard.wait_for_version(step + 1, timeout=10) == step + 1
        assert host.push_shared("j", 1, step) == (False, step + 1)  # a retry: applied once
        assert host.write_pulled("j", 0) == (step + 1, 0)
        for p, x, y in zip(reference.parameters(), g0, g1):
            p.grad = (x + y) / 2
        reference_opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
    assert torch.equal(a1.weight_buffers[0], expected)
    host.remove_job("j")


def test_asynchronous_steps_copy_the_weights_into_each_workers_own_segment_at_its_pull():
    model, engine, host = _hosted("SGD", mode="async")
    a0 = host.attach_shared_memory("j", 0)
    assert not a0.shared_weights
    before = host.shard("j").weights[0].clone()
    _write(a0.grad_buffers, _grads(model, 0, 0))
    host.push_shared("j", 0, 0)
    host.shard("j").wait_for_version(1, timeout=10)
    assert torch.equal(a0.weight_buffers[0], torch.zeros_like(before))  # nothing written until the pull
    assert host.write_pulled("j", 0) == (1, 0)
    assert torch.equal(a0.weight_buffers[0], host.shard("j").weights[0]) and not torch.equal(a0.weight_buffers[0], before)
    host.remove_job("j")


def test_a_push_without_shared_memory_is_refused_and_changes_nothing():
    _, _, host = _hosted()
    with pytest.raises(ValueError, match="no shared memory here: attach it first"):
        host.push_shared("j", 0, 0)
    with pytest.raises(ValueError, match="worker must be in"):
        host.attach_shared_memory("j", 7)
    assert host.shard("j").accumulator.received == set() or not host.shard("j").accumulator.received
    host.remove_job("j")


def test_a_worker_that_leaves_loses_its_segments_and_a_later_push_is_told_it_is_no_member():
    _, engine, host = _hosted()
    host.attach_shared_memory("j", 0)
    host.attach_shared_memory("j", 1)
    engine.leave(1)
    assert host.shared_memory.workers("j") == [0]
    with pytest.raises(NotAMemberError):
        host.push_shared("j", 1, 0)
    host.remove_job("j")


def test_segments_go_on_detach_job_deletion_and_close_and_leave_no_name_behind():
    _, _, host = _hosted()
    attachment = host.attach_shared_memory("j", 0)
    # the worker never claimed its names: the shard removes them when the worker goes
    assert {attachment.grads.name, attachment.weights.name} <= set(leftover_names())
    assert host.shared_memory.detach("j", 0) and not host.shared_memory.detach("j", 0)
    assert attachment.grads.name not in leftover_names()
    assert attachment.weights.name in leftover_names()  # the job's weights stay while the job does
    host.remove_job("j")
    assert attachment.weights.name not in leftover_names()

    _, _, other = _hosted()
    claimed = other.attach_shared_memory("j", 1)
    Segment.open(claimed.grads.name, claimed.grads.size)  # the worker claims its gradient segment
    other.close()
    assert not {claimed.grads.name, claimed.weights.name} & set(leftover_names())


def test_placing_the_weights_keeps_the_optimizer_state_and_its_parameters():
    _, engine, _ = _hosted()
    shard = engine.shards.shards[0]
    engine.push(0, 0, [torch.ones_like(t) for t in engine.job.params.tensors])
    engine.push(1, 0, [torch.ones_like(t) for t in engine.job.params.tensors])
    state_before = {id(t): {k: v.clone() for k, v in shard.optimizer.state[t].items()} for t in shard.tensors}
    values = shard.weights[0].clone()
    new = [torch.empty_like(w) for w in shard.weights]
    shard.place_weights(new)
    assert shard.weights[0] is new[0] and torch.equal(new[0], values)
    for t in shard.tensors:
        assert t.untyped_storage().data_ptr() == new[0].untyped_storage().data_ptr()
        assert all(torch.equal(v, state_before[id(t)][k]) for k, v in shard.optimizer.state[t].items())
    with pytest.raises(ValueError, match="must match the layouts"):
        shard.place_weights([torch.empty(3)])


class _FakeCudart:
    """Stands in for ``torch.cuda.cudart()`` on a host without CUDA: records what is page-locked."""

    def __init__(self, refuse: bool = False) -> None:
        self.registered: dict[int, int] = {}
        self.refuse = refuse

    def cudaHostRegister(self, address: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        if self.refuse:
            return 801  # cudaErrorNotSupported
        assert address not in self.registered
        self.registered[address] = size
        return 0

    def cudaHostUnregister(self, address: int) -> int:  # noqa: N802 - CUDA's name
        return 0 if self.registered.pop(address, None) is not None else 713  # cudaErrorHostMemoryNotRegistered


def test_a_gpu_shard_page_locks_each_workers_segments_until_they_go(monkeypatch):
    cudart = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    _, engine, host = _hosted()
    monkeypatch.setattr(engine.shards.shards[0], "device", torch.device("cuda"))  # what attach decides by
    first, second = host.attach_shared_memory("j", 0), host.attach_shared_memory("j", 1)
    assert not first.shared_weights  # a GPU shard's workers get copies of the weights
    segments_of = {w: (a.grads, a.weights) for w, a in ((0, first), (1, second))}
    assert all(s.pinned for pair in segments_of.values() for s in pair)
    assert sorted(cudart.registered.values()) == sorted(s.size for pair in segments_of.values() for s in pair)
    assert sum(b.numel() for b in first.grad_buffers) * 4 <= first.grads.size
    host.shared_memory.detach("j", 0)
    assert not any(s.pinned for s in segments_of[0]) and len(cudart.registered) == 2
    host.close()
    assert not cudart.registered


def test_a_segment_cuda_will_not_page_lock_stays_pageable_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "cudart", lambda: _FakeCudart(refuse=True))
    segment = Segment.create(4096)
    try:
        assert not segment.pin() and not segment.pinned
        assert "cudaHostRegister failed (cudaError 801)" in caplog.text
        segment.unpin()  # not pinned: nothing to undo
    finally:
        segment.unlink()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_pinned_segment_copies_to_and_from_the_gpu():
    segment = Segment.create(4 * 1000)
    try:
        (host,) = segment.tensors([(1000, torch.float32)])
        assert not host.is_pinned()
        assert segment.pin() and segment.pin()  # again: still pinned, once
        assert host.is_pinned()  # CUDA copies it by DMA now
        host.copy_(torch.arange(1000.0))
        on_gpu = host.to("cuda")
        host.zero_()
        host.copy_(on_gpu * 2)
        assert torch.equal(host, torch.arange(1000.0) * 2)
        segment.unpin()
        assert not segment.pinned and not host.is_pinned()
    finally:
        segment.unpin()
        segment.unlink()
