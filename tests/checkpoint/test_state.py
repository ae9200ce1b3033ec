"""A checkpoint in torch's formats: a local torch.optim optimizer and scheduler load it and continue exactly;
a job restored onto another number of shards continues exactly too."""

from __future__ import annotations

import copy

import pytest
import torch

import paramserver as ps
from paramserver.checkpoint import Checkpointer, load_torch_state, read_latest, restore
from tests.helpers.reference import Reference, assert_state_equal, make_model, push_step, worker_grads

W, N, M = 2, 6, 4
SCHEDULER = ps.SchedulerSpec("StepLR", {"step_size": 2, "gamma": 0.5})


def _local_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def _engine(model: torch.nn.Module, num_shards: int) -> ps.StepEngine:
    return ps.StepEngine(
        model.named_parameters(), "Adam", lr=1e-2, betas=(0.8, 0.9), config=ps.JobConfig(num_workers=W),
        num_shards=num_shards, scheduler=SCHEDULER,
    )


def _checkpointing_engine(tmp_path, num_shards: int, every: int) -> tuple[ps.StepEngine, Checkpointer]:
    engine = _engine(make_model(), num_shards)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    engine.on_step = lambda r: ckpt.save(engine, "job") if (r.step + 1) % every == 0 else None
    params = [torch.empty(p.shape, dtype=p.dtype) for p in engine.plan.params]
    for step in range(N):
        push_step(engine, step, worker_grads(params, step, W))
    ckpt.close()
    return engine, ckpt


def _reference(steps: int) -> Reference:
    model = make_model()
    ref = Reference(model.named_parameters(), torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.9)}, scheduler=_local_scheduler)
    for step in range(steps):
        ref.step(worker_grads(ref.params, step, W))
    return ref


def test_load_torch_state_continues_in_local_torch_optim_exactly(tmp_path):
    engine, ckpt = _checkpointing_engine(tmp_path, num_shards=3, every=3)
    assert ckpt.failures == 0 and ckpt.last_copy_s > 0
    state = load_torch_state(str(tmp_path), "job")
    assert_state_equal(state, engine.state_dict())
    model = make_model(seed=1)  # other weights: the checkpoint's must replace them all
    model.load_state_dict(state["model"])
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-2, betas=(0.8, 0.9))
    sched = _local_scheduler(opt)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for step in range(N, N + M):
        grads = worker_grads(params, step, W)
        for p, g in zip(params, [(a + b) / 2 for a, b in zip(*grads)]):
            p.grad = g
        opt.step()
        sched.step()
    ref = _reference(N + M)
    assert_state_equal(list(model.parameters()), ref.params)
    assert_state_equal(opt.state_dict(), ref.optimizer.state_dict())
    assert sched.get_last_lr() == ref.scheduler.get_last_lr()


@pytest.mark.parametrize("saved, restored", [(2, 3), (3, 1), (1, 2)])
def test_restore_onto_another_shard_count_continues_exactly(tmp_path, saved, restored):
    _checkpointing_engine(tmp_path, num_shards=saved, every=3)
    part, shards = read_latest(str(tmp_path), "job")
    assert part["step"] == N and len(shards) == saved
    engine = _engine(make_model(seed=1), restored)
    restore(engine, part, shards)
    assert (engine.step, engine.version) == (N, N)
    params = [torch.empty(p.shape, dtype=p.dtype) for p in engine.plan.params]
    for step in range(N, N + M):
        push_step(engine, step, worker_grads(params, step, W))
    ref = _reference(N + M)
    assert_state_equal(engine.parameters(), ref.params)
    expected = copy.deepcopy(ref.optimizer.state_dict())
    assert_state_equal(engine.state_dict()["optimizer"]["state"], expected["state"])
    assert engine.get_last_lr() == ref.scheduler.get_last_lr()


def test_restore_refuses_a_job_that_has_pushes_in(tmp_path):
    _checkpointing_engine(tmp_path, num_shards=2, every=6)
    part, shards = read_latest(str(tmp_path), "job")
    engine = _engine(make_model(), 2)
    params = [torch.empty(p.shape, dtype=p.dtype) for p in engine.plan.params]
    engine.push(0, 0, worker_grads(params, 0, W)[0])
    with pytest.raises(ValueError, match="pushes in"):
        restore(engine, part, shards)
