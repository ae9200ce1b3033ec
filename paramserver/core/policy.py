"""Step policies: the rule that decides when a step closes and over which workers' gradients it averages.

The coordinator owns one policy and asks it each time a shard reports; the order of the stages that run once
a step closes stays written in one place (``Coordinator._close_step``). A policy only decides; it calls
nothing. Plain Python: no torch, gRPC or Ray.

    sync        every worker pushed on every shard; the mean over all W (``SyncPolicy``, today's rule)
    later:      backup workers (the first N pushes), leases (live members only), async, bounded staleness
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class CloseStep:
    """A policy's decision: ``step`` closes now, and its mean is over the gradients of ``contributors``.

    Every shard averages over the same contributors (it checks that it holds exactly their pushes), so the
    divisor of the mean is decided here, once, not by each shard's idea of how many workers there are.
    """

    step: int
    contributors: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.contributors:
            raise ValueError(f"step {self.step} cannot close over no workers")
        if list(self.contributors) != sorted(set(self.contributors)) or self.contributors[0] < 0:
            raise ValueError(f"contributors must be distinct worker ranks in ascending order, got {self.contributors}")

    @property
    def divisor(self) -> int:
        """What the sum of the step's gradients is divided by."""
        return len(self.contributors)


@runtime_checkable
class StepPolicy(Protocol):
    """Decides when a step closes and what it averages. Called under the coordinator's lock, one call at a time."""

    def on_shard_ready(self, shard: int, step: int) -> CloseStep | None:
        """Shard ``shard`` reported what it holds for the open ``step``: the decision to close it now, or
        None to wait. A policy that decides to close forgets its record of the step, so the step's close
        runs once even if the close then fails."""
        ...

    def reset(self) -> None:
        """Forget every record of open steps (a state was loaded: the shards dropped their partial pushes)."""
        ...


class SyncPolicy:
    """Synchronous steps: a step closes when every one of the ``num_shards`` shards holds all ``num_workers``
    workers' gradients, and averages over all of them (``torch.nn.parallel.DistributedDataParallel``'s mean)."""

    def __init__(self, num_shards: int, num_workers: int) -> None:
        if num_shards < 1 or num_workers < 1:
            raise ValueError(f"a sync policy needs at least one shard and one worker, got {num_shards} and {num_workers}")
        self.num_shards = num_shards
        self.num_workers = num_workers
        self._ready: dict[int, set[int]] = {}  # step -> shards that hold every worker's gradients

    def on_shard_ready(self, shard: int, step: int) -> CloseStep | None:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards}), got {shard!r}")
        ready = self._ready.setdefault(step, set())
        ready.add(shard)
        if len(ready) < self.num_shards:
            return None
        del self._ready[step]
        return CloseStep(step, tuple(range(self.num_workers)))

    def reset(self) -> None:
        self._ready.clear()

    def waiting(self, step: int) -> list[int]:
        """The shards whose report ``step`` still waits for."""
        ready = self._ready.get(step, set())
        return [j for j in range(self.num_shards) if j not in ready]
