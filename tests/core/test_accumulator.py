"""The step's sum keeps each worker's buffers until it folds them (deterministic mode) and then hands them back
through the ``release`` the push gave: once each, only after the fold, never while a kept mean may be taken again."""

from __future__ import annotations

import torch

from paramserver.core.aggregation import GradientAccumulator

N = 10


def _accumulator(deterministic: bool = True, carry_over: bool = False) -> tuple[GradientAccumulator, list[tuple[int, list[torch.Tensor]]]]:
    return GradientAccumulator([torch.zeros(N)], 3, deterministic, carry_over=carry_over), []


def _push(acc: GradientAccumulator, released: list, rank: int) -> list[torch.Tensor]:
    buffers = [torch.full((N,), float(rank + 1))]

    def release(bufs, rank=rank):
        released.append((rank, bufs))
        for b in bufs:
            b.fill_(float("nan"))  # reused by the next push at once: the mean must not read it after this

    acc.add(rank, buffers, release)
    return buffers


def test_a_mean_hands_each_folded_buffer_back_once_after_folding():
    acc, released = _accumulator()
    pushed = {rank: _push(acc, released, rank) for rank in (2, 0, 1)}
    [mean] = acc.mean()
    assert torch.equal(mean, torch.full((N,), 2.0))
    assert sorted(r for r, _ in released) == [0, 1, 2]
    assert all(bufs is pushed[r] for r, bufs in released)
    acc.reset()
    assert len(released) == 3


def test_a_kept_mean_holds_the_buffers_until_the_step_ends():
    acc, released = _accumulator()
    for rank in (0, 1, 2):
        _push(acc, released, rank)
    acc.mean(keep=True)
    assert released == []
    acc.undo()  # taken again over fewer workers: the one left out is dropped, the others folded
    [mean] = acc.mean([0, 1])
    assert torch.equal(mean, torch.full((N,), 1.5))
    assert sorted(r for r, _ in released) == [0, 1, 2]
    acc.reset()
    assert len(released) == 3


def test_a_step_ended_without_a_mean_hands_back_what_it_held():
    acc, released = _accumulator()
    _push(acc, released, 1)
    acc.reset()
    assert [r for r, _ in released] == [1]
    assert acc.received == set()


def test_pending_pushes_of_asynchronous_steps_stay_held():
    acc, released = _accumulator(carry_over=True)
    for rank in (0, 1):
        _push(acc, released, rank)
    acc.mean([0])
    acc.reset(keep_pending=True)
    assert [r for r, _ in released] == [0]  # worker 1's push waits for a later mean
    [mean] = acc.mean([1])
    assert torch.equal(mean, torch.full((N,), 2.0))
    assert [r for r, _ in released] == [0, 1]


def test_buffers_added_at_once_are_not_kept_nor_released():
    acc, released = _accumulator(deterministic=False)
    buffers = _push(acc, released, 0)
    assert not acc.holds(buffers)
    acc.mean([0])
    acc.reset()
    assert released == []
