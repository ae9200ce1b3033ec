"""Step policies: the rule that decides when a step closes and over which workers' gradients it averages.

The coordinator owns one policy and asks it each time a shard reports; the order of the stages that run once
a step closes stays written in one place (``Coordinator._close_step``). A policy only decides; it calls
nothing. Plain Python: no torch, gRPC or Ray.

    sync        every live member pushed on every shard; the mean over them (``SyncPolicy``, the default)
    backup      the first N members' pushes on every shard; the mean over them (``BackupWorkersPolicy``)
    async       each push on every shard is an update of its own (``AsyncPolicy``; the staleness bound is the
                shards' rule for pulls, ``paramserver.core.staleness``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from paramserver.core.config import JobConfig


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

    asynchronous: bool
    """Whether a shard's report may be of an older version than the open step (its pushes then wait for later
    steps), rather than refused as stale."""

    def on_shard_ready(self, shard: int, step: int, holds: frozenset[int], members: frozenset[int]) -> CloseStep | None:
        """Shard ``shard`` reported that it holds the pushes of ``holds`` for the open ``step``; ``members`` are the
        job's live members now. The decision to close the step, or None to wait. A policy that decides to close
        forgets its record of the step, so the step's close runs once even if the close then fails."""
        ...

    def after_close(self, step: int) -> CloseStep | None:
        """Step ``step`` is open after a close: whether what the reports hold already closes it too."""
        ...

    def reset(self) -> None:
        """Forget every record of open steps (a state was loaded, or the membership changed: the coordinator asks
        every shard again)."""
        ...


class SyncPolicy:
    """Synchronous steps: a step closes when every one of the ``num_shards`` shards holds the pushes of every
    live member (at least ``min_workers`` of them), and averages over the workers whose pushes every shard
    holds (the members, and a worker dropped after it pushed everywhere): with all W workers live, the mean of
    ``torch.nn.parallel.DistributedDataParallel``."""

    asynchronous = False

    def __init__(self, num_shards: int, min_workers: int = 1) -> None:
        if num_shards < 1 or min_workers < 1:
            raise ValueError(f"a sync policy needs at least one shard and one worker, got {num_shards} and {min_workers}")
        self.num_shards = num_shards
        self.min_workers = min_workers
        self._holds: dict[int, dict[int, frozenset[int]]] = {}  # step -> shard -> the workers it holds

    def on_shard_ready(self, shard: int, step: int, holds: frozenset[int], members: frozenset[int]) -> CloseStep | None:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards}), got {shard!r}")
        record = self._holds.setdefault(step, {})
        record[shard] = frozenset(holds)
        if len(record) < self.num_shards or len(members) < self.min_workers:
            return None
        everywhere = frozenset.intersection(*record.values())
        if not self._enough(everywhere, members):
            return None
        del self._holds[step]
        return CloseStep(step, tuple(sorted(everywhere)))

    def _enough(self, everywhere: frozenset[int], members: frozenset[int]) -> bool:
        """Whether the pushes that every shard holds close the step: every member's."""
        return members <= everywhere

    def after_close(self, step: int) -> CloseStep | None:
        return None  # every push of a closed step was in it, or is refused as stale

    def reset(self) -> None:
        self._holds.clear()

    def waiting(self, step: int) -> list[int]:
        """The shards whose report ``step`` still waits for."""
        record = self._holds.get(step, {})
        return [j for j in range(self.num_shards) if j not in record]


class BackupWorkersPolicy(SyncPolicy):
    """Backup workers (Chen et al. 2016, "Revisiting distributed synchronous SGD"): a step closes as soon as every
    shard holds the pushes of ``close_after`` members (of all of them when fewer are live) and averages over the
    workers whose pushes every shard holds; the slowest workers' gradients for it are not applied."""

    def __init__(self, num_shards: int, close_after: int, min_workers: int = 1) -> None:
        super().__init__(num_shards, min_workers)
        if close_after < 1:
            raise ValueError(f"close_after must be >= 1, got {close_after}")
        self.close_after = close_after

    def _enough(self, everywhere: frozenset[int], members: frozenset[int]) -> bool:
        return len(everywhere & members) >= min(self.close_after, len(members))


class AsyncPolicy:
    """Asynchronous steps: as soon as every shard holds a worker's push, it is one update of its own (the lowest
    rank first when several are complete), on that worker's gradient alone."""

    asynchronous = True

    def __init__(self, num_shards: int) -> None:
        if num_shards < 1:
            raise ValueError(f"an async policy needs at least one shard, got {num_shards}")
        self.num_shards = num_shards
        self._holds: dict[int, set[int]] = {}  # shard -> the workers whose pushes it holds, as of its last report

    def on_shard_ready(self, shard: int, step: int, holds: frozenset[int], members: frozenset[int]) -> CloseStep | None:
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard must be in [0, {self.num_shards}), got {shard!r}")
        self._holds[shard] = set(holds)
        return self.after_close(step)

    def after_close(self, step: int) -> CloseStep | None:
        if len(self._holds) < self.num_shards:
            return None
        everywhere = set.intersection(*self._holds.values())
        if not everywhere:
            return None
        worker = min(everywhere)
        for held in self._holds.values():
            held.discard(worker)  # its push is consumed by this update
        return CloseStep(step, (worker,))

    def reset(self) -> None:
        self._holds.clear()


def policy_for(config: JobConfig, num_shards: int) -> StepPolicy:
    """The step policy a job's configuration names."""
    if config.step_mode == "async":
        return AsyncPolicy(num_shards)
    if config.close_after is not None:
        return BackupWorkersPolicy(num_shards, config.close_after, config.min_workers)
    return SyncPolicy(num_shards, config.min_workers)


def quorum(config: JobConfig) -> int | None:
    """How many members' pushes a shard needs before it reports the step (None: every member's)."""
    return config.close_after
