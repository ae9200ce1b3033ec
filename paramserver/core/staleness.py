"""What a shard keeps for asynchronous steps: each pending push's version (the weights it was computed on), the
last applied one of each worker (so a retry is not applied twice), and each worker's clock (its applied updates)
for bounded staleness (SSP, Ho et al. 2013). Plain Python."""

from __future__ import annotations

from collections.abc import Collection

from paramserver.core.errors import FutureStepError


class AsyncLedger:
    def __init__(self, max_staleness: int | None) -> None:
        self.max_staleness = max_staleness
        self.based_on: dict[int, int] = {}  # worker -> the version its pending push was computed on
        self.applied: dict[int, int] = {}  # worker -> the version its last applied push was computed on
        self.clock: dict[int, int] = {}  # worker -> how many of its pushes were applied

    def accept(self, worker: int, step: int, version: int, shard_id: int) -> bool:
        """Whether a push of ``worker`` computed on version ``step`` is new (False: applied already). A push from
        the future is refused; one computed on older weights is welcome (that is what asynchronous means)."""
        if step > version:
            raise FutureStepError(f"shard {shard_id}: version {step} does not exist yet (now at {version})", version)
        return self.applied.get(worker, -1) < step

    def pending(self, worker: int, step: int) -> None:
        self.based_on[worker] = step

    def applied_update(self, contributors: Collection[int]) -> None:
        for worker in contributors:
            # a standby applies the primary's updates without the pushes: it knows no pending version
            self.applied[worker] = self.based_on.pop(worker, self.applied.get(worker, -1))
            self.clock[worker] = self.clock.get(worker, 0) + 1

    def joined(self, members: Collection[int]) -> None:
        """New members start level with the slowest member (else they would hold everyone back)."""
        known = [self.clock.get(m, 0) for m in members if m in self.clock]
        start = min(known) if known else 0
        for m in members:
            self.clock.setdefault(m, start)

    def ahead(self, worker: int, members: Collection[int]) -> bool:
        """Whether ``worker`` is more than ``max_staleness`` updates ahead of the slowest live member."""
        if self.max_staleness is None or not members:
            return False
        return self.clock.get(worker, 0) - min(self.clock.get(m, 0) for m in members) > self.max_staleness
