"""128 workers join a job before rank 0 has created it, on a front door with 8 threads: a JoinJob that waits
for rank 0 holds no thread of the coordinator's server, so rank 0's CreateJob does not queue behind them.

The workers are ``RemoteOptimizer``s in threads of this process; the service is ``serve_local(num_shards=2,
grpc_threads=8)``. Every step is exact: each worker's weights are bitwise equal to local torch.optim.SGD on the
mean of the 128 gradients (summed in rank order). Every wait has a deadline.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from paramserver.service.local import serve_local
from tests.helpers.reference import Reference, worker_grads
from tests.helpers.training import wait_until
from workers.remote_optimizer import RemoteOptimizer

W = 128  # workers
THREADS = 8  # the front door's threads: far fewer than the joins that wait at once
STEPS = 3
SGD = {"lr": 0.1, "momentum": 0.9}
T = 30.0  # the deadline of every call and every wait, in seconds


def test_128_workers_join_before_rank_0_creates_the_job():
    torch.manual_seed(0)
    base = nn.Linear(8, 4)
    models = [copy.deepcopy(base) for _ in range(W)]
    for model in models[1:]:  # joiners start from the server's weights, not their own
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    reference = Reference(copy.deepcopy(base).parameters(), torch.optim.SGD, SGD)

    job = "many-workers"
    opts: list[RemoteOptimizer | None] = [None] * W
    with serve_local(num_shards=2, grpc_threads=THREADS) as service:
        coordinator = service.coordinator

        def start(rank: int) -> None:
            opts[rank] = RemoteOptimizer(
                models[rank].named_parameters(), "SGD", address=service.address, job=job, num_workers=W, rank=rank,
                timeout=T, join_timeout=T, **SGD,
            )

        pool = ThreadPoolExecutor(W, thread_name_prefix="worker")
        try:
            joins = [pool.submit(start, rank) for rank in range(1, W)]
            # every joiner waits at the front door before the job exists (a join that failed ends this early)
            wait_until(lambda: coordinator.waiting_joins(job) == W - 1 or any(f.done() for f in joins), f"{W - 1} waiting joins", T)
            assert not any(f.done() for f in joins) and coordinator.waiting_joins(job) == W - 1
            started = time.perf_counter()
            pool.submit(start, 0).result(T)  # rank 0 creates the job and pushes its initial weights
            for f in joins:
                f.result(T)
            joined = time.perf_counter() - started
            assert coordinator.waiting_joins(job) == 0
            assert coordinator.status(job)["members"] == list(range(W))

            for step in range(STEPS):
                grads = worker_grads(reference.params, step, W)

                def train(rank: int, grads: list[list[torch.Tensor]]) -> None:
                    opt = opts[rank]
                    assert opt is not None
                    opt.zero_grad()
                    for p, g in zip(models[rank].parameters(), grads[rank]):
                        p.grad = g.clone()
                    opt.step()

                for f in [pool.submit(train, rank, grads) for rank in range(W)]:
                    f.result(T)
                reference.step(grads)
            print(f"{W} workers joined {joined:.2f}s after rank 0 started; {STEPS} steps")
            assert coordinator.status(job)["version"] == STEPS
            for rank, model in enumerate(models):
                for got, want in zip(model.parameters(), reference.params, strict=True):
                    assert torch.equal(got.detach(), want.detach()), f"worker {rank}'s weights differ from torch.optim's"
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            for opt in opts:
                if opt is not None:
                    opt.close()
