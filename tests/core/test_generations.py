"""Weights generations: a load starts a new one on every shard (partial pushes dropped, the loaded step
opened, other generations' pushes refused, waiting pulls released), and the step a torch-format state says."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.core.errors import StateReloadedError, StepMismatchError
from paramserver.core.state import loaded_step


def _engine(num_workers: int = 2) -> tuple[torch.nn.Module, ps.StepEngine]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    return model, ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, num_shards=2, config=ps.JobConfig(num_workers=num_workers))


def test_loaded_step_from_the_optimizer_then_the_scheduler():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    assert loaded_step({"model": model.state_dict()}) is None
    assert loaded_step({"optimizer": opt.state_dict()}) is None  # no per-parameter state yet
    assert loaded_step({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}) == 0
    for _ in range(4):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
    assert loaded_step({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}) == 4
    assert loaded_step({"scheduler": sched.state_dict()}, interval=3) == 12  # last_epoch x the interval
    state = opt.state_dict()
    state["state"][0]["step"] = torch.tensor(7.0)  # the largest per-parameter step
    assert loaded_step({"optimizer": state}) == 7
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sgd.step()
    assert loaded_step({"optimizer": sgd.state_dict()}) is None  # SGD keeps no step


def test_start_generation_drops_partial_pushes_and_refuses_the_old_generation():
    model, engine = _engine()
    shard = engine.shards.shards[0]
    grads = [torch.ones(layout.numel, dtype=layout.dtype) for layout in shard.layouts]
    woken = []
    shard.add_version_listener(lambda: woken.append(shard.version))
    assert shard.push(0, 0, grads, generation=0)
    assert (shard.version, shard.generation, sorted(shard.accumulator.received)) == (0, 0, [0])
    shard.start_generation(5)
    assert (shard.version, shard.generation, sorted(shard.accumulator.received)) == (5, 1, [])
    assert woken == [5] and shard.status()["generation"] == 1
    with pytest.raises(StateReloadedError) as err:
        shard.push(1, 0, grads, generation=0)  # gradients of the old weights: refused whatever the step
    assert isinstance(err.value, StepMismatchError) and err.value.version == 5 and err.value.step == 5
    assert shard.accumulator.received == set()
    assert shard.push(1, 5, grads, generation=1) and shard.accumulator.received == {1}
    assert shard.push(0, 5, grads)  # no generation: not checked
    # a pull that holds the old generation returns at once; one that holds the current one waits for the version
    assert shard.wait_for_version(6, 0.05, generation=0) == 5
    with pytest.raises(TimeoutError):
        shard.wait_for_version(6, 0.05, generation=1)


def test_a_load_moves_the_job_to_its_step_in_a_new_generation():
    model, engine = _engine()
    grads = [torch.ones_like(p) for p in model.parameters()]
    engine.push(0, 0, grads)
    engine.push(1, 0, grads)
    state = engine.state_dict()
    engine.push(0, 1, grads)  # a partial step: dropped by the load
    engine.load_state_dict(state, step=7)
    assert (engine.step, engine.version, engine.generation) == (7, 7, 1)
    assert [(s["version"], s["generation"], s["pushed"]) for s in engine.shards.statuses()] == [(7, 1, []), (7, 1, [])]
    assert engine.policy.waiting(1) == [0, 1]  # forgot the shards' reports of the dropped step
    assert engine.push(0, 7, grads) is None
    assert engine.push(1, 7, grads) is not None and engine.step == 8
    engine.load_state_dict({"model": state["model"]})  # no step given: the job stays at its step
    assert (engine.step, engine.version, engine.generation) == (8, 8, 2)
    with pytest.raises(ValueError, match="step must be"):
        engine.load_state_dict(state, step=-1)
    assert engine.generation == 2  # a refused load changes nothing


def test_a_report_from_before_a_load_is_ignored():
    _, engine = _engine()
    engine.load_state_dict(engine.state_dict())
    assert engine.shard_ready(0, 0, generation=0) is None
    assert engine.policy.waiting(0) == [0, 1]  # not recorded
