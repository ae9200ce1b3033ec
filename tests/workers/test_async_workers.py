"""Asynchronous training through the service (serve_local, worker threads, one of them slow): no worker waits
for another, the final weights equal a replay of the server's order (which rank, based on which version) through
torch.optim, and with a staleness bound no worker ever gets more than the bound ahead. Bounded in time."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from paramserver.service.local import serve_local
from tests.helpers.reference import make_model, run_threads, worker_grads
from workers.remote_optimizer import RemoteOptimizer

W, UPDATES_PER_WORKER, SLOW_S = 3, 4, 0.15
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}


def _train(max_staleness: int | None) -> tuple[list, list[torch.nn.Module], list[int]]:
    service = serve_local(2)
    order: list = []
    lock = threading.Lock()

    def stepped(name: str, result) -> None:
        with lock:
            order.append(result)

    service.coordinator.step_hook = stepped
    models = [make_model() for _ in range(W)]
    based = [[] for _ in range(W)]

    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), "Adam", address=service.address, job="async", rank=rank,
                             num_workers=W, mode="async", max_staleness=max_staleness, timeout=30, **OPTIONS) as opt:
            for _ in range(UPDATES_PER_WORKER):
                version = opt.step_count  # the weights this gradient is computed on
                based[rank].append(version)
                for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), version, W)[rank]):
                    p.grad = g.clone()
                if rank == 2:
                    time.sleep(SLOW_S)
                opt.step()
                assert opt.step_count > version

    try:
        run_threads(W, worker, timeout=120)
    finally:
        service.shutdown()
    return order, models, [len(b) for b in based]


def _replay(order: list) -> list[torch.Tensor]:
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), **OPTIONS)
    for result in order:
        [rank] = result.contributors
        for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), result.based_on, W)[rank]):
            p.grad = g
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("max_staleness", [None, 1])
def test_async_workers_equal_a_replay_of_the_servers_order(max_staleness):
    order, models, counts = _train(max_staleness)
    assert counts == [UPDATES_PER_WORKER] * W
    assert [r.step for r in order] == list(range(W * UPDATES_PER_WORKER))  # every push was one update
    assert all(len(r.contributors) == 1 and r.staleness == r.step - r.based_on for r in order)
    clocks = dict.fromkeys(range(W), 0)
    for r in order:
        clocks[r.contributors[0]] += 1
        if max_staleness is not None:  # a worker pushes only within the bound: one update past it at most
            assert max(clocks.values()) - min(clocks.values()) <= max_staleness + 1, clocks
    final = _replay(order)
    last = order[-1].contributors[0]
    for a, b in zip(models[last].parameters(), final):  # the worker of the last update pulled the final weights
        assert torch.equal(a.detach(), b)
    if max_staleness is None:
        assert any(r.staleness > 0 for r in order)  # the slow worker's gradients were stale


def test_bounded_staleness_zero_through_the_service_trains_like_sync():
    service = serve_local(2)
    models = [make_model() for _ in range(W)]

    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), "Adam", address=service.address, job="ssp0", rank=rank, num_workers=W,
                             mode="async", max_staleness=0, timeout=30, **OPTIONS) as opt:
            for step in range(UPDATES_PER_WORKER):
                for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), step, W)[rank]):
                    p.grad = g.clone()
                if rank == 2:
                    time.sleep(SLOW_S)
                opt.step()
                assert opt.step_count == step + 1 and opt.last_step["contributors"] == [0, 1, 2]

    try:
        run_threads(W, worker, timeout=120)
    finally:
        service.shutdown()
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), **OPTIONS)
    for step in range(UPDATES_PER_WORKER):
        every = worker_grads(list(model.parameters()), step, W)
        for i, p in enumerate(model.parameters()):
            total = every[0][i].clone()
            for g in every[1:]:
                total.add_(g[i])
            p.grad = total.div_(W)
        opt.step()
    for m in models:
        for a, b in zip(m.parameters(), model.parameters()):
            assert torch.equal(a.detach(), b.detach())
