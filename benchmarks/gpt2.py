"""The GPT-2 of ``workers.demos.gpt2`` as a benchmark model beside the MLP: steps/s through the service (W worker
actors, S shard actors, the default transport) and in one local process with the same recipe."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from benchmarks.common import ray_session
from workers.demos import gpt2

WARMUP_STEPS = 2


def _worker(rank: int, num_workers: int, address: str, steps: int, threads: int) -> float:
    from workers.remote_optimizer import RemoteOptimizer

    torch.set_num_threads(threads)
    data = gpt2.stdlib_text(200_000)
    model = gpt2.make_gpt2()
    name, kwargs = gpt2.schedule(2, steps + WARMUP_STEPS)
    with RemoteOptimizer(gpt2.param_groups(model), torch.optim.AdamW, address=address, job="bench-gpt2", num_workers=num_workers,
                         rank=rank, clip_grad_norm=1.0, scheduler=name, scheduler_kwargs=kwargs, push_during_backward=True, timeout=300,
                         **{k: v for k, v in gpt2.RECIPE.items() if k != "weight_decay"}) as opt:
        start = 0.0
        for step in range(steps + WARMUP_STEPS):
            if step == WARMUP_STEPS:
                start = time.perf_counter()
            opt.zero_grad()
            gpt2.loss_of(model, gpt2.batch(data, step, rank)).backward()
            opt.step()
        return steps / (time.perf_counter() - start)


def service_steps_per_s(num_workers: int, num_shards: int, steps: int) -> float:
    """Rank 0's steps/s after warmup, through ``paramserver.serve`` on the caller's (or an embedded) Ray."""
    import paramserver
    from workers.launcher import run_workers

    threads = max(1, (os.cpu_count() or 1) // num_workers)
    with ray_session(), paramserver.serve(num_shards, cpus_per_shard=0.01) as service:
        config: dict[str, Any] = {"address": service.address, "steps": steps, "threads": threads}
        return run_workers(_worker, num_workers, config=config, num_cpus_per_worker=0.01, timeout=900)[0]


def local_steps_per_s(steps: int) -> float:
    """The same recipe with local torch.optim in this process (one worker's batch per step)."""
    data = gpt2.stdlib_text(200_000)
    model = gpt2.make_gpt2()
    optimizer = torch.optim.AdamW(gpt2.param_groups(model), **{k: v for k, v in gpt2.RECIPE.items() if k != "weight_decay"})
    scheduler = gpt2.local_schedule(optimizer, 2, steps + WARMUP_STEPS)
    start = 0.0
    for step in range(steps + WARMUP_STEPS):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        optimizer.zero_grad()
        gpt2.loss_of(model, gpt2.batch(data, step, 0)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    return steps / (time.perf_counter() - start)
