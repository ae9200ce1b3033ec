"""A shard takes the step's mean ahead, as soon as every member's push is in, and its report carries the norms:
the step's close then asks no shard for them. A close over other workers, a different clamp, or a member that
joins after the mean was taken gets the mean taken again, from the pushes the shard still holds."""

from __future__ import annotations

import torch

import paramserver as ps
import paramserver.core.sharding
from paramserver.core.shards import ShardGroup

W, SHARDS = 2, 2


def _engine(config: ps.JobConfig | None = None) -> ps.StepEngine:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    config = config or ps.JobConfig(num_workers=W, clip=ps.ClipConfig(max_norm=0.5))
    return ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, config=config, num_shards=SHARDS)


def _grads(engine: ps.StepEngine, step: int, rank: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in engine.job.params.params]


class CountsReduces(ShardGroup):
    """Records which shards each close asked for their norms."""

    def __init__(self, shards) -> None:
        super().__init__(shards)
        self.asked: list[list[int]] = []

    def reduce(self, step, norm_type, clip_value, contributors=None, known=None):
        self.asked.append([j for j in range(len(self.shards)) if j not in (known or {})])
        return super().reduce(step, norm_type, clip_value, contributors, known=known)


def _flat_grads(shard) -> list[torch.Tensor]:
    return [torch.full((layout.numel,), float(i + 1), dtype=layout.dtype) for i, layout in enumerate(shard.layouts)]


def test_a_synchronous_close_asks_no_shard_and_trains_as_before():
    engine, reference = _engine(), _engine()
    engine.shards = CountsReduces(engine.shards.shards)
    for step in range(4):
        for rank in range(W):
            engine.push(rank, step, _grads(engine, step, rank))
            reference.push(rank, step, _grads(reference, step, rank))
    assert engine.shards.asked == [[]] * 4  # every shard's report carried its norms
    # the same bits as closes that ask (the reference's reports carry norms too: compare with asking shards)
    asking = _engine()
    for shard in asking.shards.shards:
        shard.ahead_clip = None  # never reduces ahead
    for step in range(4):
        for rank in range(W):
            asking.push(rank, step, _grads(asking, step, rank))
    for a, b in zip(engine.parameters(), asking.parameters()):
        assert torch.equal(a, b)
    assert engine.state_dict()["optimizer"]["state"][0]["exp_avg"].equal(asking.state_dict()["optimizer"]["state"][0]["exp_avg"])


def test_a_close_over_other_workers_takes_the_mean_again():
    shard = _engine().shards.shards[0]
    for rank in range(W):
        shard.push(rank, 0, [g * (rank + 1) for g in _flat_grads(shard)])
    who, _ = shard.reduce_ahead()
    assert who == (0, 1) and shard.accumulator.contributors == (0, 1)
    assert [torch.equal(b, g * 1.5) for b, g in zip(shard.accumulator.sums, _flat_grads(shard))] == [True] * len(shard.layouts)
    shard.reduce(0, 2.0, None, (1,))  # the policy closed over worker 1 alone
    assert all(torch.equal(b, g * 2) for b, g in zip(shard.accumulator.sums, _flat_grads(shard)))
    assert shard.accumulator.contributors == (1,) and not shard.accumulator.kept


def test_another_clamp_takes_the_mean_again():
    shard = _engine().shards.shards[0]
    for rank in range(W):
        shard.push(rank, 0, _flat_grads(shard))
    shard.reduce_ahead()  # the job's clip_value: None
    norms = shard.reduce(0, 2.0, 0.5, (0, 1))
    assert all(float(b.max()) == 0.5 for b in shard.accumulator.sums)
    expected = [torch.linalg.vector_norm(torch.full(t.shape, 0.5)) for t in shard.tensors]
    assert all(torch.equal(n, e) for n, e in zip(norms, expected) if n is not None)


