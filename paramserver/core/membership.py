"""A job's membership: which worker ranks are live, each on a lease that its calls renew.

A rank is a member from its join (the ranks below ``num_workers`` are members from the job's creation: the
first steps wait for them as they always did) until it leaves or its lease runs out; then the steps no longer
wait for it, and its pushes are refused until it joins again. Every change is recorded with its reason.
Plain Python: the clock is injectable, so tests need not sleep.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from paramserver.core.errors import NotAMemberError

MAX_CHANGES = 100  # the changes status reports


@dataclass(frozen=True)
class MembershipChange:
    rank: int
    reason: str  # "joined", "left" or "lease expired"
    step: int  # the step that was open when it happened


class Membership:
    def __init__(self, ranks: Iterable[int], limit: int, lease_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit  # ranks are in [0, limit)
        self.lease_timeout = lease_timeout
        self.clock = clock
        now = clock()
        self._leases: dict[int, float] = {rank: now + lease_timeout for rank in ranks}  # rank -> when it ends
        self.changes: deque[MembershipChange] = deque(maxlen=MAX_CHANGES)

    @property
    def live(self) -> frozenset[int]:
        return frozenset(self._leases)

    def __contains__(self, rank: object) -> bool:
        return rank in self._leases

    def check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < self.limit:
            raise ValueError(f"worker must be in [0, {self.limit}), got {rank!r}")

    def join(self, rank: int, step: int) -> bool:
        """``rank`` is a member (again), its lease fresh; True if it was not one."""
        self.check_rank(rank)
        new = rank not in self._leases
        self._leases[rank] = self.clock() + self.lease_timeout
        if new:
            self.changes.append(MembershipChange(rank, "joined", step))
        return new

    def renew(self, rank: int) -> None:
        """A call of ``rank``: its lease starts over. A rank that is not a member is told so."""
        self.check_rank(rank)
        if rank not in self._leases:
            raise NotAMemberError(f"worker {rank} is not a member of the job (its lease expired, it left, or it never joined); join again")
        self._leases[rank] = self.clock() + self.lease_timeout

    def leave(self, rank: int, step: int, reason: str = "left") -> bool:
        """``rank`` is no member any more; True if it was one."""
        self.check_rank(rank)
        if self._leases.pop(rank, None) is None:
            return False
        self.changes.append(MembershipChange(rank, reason, step))
        return True

    def expire(self, step: int) -> list[int]:
        """Drop every member whose lease has run out; returns their ranks."""
        now = self.clock()
        gone = sorted(rank for rank, end in self._leases.items() if end <= now)
        for rank in gone:
            self.leave(rank, step, "lease expired")
        return gone
