"""Data-parallel workers on Ray, launched with one call.

    results = run_workers(train_fn, num_workers=2, config={"address": service.address, ...})

Each of the W workers is a Ray actor that calls ``train_fn(rank=r, num_workers=W, **config)`` and returns
what it returns; the driver gets the W results in rank order. ``on_wait`` is called about every half second
while they run (the main job updates its progress bar there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class WorkerProcess:
    """What runs inside a worker actor (Ray wraps it at spawn time)."""

    def __init__(self, rank: int, num_workers: int) -> None:
        self.rank = rank
        self.num_workers = num_workers

    def run(self, train_fn: Callable[..., Any], config: dict[str, Any]) -> Any:
        return train_fn(rank=self.rank, num_workers=self.num_workers, **config)


def run_workers(
    train_fn: Callable[..., Any],
    num_workers: int,
    *,
    config: dict[str, Any] | None = None,
    num_cpus_per_worker: float = 0.5,
    num_gpus_per_worker: float = 0.0,
    timeout: float = 3600.0,
    on_wait: Callable[[], None] | None = None,
) -> list[Any]:
    import ray

    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if not ray.is_initialized():
        raise RuntimeError("run_workers needs Ray: start the service with paramserver.serve() or call ray.init() first")
    actor_cls = ray.remote(num_cpus=num_cpus_per_worker, num_gpus=num_gpus_per_worker)(WorkerProcess)
    actors = [actor_cls.remote(rank, num_workers) for rank in range(num_workers)]
    try:
        pending = [a.run.remote(train_fn, dict(config or {})) for a in actors]
        deadline = time.monotonic() + timeout
        remaining = list(pending)
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(remaining)} of {num_workers} workers still running after {timeout:.0f}s")
            _, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=0.5)
            if on_wait is not None:
                on_wait()
        return ray.get(pending, timeout=60)
    finally:
        for a in actors:
            ray.kill(a)
