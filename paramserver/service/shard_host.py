"""A shard's host: shard j of every job, as the Shard servicer reaches it. Nothing here knows gRPC or Ray."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from paramserver.core.coordinator import Coordinator
from paramserver.core.errors import JobNotFoundError
from paramserver.core.shard import Shard

MAX_WAIT_S = 300.0


class ShardHost:
    def __init__(self, shard_id: int, placement: str = "this process") -> None:
        self.shard_id = shard_id
        self.placement = placement
        self._shards: dict[str, Shard] = {}
        self._coordinators: dict[str, Coordinator] = {}
        self._locks: dict[str, threading.Lock] = {}

    def add_job(self, job: str, shard: Shard, coordinator: Any) -> None:
        """Host ``shard`` of ``job``; ``coordinator`` (anything with ``shard_ready(shard, step)``) may come
        later through ``set_coordinator`` when it lives elsewhere."""
        assert shard.shard_id == self.shard_id
        shard.placement = self.placement
        self._locks[job] = threading.Lock()
        self._coordinators[job] = coordinator
        self._shards[job] = shard

    def set_coordinator(self, job: str, coordinator: Any) -> None:
        self.shard(job)
        self._coordinators[job] = coordinator

    def remove_job(self, job: str) -> None:
        self._shards.pop(job, None)
        self._coordinators.pop(job, None)
        self._locks.pop(job, None)

    def shard(self, job: str) -> Shard:
        try:
            return self._shards[job]
        except KeyError:
            raise JobNotFoundError(f"no job {job!r} on shard {self.shard_id}") from None

    def push(self, job: str, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = ()) -> tuple[bool, int]:
        """Add a worker's gradients; when this shard then holds all of them, tell the coordinator, whose
        call closes the step if this was the last shard. Returns (applied, version after)."""
        shard = self.shard(job)
        with self._locks[job]:
            applied = shard.push(worker, step, grads, missing)
            ready = applied and shard.ready
        if ready:
            self._coordinators[job].shard_ready(self.shard_id, step)
        return applied, shard.version

    def initial_weights(self, job: str, buffers: Sequence[torch.Tensor]) -> None:
        shard = self.shard(job)
        with self._locks[job]:
            if shard.version != 0 or shard.accumulator.received:
                raise ValueError(f"shard {self.shard_id}: job {job!r} has begun training; initial weights come before any gradient")
            shard.load_weights(buffers)

    def pull(self, job: str, min_version: int, timeout: float | None) -> tuple[int, list[torch.Tensor]]:
        """Wait for ``min_version``, then the flat weights. They are the live buffers, and safe to stream:
        the next update needs this worker's next push, which comes after this pull."""
        shard = self.shard(job)
        version = shard.wait_for_version(min_version, MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S))
        return version, shard.weight_buffers()
