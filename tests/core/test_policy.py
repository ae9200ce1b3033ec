"""Step policies: the sync rule's decisions, and the seam (a policy that closes a step early, averaging over the
workers it names, plugs into the coordinator without touching the order of the stages). No Ray, no network."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.coordinator import Coordinator
from paramserver.core.errors import StaleStepError
from paramserver.core.policy import CloseStep, StepPolicy, SyncPolicy
from paramserver.core.sharding import pack
from paramserver.core.shards import ShardGroup

ALL = frozenset(range(4))


def test_sync_policy_closes_when_every_shard_holds_every_member_and_averages_over_them():
    policy = SyncPolicy(num_shards=3)
    assert isinstance(policy, StepPolicy)
    assert policy.on_shard_ready(1, 0, ALL, ALL) is None
    assert policy.on_shard_ready(1, 0, ALL, ALL) is None  # a repeated report counts once
    assert policy.waiting(0) == [0, 2]
    assert policy.on_shard_ready(0, 0, ALL, ALL) is None
    close = policy.on_shard_ready(2, 0, ALL, ALL)
    assert close == CloseStep(0, (0, 1, 2, 3)) and close.divisor == 4
    # the decision forgets the step: it closes once
    assert policy.waiting(0) == [0, 1, 2]
    assert policy.on_shard_ready(0, 1, ALL, ALL) is None


def test_sync_policy_averages_over_the_workers_every_shard_holds():
    policy = SyncPolicy(num_shards=2)
    members = frozenset({0, 2})  # worker 1 left, worker 3 pushed to shard 0 only and then its lease ran out
    assert policy.on_shard_ready(0, 5, frozenset({0, 1, 2, 3}), members) is None
    assert policy.on_shard_ready(1, 5, frozenset({0, 1, 2}), members) == CloseStep(5, (0, 1, 2))
    # a shard that does not hold every member's push does not close the step
    assert policy.on_shard_ready(0, 6, frozenset({0}), members) is None
    assert policy.on_shard_ready(1, 6, frozenset({0, 2}), members) is None
    assert policy.on_shard_ready(0, 6, frozenset({0, 2}), members) == CloseStep(6, (0, 2))


def test_sync_policy_waits_for_min_workers():
    policy = SyncPolicy(num_shards=1, min_workers=2)
    assert policy.on_shard_ready(0, 0, frozenset({0}), frozenset({0})) is None
    assert policy.on_shard_ready(0, 0, frozenset({0, 1}), frozenset({0, 1})) == CloseStep(0, (0, 1))


def test_sync_policy_with_one_shard_closes_on_its_report():
    assert SyncPolicy(1).on_shard_ready(0, 7, frozenset({0}), frozenset({0})) == CloseStep(7, (0,))


def test_sync_policy_refuses_bad_shards_and_sizes():
    policy = SyncPolicy(2)
    for shard in (-1, 2):
        with pytest.raises(ValueError, match="shard must be in"):
            policy.on_shard_ready(shard, 0, ALL, ALL)
    with pytest.raises(ValueError):
        SyncPolicy(0)
    with pytest.raises(ValueError):
        SyncPolicy(2, min_workers=0)


@pytest.mark.parametrize("contributors", [(), (1, 0), (0, 0), (-1, 0)])
def test_a_close_needs_distinct_ascending_workers(contributors):
    with pytest.raises(ValueError):
        CloseStep(0, contributors)


class ClosesOver:
    """A fake policy: the step closes once every shard reported, over the workers given (not all W)."""

    asynchronous = False

    def after_close(self, step: int) -> CloseStep | None:
        return None

    def __init__(self, num_shards: int, contributors: tuple[int, ...]) -> None:
        self.num_shards = num_shards
        self.contributors = contributors
        self.reports: list[tuple[int, int]] = []

    def on_shard_ready(self, shard: int, step: int, holds: frozenset[int], members: frozenset[int]) -> CloseStep | None:
        self.reports.append((shard, step))
        if len({s for s, t in self.reports if t == step}) < self.num_shards:
            return None
        return CloseStep(step, self.contributors)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 4), torch.nn.Linear(4, 2))


def _engine(model: torch.nn.Module, num_workers: int, deterministic: bool = True) -> ps.StepEngine:
    # a small split threshold cuts the first weight (128 elements) across both shards (SGD is elementwise)
    config = ps.JobConfig(num_workers=num_workers, deterministic=deterministic, split_threshold_bytes=64)
    return ps.StepEngine(model.named_parameters(), "SGD", lr=1.0, num_shards=2, config=config)


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_policy_that_closes_early_averages_over_its_contributors(deterministic):
    model = _model()
    engine = _engine(model, num_workers=3, deterministic=deterministic)
    job = engine.job
    assert job.plan.is_split(0)
    policy = ClosesOver(num_shards=2, contributors=(0, 2))
    coordinator = Coordinator(job, ShardGroup([job.make_shard(j) for j in range(2)]), policy)
    before = [p.detach().clone() for p in model.parameters()]
    grads = {w: [torch.randn_like(p) for p in before] for w in (0, 2)}
    # worker 2 first: in deterministic mode its contribution waits for rank 1, which never comes
    for w in (2, 0):
        for j in range(2):
            assert coordinator.shards.push(j, w, 0, pack(job.plan, j, grads[w]))
    assert not coordinator.shards.all_ready()  # worker 1 did not push: the sync rule would wait
    assert coordinator.shard_ready(0, 0) is None
    result = coordinator.shard_ready(1, 0)
    assert result is not None and result.contributors == (0, 2) and not result.skipped
    assert (coordinator.step, coordinator.version) == (1, 1)
    assert policy.reports == [(0, 0), (1, 0)]
    for w0, g0, g2, after in zip(before, grads[0], grads[2], coordinator.parameters()):
        expected = w0.clone().add_((g0.clone().add_(g2)).div_(2), alpha=-1.0)  # SGD's update on the mean of two
        assert torch.equal(after, expected)
    # the step is over for the worker that did not make it
    with pytest.raises(StaleStepError):
        coordinator.shards.push(0, 1, 0, pack(job.plan, 0, grads[0]))
    assert all(s["version"] == 1 and s["pushed"] == [] for s in coordinator.shards.statuses())


def test_a_policy_must_name_the_workers_that_pushed():
    model = _model()
    engine = _engine(model, num_workers=2)
    job = engine.job
    coordinator = Coordinator(job, ShardGroup([job.make_shard(j) for j in range(2)]), ClosesOver(2, (0, 1)))
    grads = [torch.ones_like(p) for p in model.parameters()]
    for j in range(2):
        coordinator.shards.push(j, 0, 0, pack(job.plan, j, grads))
    coordinator.shard_ready(0, 0)
    with pytest.raises(ValueError, match="pushed"):
        coordinator.shard_ready(1, 0)
    assert coordinator.step == 0  # nothing closed


class Recording:
    """Wraps the sync policy and records what the coordinator asked it."""

    asynchronous = False

    def after_close(self, step: int) -> CloseStep | None:
        return None

    def __init__(self, inner: SyncPolicy) -> None:
        self.inner = inner
        self.decisions: list[CloseStep | None] = []

    def on_shard_ready(self, shard: int, step: int, holds: frozenset[int], members: frozenset[int]) -> CloseStep | None:
        self.decisions.append(self.inner.on_shard_ready(shard, step, holds, members))
        return self.decisions[-1]


def test_the_step_engine_asks_its_policy():
    model = _model()
    engine = _engine(model, num_workers=2)
    assert isinstance(engine.policy, SyncPolicy)
    engine.policy = recording = Recording(engine.policy)
    grads = [torch.ones_like(p) for p in model.parameters()]
    assert engine.push(0, 0, grads) is None
    result = engine.push(1, 0, grads)
    assert result is not None and result.contributors == (0, 1)
    assert recording.decisions == [None, CloseStep(0, (0, 1))]
