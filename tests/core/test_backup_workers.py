"""Backup workers (``close_after``, Chen et al. 2016) without Ray: a step closes on the first N members' pushes
that every shard holds and averages over them; a late push is refused as a stale step and not applied."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.errors import StaleStepError
from paramserver.core.policy import BackupWorkersPolicy, CloseStep, SyncPolicy, policy_for
from paramserver.core.sharding import pack

ALL = frozenset(range(3))


def test_the_policy_closes_on_the_first_n_members_every_shard_holds():
    policy = BackupWorkersPolicy(num_shards=2, close_after=2)
    assert policy.on_shard_ready(0, 0, frozenset({0, 2}), ALL) is None
    assert policy.on_shard_ready(1, 0, frozenset({0, 1}), ALL) is None  # only worker 0 is on both
    assert policy.on_shard_ready(1, 0, frozenset({0, 1, 2}), ALL) == CloseStep(0, (0, 2))
    # fewer members than N: all of them
    assert policy.on_shard_ready(0, 1, frozenset({1}), frozenset({1})) is None
    assert policy.on_shard_ready(1, 1, frozenset({1}), frozenset({1})) == CloseStep(1, (1,))


def test_the_config_names_the_policy():
    assert isinstance(policy_for(ps.JobConfig(num_workers=3), 2), SyncPolicy)
    backup = policy_for(ps.JobConfig(num_workers=3, close_after=2), 2)
    assert isinstance(backup, BackupWorkersPolicy) and backup.close_after == 2
    with pytest.raises(ValueError, match="close_after"):
        ps.JobConfig(num_workers=3, close_after=4)
    with pytest.raises(ValueError, match="deterministic"):
        ps.JobConfig(num_workers=3, close_after=2, deterministic=False)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))


def _grads(step: int, rank: int, model: torch.nn.Module) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(10 * step + rank)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def test_a_step_closes_on_two_of_three_and_the_late_push_is_not_applied():
    model = _model()
    engine = ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, num_shards=2, config=ps.JobConfig(num_workers=3, close_after=2))
    ref_model = _model()
    ref = torch.optim.Adam(ref_model.parameters(), lr=0.1)
    order = {0: (2, 0, 1), 1: (1, 0, 2), 2: (0, 1, 2)}  # who is fast at each step
    for step, (first, second, late) in order.items():
        # the late worker reached shard 0 only before the step closed: held there, then left out
        engine.shards.push(0, late, step, pack(engine.plan, 0, _grads(step, late, model)))
        assert engine.push(first, step, _grads(step, first, model)) is None
        result = engine.push(second, step, _grads(step, second, model))
        assert result is not None and result.contributors == tuple(sorted((first, second)))
        with pytest.raises(StaleStepError):
            engine.shards.push(1, late, step, pack(engine.plan, 1, _grads(step, late, model)))
        a, b = sorted((first, second))
        for p, ga, gb in zip(ref_model.parameters(), _grads(step, a, ref_model), _grads(step, b, ref_model)):
            p.grad = ga.add_(gb).div_(2)
        ref.step()
    for mine, theirs in zip(engine.parameters(), ref_model.parameters()):
        assert torch.equal(mine, theirs.detach())
