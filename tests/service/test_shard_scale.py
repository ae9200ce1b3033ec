"""One shard server serves 128 workers at once: 128 pulls wait on it for the same step while 128 push
streams are open on it, and every step is exact (bitwise equal to local torch.optim on the mean gradient).

The workers are threads of this process, each with its own ``ServiceClient``; the shard is the asyncio
server of ``serve_local(num_shards=1)``. Every wait has a deadline.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from paramserver.core.config import ClipConfig
from paramserver.core.params import normalize_params
from paramserver.service.local import serve_local
from paramserver.wire import codec
from paramserver.wire.jobconfig import describe_job
from tests.helpers.reference import mean_of
from tests.helpers.training import wait_until
from workers.client import ServiceClient

W = 128  # workers, all on one shard
STEPS = 6  # steps 0 to 2 push through streams held open, the others through ServiceClient.push
N = 300  # floats in the model
SGD = {"lr": 0.1, "momentum": 0.9}
T = 30.0  # the deadline of every call and every wait, in seconds


def test_one_shard_serves_128_concurrent_workers():
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(N, generator=gen)
    grads = [[torch.randn(N, generator=gen) * (1 + w % 7) for w in range(W)] for _ in range(STEPS)]

    # the reference: torch.optim.SGD on the mean of the workers' gradients (summed in rank order)
    param = torch.nn.Parameter(initial.clone())
    reference = torch.optim.SGD([param], **SGD)
    expected = []
    for step in range(STEPS):
        (param.grad,) = mean_of([[g] for g in grads[step]])
        reference.step()
        expected.append(param.detach().clone())

    job = "scale-128"
    config = describe_job(normalize_params([("w", initial)]), "SGD", SGD, num_workers=W, clip=ClipConfig(), deterministic=True)
    with serve_local(1) as service:
        host = service.coordinator.fleet.hosts[0]  # the shard's host, to see the pulls that wait on it
        clients = [ServiceClient(service.address, job, timeout=T) for _ in range(W)]
        # a thread per waiting pull and per push: on the client side, threads are what this test spends
        pool = ThreadPoolExecutor(2 * W, thread_name_prefix="worker")
        try:
            clients[0].create_job(config)
            clients[0].push_initial_weights([[initial]])
            for f in [pool.submit(clients[r].join_job, r, T) for r in range(1, W)]:
                f.result(T)

            def held_open_push(rank: int, step: int, barrier: threading.Barrier):
                def stream():
                    yield from codec.encode([grads[step][rank]], job=job, worker=rank, step=step, shard=0)
                    barrier.wait()  # every worker's stream is open on the shard before any of them ends

                return clients[rank].shards[0].PushGradients(stream(), timeout=T)

            started = time.perf_counter()
            for step in range(STEPS):
                pulls = [pool.submit(clients[r].pull, r, step + 1, T) for r in range(W)]
                wait_until(lambda: host.waiting_pulls(job) == W, f"{W} pulls waiting for step {step + 1}", T, poll=0.005)
                if step < 3:
                    barrier = threading.Barrier(W, timeout=T)
                    pushes = [pool.submit(held_open_push, r, step, barrier) for r in range(W)]
                else:
                    pushes = [pool.submit(lambda r, s: clients[r].push(r, s, [[grads[s][r]]])[0], r, step) for r in range(W)]
                replies = [p.result(T) for p in pushes]
                assert not any(reply.already_applied for reply in replies)
                for rank, pull in enumerate(pulls):
                    ((version, (weights,)),) = pull.result(T)
                    assert version == step + 1
                    assert torch.equal(weights, expected[step]), f"step {step}: worker {rank}'s weights differ from torch.optim's"
                assert host.waiting_pulls(job) == 0
            elapsed = time.perf_counter() - started
            print(f"{W} workers on one shard: {STEPS / elapsed:.2f} steps/s")
            assert service.coordinator.status(job)["version"] == STEPS
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            for client in clients:
                client.close()
