"""Driving workers in tests: a bounded poll, and workers that resume a job from its ``step_count``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from tests.helpers.reference import run_threads, worker_grads
from workers.remote_optimizer import RemoteOptimizer


def wait_until(condition: Callable[[], bool], what: str, timeout: float, poll: float = 0.01) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def resume_workers(
    address: str, models: list[torch.nn.Module], until: int, starts: list[int], *, timeout: float, **options: Any
) -> None:
    """Every worker (a thread, rank = its model's index) joins the job with a RemoteOptimizer of ``options``
    and trains ``range(opt.step_count, until)`` on its reference gradients; ``starts[rank]`` records where."""
    num_workers = len(models)

    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), address=address, rank=rank, num_workers=num_workers,
                             timeout=timeout, join_timeout=timeout, **options) as opt:
            starts[rank] = opt.step_count
            for step in range(opt.step_count, until):
                grads = worker_grads(list(model.parameters()), step, num_workers)[rank]
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
                opt.step()

    run_threads(num_workers, worker, timeout=4 * timeout)
