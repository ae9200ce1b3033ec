"""The servicer's pool of receive buffers: reuse, and only its own buffers, each lent to one push at a time."""

from __future__ import annotations

import gc

import torch

from paramserver.wire.codec import BufferPool


def test_a_buffer_given_back_is_the_next_one_taken():
    pool = BufferPool()
    first = pool.take(100, torch.float32)
    pool.give_back([first])
    assert pool.take(100, torch.float32) is first
    assert pool.take(100, torch.bfloat16) is not first  # another dtype: a buffer of its own
    assert pool.allocations == 2


def test_a_buffer_given_back_twice_is_lent_once():
    pool = BufferPool()
    buf = pool.take(100, torch.float32)
    pool.give_back([buf])
    pool.give_back([buf])
    a, b = pool.take(100, torch.float32), pool.take(100, torch.float32)
    assert a is buf and b is not buf


def test_tensors_the_pool_did_not_lend_are_ignored():
    pool = BufferPool()
    foreign = torch.zeros(100)  # e.g. a view of a worker's shared memory
    pool.give_back([foreign])
    assert pool.take(100, torch.float32) is not foreign


def test_a_buffer_dropped_instead_of_given_back_leaves_nothing_behind():
    pool = BufferPool()
    buf = pool.take(100, torch.float32)
    assert len(pool._lent) == 1
    del buf
    gc.collect()
    assert pool._lent == {}
