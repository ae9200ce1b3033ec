"""The checkpoint stall: how long a step is held for the copy of the job's state (weights and Adam's state of
the benchmark's MLP over 2 shards in this process); the write runs in the background meanwhile."""

from __future__ import annotations

import tempfile

import torch

from benchmarks.common import make_mlp
from paramserver.checkpoint import Checkpointer
from paramserver.core.config import JobConfig
from paramserver.core.engine import StepEngine


def checkpoint_stall_ms(steps: int, num_shards: int = 2) -> float:
    """Mean over ``steps`` of the copy that a checkpoint at every step makes the step wait for."""
    model = make_mlp()
    engine = StepEngine(model.named_parameters(), "Adam", config=JobConfig(num_workers=1), num_shards=num_shards, lr=1e-3)
    grads = [torch.randn_like(p) for p in model.parameters()]
    stalls = []
    with tempfile.TemporaryDirectory() as root:
        writer = Checkpointer(root, keep=1)
        for step in range(steps + 1):
            engine.push(0, step, grads)
            future = writer.save(engine, "bench")
            if step:  # the first one's Adam state is fresh: leave it out
                stalls.append(writer.last_copy_s)
            future.result(120)  # one write at a time: the copy is measured, not the disk's contention
        writer.close()
    return 1000 * sum(stalls) / len(stalls)
