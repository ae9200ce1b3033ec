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


def train_and_compare(address: str, job: str, *, num_workers: int = 2, steps: int = 6, timeout: float = 30.0, **options: Any) -> list[list[str]]:
    """``num_workers`` threads train a job with Adam (clipped) through RemoteOptimizers of ``options`` and
    must end bitwise equal to local torch.optim on the mean gradients. Returns each worker's ``client.routes``."""
    import copy

    import paramserver as ps
    from tests.helpers.reference import Reference, make_model

    base = make_model()
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    ref = Reference(copy.deepcopy(base).named_parameters(), torch.optim.Adam, {"lr": 0.01}, clip=ps.ClipConfig(max_norm=0.5))
    opts: list[RemoteOptimizer | None] = [None] * num_workers

    def create(rank: int) -> None:
        opts[rank] = RemoteOptimizer(models[rank].named_parameters(), "Adam", lr=0.01, clip_grad_norm=0.5, address=address, job=job,
                                     num_workers=num_workers, rank=rank, timeout=timeout, join_timeout=timeout, **options)

    try:
        run_threads(num_workers, create, timeout=4 * timeout)
        for t in range(steps):
            grads = worker_grads(ref.params, t, num_workers)

            def step(rank: int) -> None:
                for p, g in zip(models[rank].parameters(), grads[rank]):
                    p.grad = g.clone()
                opts[rank].step()  # type: ignore[union-attr]

            run_threads(num_workers, step, timeout=4 * timeout)
            ref.step(grads)
        for m in models:
            for got, want in zip(m.parameters(), ref.params):
                assert torch.equal(got, want.detach())
        return [list(o.client.routes) for o in opts if o is not None]
    finally:
        for o in opts:
            if o is not None:
                o.close()
