"""A shard's receive buffers are reused from step to step: the buffers of a push the shard keeps until the step's
close (deterministic mode) go back to the servicer's pool once the shard has folded them, so a push does not
allocate (and fault in) a buffer of the shard's size every step; and every step stays exact."""

from __future__ import annotations

import torch

from paramserver.core.config import ClipConfig
from paramserver.core.params import normalize_params
from paramserver.service.local import serve_local
from paramserver.wire import codec
from paramserver.wire.jobconfig import describe_job
from tests.helpers.reference import mean_of
from workers.client import ServiceClient

N = 5000  # floats in the model: over one 1 KiB chunk many times
SGD = {"lr": 0.1, "momentum": 0.9}
STEPS = 5


class RecordingPool(codec.BufferPool):
    made: list[RecordingPool] = []

    def __init__(self) -> None:
        super().__init__()
        RecordingPool.made.append(self)


def test_pushes_reuse_the_buffers_the_shard_kept_and_stay_exact(monkeypatch):
    monkeypatch.setattr(codec, "BufferPool", RecordingPool)
    RecordingPool.made = []
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(N, generator=gen)
    grads = [[torch.randn(N, generator=gen) for _ in range(2)] for _ in range(STEPS)]
    param = torch.nn.Parameter(initial.clone())
    reference = torch.optim.SGD([param], **SGD)

    allocations = []
    with serve_local(1, host="127.0.0.1", chunk_bytes=1024) as service:
        [pool] = RecordingPool.made  # the one shard's servicer
        workers = [ServiceClient(service.address, "reuse", timeout=30, chunk_bytes=1024) for _ in range(2)]
        try:
            weights = torch.zeros(N)
            workers[0].create_job(describe_job(normalize_params([("w", initial.clone())]), "SGD", SGD, num_workers=2, clip=ClipConfig()))
            workers[0].push_initial_weights([[initial.clone()]])
            workers[1].join_job(1)
            for step in range(STEPS):
                for rank in (0, 1):
                    workers[rank].push(rank, step, [[grads[step][rank]]])
                workers[0].pull(0, step + 1, destinations=[[weights]])
                allocations.append(pool.allocations)
                param.grad = mean_of([[g] for g in grads[step]])[0]
                reference.step()
                assert torch.equal(weights, param.detach()), f"step {step}"
        finally:
            for w in workers:
                w.close()
    # the initial weights come in a buffer of their own; the first step makes one for each worker's push (both are
    # kept until the close); later steps reuse those two
    assert allocations[0] == 3
    assert allocations == [allocations[0]] * STEPS, allocations
