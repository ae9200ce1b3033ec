"""Checkpoints on Ray (issue 9): a whole-service restart onto another shard count on the shared two-node
cluster continues bitwise like the uninterrupted run, and the checkpoint it leaves continues exactly in local
torch.optim. On Ray each shard actor writes its own file and the coordinator actor the rest (manifest last); on
this test cluster every process sees the driver's tmp_path."""

from __future__ import annotations

import os

import pytest
import torch

import paramserver as ps
from paramserver.checkpoint import load_torch_state, steps
from tests.helpers.reference import Reference, make_model, worker_grads
from tests.helpers.training import resume_workers
from workers.client import ServiceClient

pytestmark = pytest.mark.ray

W, STOP_AT, TOTAL, MORE = 2, 4, 8, 2
JOB = "ray-ckpt"
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}
STEP_LR = {"step_size": 3, "gamma": 0.5}
WORKER = {"timeout": 60, "optimizer": "Adam", "job": JOB, "scheduler": "StepLR", "scheduler_kwargs": STEP_LR, **OPTIONS}
RAY = {"cpus_per_shard": 0.25, "placement": "SPREAD", "placement_timeout": 60.0}


def _reference(total: int) -> tuple[torch.nn.Module, Reference]:
    model = make_model()
    ref = Reference(model.parameters(), torch.optim.Adam, OPTIONS, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, **STEP_LR))
    for step in range(total):
        ref.step(worker_grads(list(model.parameters()), step, W))
    return model, ref


def _log_checkpoint_writes(log_path: str) -> None:
    """Run inside a service process: each checkpoint file it writes is logged as "pid file"."""
    import paramserver.checkpoint.io as checkpoint_io

    def before(op: str, path: str) -> None:
        if op == "write":
            with open(log_path, "a") as f:
                f.write(f"{os.getpid()} {os.path.basename(path)}\n")

    checkpoint_io.before = before


def test_on_ray_each_shard_process_writes_its_own_file_and_the_coordinator_the_rest(ray_cluster, tmp_path):
    import ray

    d, log_path = str(tmp_path / "ckpt"), str(tmp_path / "writes.log")
    service = ps.serve(2, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        actors = [service.coordinator_actor, *service.shard_actors]
        ray.get([a.__ray_call__.remote(lambda self: _log_checkpoint_writes(log_path)) for a in actors], timeout=60)
        pids = {("coordinator" if p["shard"] is None else p["shard"]): p["pid"] for p in service.placements()}
        resume_workers(service.address, [make_model() for _ in range(W)], STOP_AT, [-1] * W, **WORKER)
    finally:
        service.shutdown()
    assert steps(d, JOB) == [2, 4]
    with open(log_path) as f:
        writers = [line.split() for line in f]
    expected = {"shard-00000.pt": pids[0], "shard-00001.pt": pids[1], "coordinator.pt": pids["coordinator"], "manifest.json.tmp": pids["coordinator"]}
    assert sorted(name for _, name in writers) == sorted([*expected] * 2)  # each file of each checkpoint, once
    for pid, name in writers:
        assert int(pid) == expected[name], f"{name} written by pid {pid}; the processes: {pids}"
    assert len({pids[0], pids[1], pids["coordinator"]}) == 3  # three processes: the tensors stayed in their shards'
    expected_model, _ = _reference(STOP_AT)
    state = load_torch_state(d, JOB)
    for (name, a), b in zip(state["model"].items(), expected_model.parameters()):
        assert torch.equal(a, b.detach()), name


def test_a_whole_service_restart_on_ray_onto_three_shards_continues_exactly(ray_cluster, tmp_path):
    d = str(tmp_path)
    starts = [-1] * W
    service = ps.serve(2, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        resume_workers(service.address, [make_model() for _ in range(W)], STOP_AT, starts, **WORKER)
        assert starts == [0, 0]
    finally:
        service.shutdown()
    assert steps(d, JOB) == [2, 4]  # written by the time shutdown returns

    models = [make_model(seed=7) for _ in range(W)]  # other initial weights: the restored ones win
    service = ps.serve(3, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        assert len([p for p in service.placements() if p["role"] == "primary"]) == 3
        client = ServiceClient(service.address, JOB, timeout=30)
        try:
            assert client.status().version == STOP_AT
        finally:
            client.close()
        resume_workers(service.address, models, TOTAL, starts, **WORKER)
        assert starts == [STOP_AT, STOP_AT]
    finally:
        service.shutdown()
    assert steps(d, JOB)[-1] == TOTAL

    expected_model, _ = _reference(TOTAL)
    for model in models:
        for a, b in zip(model.parameters(), expected_model.parameters()):
            assert torch.equal(a.detach(), b.detach())

    # the checkpoint continues exactly in local torch.optim
    state = load_torch_state(d, JOB)
    model = make_model(seed=7)
    model.load_state_dict(state["model"])
    opt = torch.optim.Adam(model.parameters(), **OPTIONS)
    opt.load_state_dict(state["optimizer"])
    sched = torch.optim.lr_scheduler.StepLR(opt, **STEP_LR)
    sched.load_state_dict(state["scheduler"])
    for step in range(TOTAL, TOTAL + MORE):
        grads = worker_grads(list(model.parameters()), step, W)
        for p, a, b in zip(model.parameters(), *grads):
            p.grad = (a + b) / 2
        opt.step()
        sched.step()
    expected_model, _ = _reference(TOTAL + MORE)
    for a, b in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(a.detach(), b.detach())
