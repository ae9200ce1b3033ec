"""Aggregate: the sum of one step's gradients from up to W workers, then their mean over the contributors.

The sum lives in preallocated flat buffers, one per dtype, and the optimizer's ``param.grad`` are views
into them, so the mean feeds the update without a copy. In deterministic mode every contribution is held
until the step closes and then folded in rank order, so the result depends neither on arrival order nor on
who else pushed: a worker dropped from the job in the middle of its push is simply left out. Otherwise
contributions are added as they arrive and no worker's buffer is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from paramserver.core.blocked import divide_, mean_in_blocks


class GradientAccumulator:
    def __init__(self, sums: Sequence[torch.Tensor], num_workers: int, deterministic: bool, carry_over: bool = False) -> None:
        self.sums = list(sums)
        self.num_workers = num_workers
        self.deterministic = deterministic
        # asynchronous steps: a push that is not in this step's mean stays for a later one (else it is dropped)
        self.carry_over = carry_over
        self.received: set[int] = set()
        self._folded = 0  # how many contributions are in the sums
        self._early: dict[int, Sequence[torch.Tensor]] = {}  # deterministic mode: each contribution, until the mean
        self._release: dict[int, Callable[[Sequence[torch.Tensor]], None]] = {}  # who takes a held contribution back
        self.contributors: tuple[int, ...] | None = None  # set once the sum became the mean of these workers
        # the mean was taken with every contribution kept (``mean(keep=True)``): ``undo`` can take it again
        self.kept = False

    def holds_all(self, ranks: Collection[int]) -> bool:
        """Whether the contributions of all of ``ranks`` (at least one) are in."""
        return bool(ranks) and set(ranks) <= self.received

    def add(self, worker: int, buffers: Sequence[torch.Tensor], release: Callable[[Sequence[torch.Tensor]], None] | None = None) -> None:
        """Add one worker's flat gradients; the accumulator may keep ``buffers`` until the step closes.
        ``release``: called with ``buffers`` once a kept contribution is folded or dropped, so that the receiver
        can reuse them (not called for buffers not kept, see ``holds``)."""
        assert worker not in self.received and 0 <= worker < self.num_workers
        self.received.add(worker)
        if self.deterministic:
            self._early[worker] = buffers
            if release is not None:
                self._release[worker] = release
        else:
            self._fold(buffers)

    def _let_go(self, ranks: Collection[int]) -> None:
        """Forget the kept contributions of ``ranks``, handing their buffers back to whoever pushed them."""
        for rank in list(ranks):
            buffers = self._early.pop(rank)
            release = self._release.pop(rank, None)
            if release is not None:
                release(buffers)

    def holds(self, buffers: Sequence[torch.Tensor]) -> bool:
        """Whether ``buffers`` wait here to be folded in (deterministic mode)."""
        return any(held is buffers for held in self._early.values())

    def _fold(self, buffers: Sequence[torch.Tensor]) -> None:
        first = self._folded == 0
        for total, g in zip(self.sums, buffers, strict=True):
            # The first contribution is copied, not added to zeros, so one worker's mean is its gradient.
            total.copy_(g) if first else total.add_(g)
        self._folded += 1

    def mean(self, contributors: Collection[int] | None = None, keep: bool = False) -> list[torch.Tensor]:
        """Turn the sum into the mean over ``contributors`` (default: all W workers), in place, and return the
        buffers. The step policy chose the contributors; each must have pushed. Others' pushes are left out
        (deterministic mode; added already otherwise, which is an error). ``keep`` (deterministic mode): every
        contribution stays held until ``reset``, so that ``undo`` can take a mean over other workers."""
        assert self.contributors is None, "the mean of this step was taken already"
        who = frozenset(range(self.num_workers) if contributors is None else contributors)
        assert who, "a mean over no workers"
        if not who <= self.received:
            raise ValueError(f"the mean is over workers {sorted(who)} but only workers {sorted(self.received)} pushed")
        extra = self.received - who
        if extra and not self.deterministic:
            raise ValueError(
                f"workers {sorted(extra)} pushed part of this step and left; with deterministic=False their gradients "
                "are added already and cannot be left out"
            )
        held = [rank for rank in sorted(self._early) if rank in who]  # in rank order, whatever the arrival order
        assert not keep or (self.deterministic and self._folded == 0), "only a mean of held contributions can be kept"
        if self._folded == 0 and held:
            # all of the mean is here: fold and divide one cache-sized block at a time (the same ops, the same bits)
            mean_in_blocks(self.sums, [self._early[rank] for rank in held], len(who))
            self._folded = len(held)
            if not keep:
                self._let_go(held)
        else:
            for rank in held:
                self._fold(self._early[rank])
                self._let_go([rank])
            for total in self.sums:
                divide_(total, len(who))
        if not self.carry_over and not keep:
            self._let_go(self._early)  # what is left was pushed by workers outside this mean
        assert self._folded == len(who)
        self.received = set(who) | set(self._early)
        self.contributors = tuple(sorted(who))
        self.kept = keep
        return self.sums

    def undo(self) -> None:
        """Forget a mean taken with ``keep``: every contribution is held again, to be folded by the next ``mean``."""
        assert self.kept, "only a kept mean can be taken again"
        self._folded = 0
        self.contributors = None
        self.kept = False

    def reset(self, keep_pending: bool = False) -> None:
        """Start the next step; ``keep_pending``: the pushes not in the last mean stay (asynchronous steps)."""
        if not keep_pending:
            self._let_go(self._early)
        self.received = set(self._early)
        self._folded = 0
        self.contributors = None
        self.kept = False
