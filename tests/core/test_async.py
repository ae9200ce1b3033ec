"""Asynchronous steps (``mode="async"``) and bounded staleness without Ray: every push is an update of its own,
clipped by its own norm, the scheduler stepping once per update; one worker equals local torch.optim bitwise,
several equal a replay of the server's order through torch.optim; a retry is never applied twice; the
staleness bound holds back a worker that is too far ahead."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.errors import FutureStepError

CLIP = 0.5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def _engine(num_workers: int, **options: object) -> tuple[torch.nn.Module, ps.StepEngine]:
    model = _model()
    config = ps.JobConfig(num_workers=num_workers, mode="async", clip=ps.ClipConfig(max_norm=CLIP), **options)  # type: ignore[arg-type]
    engine = ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, num_shards=2, config=config,
                           scheduler=ps.SchedulerSpec("StepLR", {"step_size": 2, "gamma": 0.5}))
    return model, engine


def _grads(version: int, rank: int, model: torch.nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * version + rank)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def _replay(order: list[tuple[int, int]]) -> list[torch.Tensor]:
    """torch.optim over the server's order of (rank, based_on): each update one worker's gradient, clipped."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for rank, based_on in order:
        for p, g in zip(model.parameters(), _grads(based_on, rank, model)):
            p.grad = g
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        sched.step()
    return [p.detach() for p in model.parameters()]


def test_one_async_worker_equals_local_torch_optim():
    model, engine = _engine(1)
    for version in range(5):
        result = engine.push(0, version, _grads(version, 0, model))
        assert result is not None and (result.contributors, result.based_on, result.staleness) == ((0,), version, 0)
    for mine, theirs in zip(engine.parameters(), _replay([(0, v) for v in range(5)])):
        assert torch.equal(mine, theirs)


def test_several_async_workers_equal_a_replay_of_the_servers_order():
    model, engine = _engine(3)
    order = []
    # each worker pushes on the version it last pulled: worker 2 is slow and always computes on old weights
    pulled = {0: 0, 1: 0, 2: 0}
    for rank in (0, 1, 0, 2, 1, 0, 0, 2, 1):
        result = engine.push(rank, pulled[rank], _grads(pulled[rank], rank, model))
        assert result is not None and result.contributors == (rank,)
        assert result.staleness == result.step - pulled[rank]
        order.append((rank, result.based_on))
        pulled[rank] = engine.version
    assert order[3] == (2, 0)  # worker 2's first update was computed on version 0, applied at version 3
    for mine, theirs in zip(engine.parameters(), _replay(order)):
        assert torch.equal(mine, theirs)


def test_a_pending_push_waits_for_every_shard_and_a_retry_is_not_applied_twice():
    from paramserver.core.sharding import pack

    model, engine = _engine(2)
    grads = _grads(0, 1, model)
    engine.shards.push(0, 1, 0, pack(engine.plan, 0, grads))  # on shard 0 only: no update yet
    assert engine.step == 0 and engine.shards.shards[0].ready_in()[3] == {1: 0}
    result = engine.push(1, 0, grads)  # now on both (shard 0's push is a retry of the pending one)
    assert result is not None and engine.step == 1
    assert engine.push(1, 0, grads) is None and engine.step == 1  # applied already
    with pytest.raises(FutureStepError):  # a version that does not exist yet
        engine.push(0, 5, grads)


@pytest.mark.parametrize("staleness_lr", [False, True])
def test_a_push_closed_by_a_leave_before_its_reports_keeps_the_version_it_was_computed_on(staleness_lr):
    # on a service the shards report a push from a thread of their own: a leave can close the step before
    from paramserver.core.sharding import pack

    model, engine = _engine(3, staleness_lr=staleness_lr)
    for version in range(2):  # worker 0 makes two updates
        engine.push(0, version, _grads(version, 0, model))
    stale = _grads(0, 1, model)  # worker 1 computed on version 0; its push is on both shards, not yet reported
    for j in range(engine.plan.num_shards):
        engine.shards.push(j, 1, 0, pack(engine.plan, j, stale))
    lr = engine.schedule.hyperparameters()[0]["lr"]
    engine.leave(2)  # the membership changed: the coordinator asks the shards what they hold, and closes
    result = engine.last_result
    assert (result.step, result.contributors, result.based_on, result.staleness) == (2, (1,), 0, 2)
    assert engine.shards.shards[0].last_record()["update"]["hyperparameters"][0]["lr"] == (lr / 2 if staleness_lr else lr)


def test_the_staleness_bound_holds_a_worker_that_is_too_far_ahead():
    model, engine = _engine(2, max_staleness=1)
    shard = engine.shards.shards[0]
    for version in range(2):  # worker 0 runs ahead by two updates
        engine.push(0, engine.version, _grads(version, 0, model))
    assert not shard.reached(engine.version, None, worker=0)  # two ahead of worker 1: it waits
    assert shard.reached(engine.version, None, worker=1)
    engine.push(1, 0, _grads(0, 1, model))
    assert shard.reached(engine.version, None, worker=0)  # one ahead now
    engine.leave(1)
    engine.push(0, engine.version, _grads(5, 0, model))
    engine.push(0, engine.version, _grads(6, 0, model))
    assert shard.reached(engine.version, None, worker=0)  # a member that left holds nobody back


def test_staleness_aware_learning_rate_divides_by_the_staleness():
    _, engine = _engine(2, staleness_lr=True)
    lr = engine.schedule.hyperparameters()[0]["lr"]
    assert engine._hyperparameters(4)[0]["lr"] == lr / 4 and engine._hyperparameters(0)[0]["lr"] == lr


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mode": "eventually"}, "mode"),
        ({"max_staleness": 1}, "need"),
        ({"mode": "async", "close_after": 1}, "close_after"),
        ({"mode": "async", "deterministic": False}, "deterministic"),
        ({"mode": "async", "max_staleness": -1}, "max_staleness"),
    ],
)
def test_bad_async_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ps.JobConfig(**options)  # type: ignore[arg-type]


def test_bounded_staleness_zero_is_the_same_training_as_sync():
    runs = []
    for options in ({"mode": "async", "max_staleness": 0}, {}):
        model = _model()
        config = ps.JobConfig(num_workers=3, clip=ps.ClipConfig(max_norm=CLIP), **options)  # type: ignore[arg-type]
        engine = ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, num_shards=2, config=config)
        assert config.step_mode == "sync"
        for version in range(4):
            for rank in (2, 0, 1):  # any arrival order
                engine.push(rank, version, _grads(version, rank, model))
        assert engine.last_result.contributors == (0, 1, 2)
        runs.append(engine.parameters())
    for a, b in zip(*runs):
        assert torch.equal(a, b)
