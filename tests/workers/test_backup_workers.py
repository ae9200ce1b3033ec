"""Backup workers through the service (serve_local, worker threads): with ``close_after=2`` of 3 workers and one
of them slow, every step closes on two pushes, the slow worker's loop sees no error (a late step just pulls the
new weights), and the weights equal torch.optim over the mean of each step's contributors. Bounded in time."""

from __future__ import annotations

import threading
import time

import torch

from paramserver.service.local import serve_local
from tests.helpers.reference import make_model, mean_of, run_threads, worker_grads
from workers.remote_optimizer import RemoteOptimizer

W, TOTAL, SLOW_S = 3, 6, 0.4
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}


def test_a_slow_worker_is_left_out_and_its_loop_goes_on():
    service = serve_local(2)
    contributors: dict[int, tuple[int, ...]] = {}
    lock = threading.Lock()

    def stepped(name: str, result) -> None:
        with lock:
            contributors[result.step] = result.contributors

    service.coordinator.step_hook = stepped
    models = [make_model() for _ in range(W)]
    steps_taken = [0] * W

    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), "Adam", address=service.address, job="backup", rank=rank,
                             num_workers=W, close_after=2, timeout=30, **OPTIONS) as opt:
            while opt.step_count < TOTAL:
                step = opt.step_count
                for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), step, W)[rank]):
                    p.grad = g.clone()
                if rank == 2:
                    time.sleep(SLOW_S)  # a straggler
                opt.step()
                steps_taken[rank] += 1
                assert opt.step_count > step

    try:
        run_threads(W, worker, timeout=120)
    finally:
        service.shutdown()
    assert sorted(contributors) == list(range(TOTAL))
    assert all(len(c) >= 2 for c in contributors.values())
    assert sum(2 in c for c in contributors.values()) < TOTAL  # the straggler was left out of some steps
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), **OPTIONS)
    for step in range(TOTAL):
        every = worker_grads(list(model.parameters()), step, W)
        for p, g in zip(model.parameters(), mean_of([every[r] for r in contributors[step]])):
            p.grad = g
        opt.step()
    for m in models[:2]:  # the fast workers pulled the last step's weights
        for a, b in zip(m.parameters(), model.parameters()):
            assert torch.equal(a.detach(), b.detach())
