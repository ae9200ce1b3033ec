"""A checkpoint's copy in one process: how long the copy of the job's state takes (weights and Adam's state of
the benchmark's MLP over 2 shards in this process), the time a step would wait for it if nothing overlapped
it; the write runs in the background meanwhile. What the end-to-end job waits is measured on it
(``service.e2e(..., checkpoint_every=K)``)."""

from __future__ import annotations

import tempfile

import torch

from benchmarks.common import make_mlp
from paramserver.checkpoint import Checkpointer
from paramserver.core.config import JobConfig
from paramserver.core.engine import StepEngine


def checkpoint_copy_ms(steps: int, num_shards: int = 2) -> float:
    """Mean over ``steps`` of the copy that a checkpoint at every step makes (the first one left out)."""
    model = make_mlp()
    engine = StepEngine(model.named_parameters(), "Adam", config=JobConfig(num_workers=1), num_shards=num_shards, lr=1e-3)
    grads = [torch.randn_like(p) for p in model.parameters()]
    copies = []
    with tempfile.TemporaryDirectory() as root:
        writer = Checkpointer(root, keep=1)
        for step in range(steps + 1):
            engine.push(0, step, grads)
            future = writer.save(engine, "bench")
            if step:  # the first one's Adam state is fresh: leave it out
                copies.append(writer.last_copy_s)
            future.result(120)  # one write at a time: the copy is measured, not the disk's contention
        writer.close()
    return 1000 * sum(copies) / len(copies)
