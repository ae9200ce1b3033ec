"""Aggregate: the sum of one step's gradients from up to W workers, then their mean over the contributors.

The sum lives in preallocated flat buffers, one per dtype, and the optimizer's ``param.grad`` are views
into them, so the mean feeds the update without a copy. In deterministic mode contributions are folded in
rank order, holding a contribution that arrives early until the ranks before it are in; otherwise they are
added as they arrive and no worker's buffer is kept.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


class GradientAccumulator:
    def __init__(self, sums: Sequence[torch.Tensor], num_workers: int, deterministic: bool) -> None:
        self.sums = list(sums)
        self.num_workers = num_workers
        self.deterministic = deterministic
        self.received: set[int] = set()
        self._folded = 0  # how many contributions are in the sums
        self._next_rank = 0
        self._early: dict[int, Sequence[torch.Tensor]] = {}
        self.contributors: tuple[int, ...] | None = None  # set once the sum became the mean of these workers

    @property
    def complete(self) -> bool:
        """Every one of the W workers' contributions is in the sum."""
        return self._folded == self.num_workers

    def add(self, worker: int, buffers: Sequence[torch.Tensor]) -> None:
        """Add one worker's flat gradients; the accumulator may keep ``buffers`` until it can fold them."""
        assert worker not in self.received and 0 <= worker < self.num_workers
        if not self.deterministic:
            self._fold(buffers)
            self.received.add(worker)
            return
        self.received.add(worker)
        self._early[worker] = buffers
        while self._next_rank in self._early:
            self._fold(self._early.pop(self._next_rank))
            self._next_rank += 1

    def holds(self, buffers: Sequence[torch.Tensor]) -> bool:
        """Whether ``buffers`` wait here to be folded in (an early contribution in deterministic mode)."""
        return any(held is buffers for held in self._early.values())

    def _fold(self, buffers: Sequence[torch.Tensor]) -> None:
        first = self._folded == 0
        for total, g in zip(self.sums, buffers, strict=True):
            # The first contribution is copied, not added to zeros, so one worker's mean is its gradient.
            total.copy_(g) if first else total.add_(g)
        self._folded += 1

    def mean(self, contributors: Collection[int] | None = None) -> list[torch.Tensor]:
        """Turn the sum into the mean over ``contributors`` (default: all W workers), in place, and return the
        buffers. The step policy chose the contributors; they must be exactly the workers that pushed."""
        assert self.contributors is None, "the mean of this step was taken already"
        who = frozenset(range(self.num_workers) if contributors is None else contributors)
        if who != self.received:
            raise ValueError(f"the mean is over workers {sorted(who)} but workers {sorted(self.received)} pushed")
        assert who, "a mean over no workers"
        # In deterministic mode a contribution whose lower ranks did not push is still held: fold the rest
        # in rank order (with all W in, nothing is held and this is a no-op).
        for rank in sorted(self._early):
            self._fold(self._early.pop(rank))
        assert self._folded == len(who)
        if len(who) > 1:
            for total in self.sums:
                total.div_(len(who))
        self.contributors = tuple(sorted(who))
        return self.sums

    def reset(self) -> None:
        self.received.clear()
        self._early.clear()
        self._folded = 0
        self._next_rank = 0
        self.contributors = None
