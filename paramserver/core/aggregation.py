"""Aggregate: the sum of one step's gradients from W workers, then their mean.

The sum lives in preallocated flat buffers, one per dtype, and the optimizer's ``param.grad`` are views
into them, so the mean feeds the update without a copy. In deterministic mode contributions are folded in
rank order, holding a contribution that arrives early until the ranks before it are in; otherwise they are
added as they arrive and no worker's buffer is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    @property
    def complete(self) -> bool:
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

    def mean(self) -> list[torch.Tensor]:
        """Turn the complete sum into the mean, in place, and return the buffers."""
        assert self.complete
        if self.num_workers > 1:
            for total in self.sums:
                total.div_(self.num_workers)
        return self.sums

    def reset(self) -> None:
        self.received.clear()
        self._early.clear()
        self._folded = 0
        self._next_rank = 0
