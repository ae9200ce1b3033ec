"""A worker as a separate process for the wire parity suite: no Ray, only the gRPC client.

    python -m tests.helpers.wire_worker ADDRESS JOB RANK NUM_WORKERS STEPS OUT.pt [TRANSPORT]

Uses the same gradients as ``tests.helpers.reference.worker_grads`` and writes its final weights to OUT.pt.
"""

from __future__ import annotations

import sys

import torch

from tests.helpers.reference import make_model, worker_grads
from workers.remote_optimizer import RemoteOptimizer

# The job every process of the test uses; the test's reference must match it.
OPTIMIZER = "Adam"
KWARGS = {"lr": 0.01, "weight_decay": 0.01}
CLIP = 0.5
SCHEDULER = ("ExponentialLR", {"gamma": 0.9})


def main(address: str, job: str, rank: int, num_workers: int, steps: int, out: str, transport: str = "auto") -> None:
    model = make_model()
    params = list(model.parameters())
    with RemoteOptimizer(
        model.named_parameters(), OPTIMIZER, address=address, job=job, num_workers=num_workers, rank=rank,
        clip_grad_norm=CLIP, scheduler=SCHEDULER[0], scheduler_kwargs=SCHEDULER[1], timeout=30.0, transport=transport, **KWARGS,
    ) as opt:
        assert transport == "auto" or opt.transport == transport
        for t in range(steps):
            opt.zero_grad()
            for p, g in zip(params, worker_grads(params, t, num_workers)[rank]):
                p.grad = g
            opt.step()
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, out)


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5], *a[6:7])
