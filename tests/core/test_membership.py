"""Membership without Ray or a network: leases, leave, join mid-run, min_workers, what each step averaged, and
exactness (the mean over the reported contributors, in rank order). The clock is a fake: nothing sleeps."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.errors import NotAMemberError
from paramserver.core.membership import Membership
from paramserver.core.sharding import pack


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))


def _engine(model: torch.nn.Module, deterministic: bool = True, **config: object) -> tuple[ps.StepEngine, Clock]:
    engine = ps.StepEngine(
        model.named_parameters(), "Adam", lr=0.1, num_shards=2,
        config=ps.JobConfig(deterministic=deterministic, clip=ps.ClipConfig(max_norm=1.0), lease_timeout=3.0, **config),  # type: ignore[arg-type]
    )
    clock = Clock()
    engine.membership.clock = clock
    for rank in engine.membership.live:
        engine.membership.renew(rank)  # leases on the fake clock
    return engine, clock


def _grads(step: int, rank: int, model: torch.nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


class Reference:
    """torch.optim over the mean of each step's contributors, summed in rank order, clipped globally."""

    def __init__(self) -> None:
        self.model = _model()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.1)

    def step(self, step: int, contributors: list[int]) -> None:
        grads = [_grads(step, r, self.model) for r in contributors]
        for i, p in enumerate(self.model.parameters()):
            total = grads[0][i].clone()
            for g in grads[1:]:
                total.add_(g[i])
            p.grad = total.div_(len(contributors)) if len(contributors) > 1 else total
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def assert_equal(self, engine: ps.StepEngine) -> None:
        for mine, theirs in zip(engine.parameters(), self.model.parameters()):
            assert torch.equal(mine, theirs.detach())


def test_a_member_that_leaves_mid_step_is_not_waited_for():
    model = _model()
    engine, _ = _engine(model, num_workers=3)
    ref = Reference()
    for rank in (0, 1):
        assert engine.push(rank, 0, _grads(0, rank, model)) is None
    assert engine.leave(2)
    assert engine.step == 1 and engine.last_result.contributors == (0, 1)
    ref.step(0, [0, 1])
    ref.assert_equal(engine)
    with pytest.raises(NotAMemberError, match="not a member"):
        engine.push(2, 1, _grads(1, 2, model))
    assert [(c.rank, c.reason, c.step) for c in engine.membership.changes] == [(2, "left", 0)]
    assert not engine.leave(2)  # leaving twice changes nothing


@pytest.mark.parametrize("deterministic", [True, False])
def test_an_expired_lease_drops_the_member_and_the_step_closes_over_the_others(deterministic):
    model = _model()
    engine, clock = _engine(model, deterministic, num_workers=3)
    ref = Reference()
    for step in range(2):
        for rank in range(3):
            engine.push(rank, step, _grads(step, rank, model))
        ref.step(step, [0, 1, 2])
    clock.now = 2.0
    for rank in (0, 1):
        engine.renew(rank)
        engine.push(rank, 2, _grads(2, rank, model))
    assert engine.step == 2 and engine.expire_leases() == []
    clock.now = 3.5  # worker 2's lease (renewed at 0) is over; the others' run to 5
    assert engine.expire_leases() == [2]
    assert engine.step == 3 and engine.last_result.contributors == (0, 1)
    ref.step(2, [0, 1])
    ref.assert_equal(engine)
    with pytest.raises(NotAMemberError):
        engine.renew(2)
    assert engine.membership.changes[-1].reason == "lease expired"


def test_a_member_dropped_in_the_middle_of_its_push_is_left_out_exactly():
    model = _model()
    engine, clock = _engine(model, num_workers=3)
    ref = Reference()
    grads = _grads(0, 2, model)
    engine.shards.push(0, 2, 0, pack(engine.plan, 0, grads))  # worker 2 reached shard 0 only, then died
    for rank in (0, 1):
        engine.push(rank, 0, _grads(0, rank, model))
    assert engine.step == 0  # it waits for worker 2
    clock.now = 3.0
    for rank in (0, 1):
        engine.renew(rank)
    assert engine.expire_leases() == [2]
    assert engine.last_result.contributors == (0, 1)
    ref.step(0, [0, 1])
    ref.assert_equal(engine)


def test_a_worker_joins_mid_run_at_the_open_step():
    model = _model()
    engine, _ = _engine(model, num_workers=2, max_workers=3)
    ref = Reference()
    for step in range(2):
        for rank in range(2):
            engine.push(rank, step, _grads(step, rank, model))
        ref.step(step, [0, 1])
    with pytest.raises(NotAMemberError):
        engine.push(2, 2, _grads(2, 2, model))  # not a member before it joins
    assert engine.join(2) and not engine.join(2)
    for rank in (0, 1):
        assert engine.push(rank, 2, _grads(2, rank, model)) is None  # the step waits for the joiner now
    result = engine.push(2, 2, _grads(2, 2, model))
    assert result is not None and result.contributors == (0, 1, 2)
    ref.step(2, [0, 1, 2])
    ref.assert_equal(engine)
    with pytest.raises(ValueError, match=r"worker must be in \[0, 3\)"):
        engine.join(3)


def test_below_min_workers_the_steps_wait_for_a_join():
    model = _model()
    engine, _ = _engine(model, num_workers=2, min_workers=2)
    ref = Reference()
    engine.leave(1)
    assert engine.push(0, 0, _grads(0, 0, model)) is None
    assert engine.step == 0  # one member, two needed
    engine.join(1)
    result = engine.push(1, 0, _grads(0, 1, model))
    assert result is not None and result.contributors == (0, 1)
    ref.step(0, [0, 1])
    ref.assert_equal(engine)


def test_membership_renews_and_records_its_changes():
    clock = Clock()
    members = Membership(range(2), limit=3, lease_timeout=1.0, clock=clock)
    assert members.live == {0, 1} and 0 in members and 2 not in members
    clock.now = 0.5
    members.renew(0)
    clock.now = 1.2
    assert members.expire(step=4) == [1]
    assert members.join(2, step=4) and members.live == {0, 2}
    assert [(c.rank, c.reason, c.step) for c in members.changes] == [(1, "lease expired", 4), (2, "joined", 4)]
    with pytest.raises(ValueError):
        members.renew(5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_workers": 2, "max_workers": 1}, "max_workers"),
        ({"min_workers": 0}, "min_workers"),
        ({"num_workers": 2, "min_workers": 3}, "min_workers"),
        ({"lease_timeout": 0}, "lease_timeout"),
        ({"lease_timeout": True}, "lease_timeout"),
    ],
)
def test_bad_membership_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        ps.JobConfig(**options)  # type: ignore[arg-type]
