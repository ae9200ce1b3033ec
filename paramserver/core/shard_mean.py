"""A shard's mean of a step and its norms: taken when the coordinator asks (``reduce``), or ahead, as soon as every
member's push is in (``reduce_ahead``), and handed to a standby (``reduced`` / ``hold_reduced``). A part of
``Shard``, kept apart because it is one stage of the step: plain Python and torch."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from paramserver.core.clipping import tensor_norms
from paramserver.core.shard_copies import _locked


@dataclass(frozen=True)
class HeldMean:
    """A primary's mean of ``step`` (in weights generation ``generation``) as its standby holds it."""

    step: int
    generation: int
    means: list[torch.Tensor]
    with_grad: set[int]
    contributors: tuple[int, ...]


class ShardMean:
    """``Shard``'s aggregate stage (it mixes this in): every attribute used here is the shard's own."""

    @_locked
    def reduce(
        self, step: int, norm_type: float, clip_value: float | None = None, contributors: Collection[int] | None = None
    ) -> list[torch.Tensor | None]:
        """Turn the step's sum into the mean over ``contributors`` (the step policy's choice; default all W
        workers), clamped to ``clip_value`` if given, and return one norm per slice."""
        self.check_step(step)
        who = tuple(range(self.num_workers) if contributors is None else sorted(contributors))
        if self.accumulator.kept and (who != self.accumulator.contributors or self._ahead_clip != (norm_type, clip_value)):
            self.accumulator.undo()  # the mean taken ahead is not the one this close wants: take it again
        if self.accumulator.contributors is None:
            return self._take_mean(who, norm_type, clip_value)
        if who != self.accumulator.contributors:
            raise ValueError(f"shard {self.shard_id}: step {step}'s mean is over workers {list(self.accumulator.contributors)}, not {list(who)}")
        # a close that was interrupted (a shard died) runs again, or one the mean was taken ahead for: only the norms
        return self._norms(norm_type)

    @_locked
    def reduce_ahead(self) -> tuple[tuple[int, ...], list[torch.Tensor | None]] | None:
        """Synchronous steps, once every member's push is in: the mean over the pushes held and its norms, taken
        before the coordinator asks, so that the report of this shard can carry them and the step's close need
        not call ``reduce`` (the workers of the mean, the norms; None where the step cannot be reduced ahead).
        Every push stays held: a close over other workers (a member left or joined meanwhile) takes it again."""
        accumulator = self.accumulator
        if self.ahead_clip is None or self.ledger is not None or self.quorum is not None or not accumulator.deterministic:
            return None
        if not self.initialized or accumulator.contributors is not None or not self.ready:
            return None
        who = tuple(sorted(accumulator.received))
        norms = self._take_mean(who, *self.ahead_clip, keep=True)
        self._ahead_clip = self.ahead_clip
        return who, norms

    def _take_mean(self, who: tuple[int, ...], norm_type: float, clip_value: float | None, keep: bool = False) -> list[torch.Tensor | None]:
        self._restore_grad_views()
        means = self.accumulator.mean(who, keep=keep)
        # a parameter takes part if any contributor has a gradient for it (torch.optim skips grad None)
        self._with_grad = {i for w in who for i in self._params_here if i not in self._missing.get(w, ())}
        if clip_value is not None:
            for buf in means:
                buf.clamp_(min=-clip_value, max=clip_value)
        return self._norms(norm_type)

    def _norms(self, norm_type: float) -> list[torch.Tensor | None]:
        norms: list[torch.Tensor] = []
        start = 0
        for layout in self.layouts:
            grads = [t.grad for t in self.tensors[start : start + len(layout.slices)]]
            norms.extend(tensor_norms(grads, norm_type))
            start += len(layout.slices)
        # None for a slice whose parameter no worker sent a gradient for: it takes no part in the step
        return [n.cpu() if s.param in self._with_grad else None for s, n in zip(self.slices, norms)]

    @_locked
    def reduced(self, step: int) -> tuple[list[torch.Tensor], list[int], tuple[int, ...]]:
        """Copies of ``step``'s mean (after ``reduce``), the parameters it has gradients for, and its contributors:
        what a standby needs to apply the same update (``hold_reduced``)."""
        self.check_step(step)
        assert self.accumulator.contributors is not None, f"shard {self.shard_id}: no mean of step {step} taken yet"
        return [b.clone() for b in self.accumulator.sums], sorted(self._with_grad), self.accumulator.contributors

    @property
    def mean_taken(self) -> bool:
        """Whether the open step's mean was taken (``reduce`` or ``reduce_ahead``): ``reduced`` can copy it."""
        return self.accumulator.contributors is not None

    @_locked
    def hold_reduced(self, step: int, means: Sequence[torch.Tensor], with_grad: Collection[int], contributors: Collection[int]) -> None:
        """Take a primary's mean of ``step`` (``reduced``) as this shard's own, as if its workers had pushed
        here and it had reduced: the ``apply`` that follows is the primary's update, bit for bit. A standby still
        in its update of the step before keeps the mean for its ``apply`` of ``step``: the primary's workers
        push a step as soon as the primary's own update of the one before ended, which may be first."""
        self._check_buffers(means, "reduced gradients", exact_dtype=True)
        ahead = step == self.version + 1
        if not ahead:
            self.check_step(step)  # before any change: a refused mean leaves the shard as it was
        held = HeldMean(step, self.generation, list(means), set(with_grad), tuple(sorted(contributors)))
        self._take_held_ahead(self.version)  # one kept for the step now open is its mean: the next may come
        if ahead:
            self._held_ahead = held
        else:
            self._hold(held)

    def _take_held_ahead(self, step: int) -> None:
        """Before the update of ``step``: the mean kept for it while the update before ran becomes the step's."""
        held = self._held_ahead
        if held is None or held.step > step:
            return  # none, or kept for a later step
        self._held_ahead = None
        if (held.step, held.generation) == (step, self.generation):
            self._hold(held)

    def _hold(self, held: HeldMean) -> None:
        self.accumulator.reset()
        for dst, src in zip(self.accumulator.sums, held.means):
            dst.copy_(src)
        self.accumulator.received = set(held.contributors)
        self.accumulator.contributors = held.contributors
        self._with_grad = set(held.with_grad)
        self._restore_grad_views()