def _report(engine: ps.StepEngine, j: int, rank: int, step: int) -> None:
    """Worker ``rank``'s push reaches shard ``j`` alone (as over the wire), and the shard reports if it is ready."""
    shard = engine.shards.shards[j]
    shard.push(rank, step, ps.core.sharding.pack(engine.plan, j, _grads(engine, step, rank)))
    ready, _, version, holds = shard.ready_in()
    if ready:
        engine.shard_ready(j, version, None, holds, shard.reduce_ahead())


def test_a_member_that_joins_after_a_shard_reported_its_mean_is_in_the_step():
    engine = _engine(ps.JobConfig(num_workers=W, max_workers=3, clip=ps.ClipConfig(max_norm=0.5)))
    reference = _engine(ps.JobConfig(num_workers=3, clip=ps.ClipConfig(max_norm=0.5)))
    for rank in range(W):
        _report(engine, 0, rank, 0)  # shard 0 takes the mean of workers 0 and 1 ahead and reports it
    engine.join(2)
    for rank in range(3):
        _report(engine, 1, rank, 0)
    assert engine.step == 0  # shard 0 does not hold worker 2's push
    _report(engine, 0, 2, 0)  # its mean is taken again, over all three
    assert engine.step == 1
    for rank in range(3):
        reference.push(rank, 0, _grads(reference, 0, rank))
    for a, b in zip(engine.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_a_mean_taken_ahead_is_undone_by_a_push_that_comes_after_it():
    shard = _engine(ps.JobConfig(num_workers=W, max_workers=3)).shards.shards[0]
    for rank in range(W):
        shard.push(rank, 0, _flat_grads(shard))
    shard.reduce_ahead()
    assert shard.accumulator.kept
    shard.set_members({0, 1, 2})  # worker 2 joined: its push comes too
    shard.push(2, 0, [g * 4 for g in _flat_grads(shard)])
    assert not shard.accumulator.kept and shard.accumulator.contributors is None
    who, _ = shard.reduce_ahead()
    assert who == (0, 1, 2)
    assert all(torch.equal(b, g * 2) for b, g in zip(shard.accumulator.sums, _flat_grads(shard)))


def test_no_mean_is_taken_ahead_where_the_policy_chooses_the_workers():
    for config in (
        ps.JobConfig(num_workers=3, close_after=2),  # backup workers: the first 2 of 3
        ps.JobConfig(num_workers=W, mode="async"),
        ps.JobConfig(num_workers=W, deterministic=False),  # the sum is folded as pushes come: nothing to take again
    ):
        shard = _engine(config).shards.shards[0]
        for rank in range(config.num_workers):
            shard.push(rank, 0, _flat_grads(shard))
        assert shard.reduce_ahead() is None, config


def test_the_close_records_how_long_the_closing_report_waited_for_the_lock():
    """``seconds["queued"]``: a shard's report that closes the step while another call holds the job's lock (a
    checkpoint's copy at the step boundary) waits for it, and the step's result says how long."""
    import threading
    import time

    engine = _engine()
    engine.push(0, 0, _grads(engine, 0, 0))
    step = engine.push(1, 0, _grads(engine, 0, 1))
    assert step is not None and 0.0 <= step.seconds["queued"] < 0.1
    engine.push(0, 1, _grads(engine, 1, 0))
    # worker 1's push reaches the shards directly, as in the service; its reports come while the lock is held
    grads = _grads(engine, 1, 1)
    for j in range(SHARDS):
        engine.shards.push(j, 1, 1, paramserver.core.sharding.pack(engine.plan, j, grads, engine.shard_device), [])
    results = []

    def report(j: int) -> None:
        ready, _, version, holds = engine.shards.shards[j].ready_in()
        assert ready
        results.append(engine.shard_ready(j, version, None, holds, engine.shards.shards[j].reduce_ahead()))

    with engine._lock:  # both reports come while it is held: the step is ready, and waits
        reporters = [threading.Thread(target=report, args=(j,)) for j in range(SHARDS)]
        for reporter in reporters:
            reporter.start()
        time.sleep(0.3)
    for reporter in reporters:
        reporter.join(10)
        assert not reporter.is_alive()
    closed = [r for r in results if r is not None]
    assert [r.step for r in closed] == [1] and closed[0].seconds["queued"] >= 0.25
