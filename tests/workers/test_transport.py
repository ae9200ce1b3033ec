"""Which transport a worker picks, and what it falls back to: shared memory only where the shard's host
identity is the worker's and the segments open; gRPC otherwise (an error under transport="shared_memory")."""

from __future__ import annotations

import logging
import os

import pytest
import torch

import workers.client
import workers.shared_memory
from paramserver.dataplane import segments
from paramserver.service.local import serve_local
from tests.helpers.reference import make_model
from workers.remote_optimizer import RemoteOptimizer

pytestmark = pytest.mark.skipif(not segments.available(), reason="no /dev/shm on this host")


@pytest.fixture(scope="module")
def service():
    with serve_local(2) as svc:
        yield svc


def _optimizer(service, job: str, **options) -> RemoteOptimizer:
    return RemoteOptimizer(make_model().named_parameters(), "SGD", lr=0.1, address=service.address, job=job, timeout=10, **options)


def _attached(service, job: str) -> list[list[int]]:
    return [host.shared_memory.workers(job) for host in service.coordinator.fleet.hosts]


def test_auto_on_one_host_moves_the_gradients_and_weights_through_shared_memory(service, caplog):
    with caplog.at_level(logging.INFO, logger="paramserver"), _optimizer(service, "auto") as opt:
        assert opt.transport == "shared_memory"
        assert _attached(service, "auto") == [[0], [0]]
        assert "moves shard 1's bytes through shared memory (shared weights)" in caplog.text
        opt.zero_grad()
        segments_of = {b.untyped_storage().data_ptr() for shared in opt.client.shared for b in shared.grads + shared.weights}
        for p in opt._tensors:  # every param.grad and every weight lives in a segment
            assert {p.grad.untyped_storage().data_ptr(), p.untyped_storage().data_ptr()} <= segments_of
    assert _attached(service, "auto") == [[], []]  # closing let go of them


def test_another_host_keeps_to_grpc_and_says_why(service, monkeypatch, caplog):
    monkeypatch.setattr(workers.client, "host_identity", lambda: "elsewhere/boot/1")
    with caplog.at_level(logging.INFO, logger="paramserver"), _optimizer(service, "elsewhere") as opt:
        assert opt.transport == "grpc"
        assert _attached(service, "elsewhere") == [[], []]  # the shards made nothing
        assert "over gRPC: the shard is on host" in caplog.text
        assert service.coordinator.status("elsewhere")["transports"] == {0: "grpc"}
    with pytest.raises(ConnectionError, match="transport='shared_memory', but shard 0 cannot share memory"):
        _optimizer(service, "elsewhere-forced", transport="shared_memory")


def test_segments_that_do_not_open_here_fall_back_to_grpc_and_the_shard_lets_go_of_them(service, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("not this container's /dev/shm")

    monkeypatch.setattr(workers.shared_memory.Segment, "open", refuse)
    with _optimizer(service, "unopenable") as opt:
        assert opt.transport == "grpc"
        assert _attached(service, "unopenable") == [[], []]
        mine = {n for n in segments.leftover_names() if n.startswith(f"{segments.PREFIX}{os.getpid()}-")}  # the shards are in this process
        assert not mine - {n for h in service.coordinator.fleet.hosts for n in _job_weights(h)}


def _job_weights(host) -> list[str]:
    return [segment.name for segment, _ in host.shared_memory._job_weights.values()]


def test_grpc_when_asked(service):
    with _optimizer(service, "asked", transport="grpc") as opt:
        assert opt.transport == "grpc" and _attached(service, "asked") == [[], []]
    with pytest.raises(ValueError, match="transport must be one of"):
        _optimizer(service, "typo", transport="shm")


def test_a_worker_that_leaves_and_rejoins_gets_new_segments_and_trains_on(service):
    model = make_model()
    with RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=service.address, job="rejoin", timeout=10) as opt:
        opt.leave()
        assert _attached(service, "rejoin") == [[], []]
        assert opt.rejoin() == 0
        assert opt.transport == "shared_memory" and _attached(service, "rejoin") == [[0], [0]]
        before = [p.detach().clone() for p in model.parameters()]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        for p, b in zip(model.parameters(), before):
            assert torch.allclose(p.detach(), b - 0.1)


class _Counted:
    """A shard's gRPC method that counts its calls (both ways of calling it)."""

    def __init__(self, method) -> None:  # noqa: ANN001
        self.method, self.calls = method, 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.calls += 1
        return self.method(*args, **kwargs)

    def future(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        self.calls += 1
        return self.method.future(*args, **kwargs)


@pytest.mark.parametrize("push_during_backward", [False, True])
def test_through_shared_memory_a_step_is_one_call_per_shard(service, push_during_backward):
    """The push asks to pull too (``SharedPush.pull_min_version``): no PullShared of its own, the same weights."""
    model, reference = make_model(), make_model()
    expected = torch.optim.SGD(reference.parameters(), lr=0.1)
    with RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=service.address, job=f"one-call-{push_during_backward}",
                         timeout=10, push_during_backward=push_during_backward) as opt:
        assert opt.transport == "shared_memory"
        pushes = [_Counted(s.PushShared) for s in opt.client.shards]
        pulls = [_Counted(s.PullShared) for s in opt.client.shards]
        for s, push, pull in zip(opt.client.shards, pushes, pulls):
            s.PushShared, s.PullShared = push, pull
        for step in range(3):
            for m, optimizer in ((model, opt), (reference, expected)):
                optimizer.zero_grad()
                torch.manual_seed(step)
                m(torch.randn(4, 6)).square().sum().backward()
                optimizer.step()
        assert opt.step_count == 3
        assert [p.calls for p in pushes] == [3, 3] and [p.calls for p in pulls] == [0, 0]
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.detach(), q.detach())
