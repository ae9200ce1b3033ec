"""Checkpoints on Ray (issue 9): a whole-service restart onto another shard count on the shared two-node
cluster continues bitwise like the uninterrupted run, and the checkpoint it leaves continues exactly in local
torch.optim. On Ray the coordinator actor writes every file; it runs on the driver's node, so a tmp_path works."""

from __future__ import annotations

import pytest
import torch

import paramserver as ps
from paramserver.checkpoint import load_torch_state, steps
from tests.helpers.reference import Reference, make_model, run_threads, worker_grads
from workers.client import ServiceClient
from workers.remote_optimizer import RemoteOptimizer

pytestmark = pytest.mark.ray

W, STOP_AT, TOTAL, MORE = 2, 4, 8, 2
JOB = "ray-ckpt"
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}
STEP_LR = {"step_size": 3, "gamma": 0.5}
RAY = {"cpus_per_shard": 0.25, "placement": "SPREAD", "placement_timeout": 60.0}


def _train(address: str, models: list[torch.nn.Module], until: int, starts: list[int]) -> None:
    """Every worker (a thread) trains ``range(opt.step_count, until)`` on its reference gradients."""

    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), "Adam", address=address, job=JOB, rank=rank, num_workers=W,
                             timeout=60, join_timeout=60, scheduler="StepLR", scheduler_kwargs=STEP_LR, **OPTIONS) as opt:
            starts[rank] = opt.step_count
            for step in range(opt.step_count, until):
                grads = worker_grads(list(model.parameters()), step, W)[rank]
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
                opt.step()

    run_threads(W, worker, timeout=180)


def _reference(total: int) -> tuple[torch.nn.Module, Reference]:
    model = make_model()
    ref = Reference(model.parameters(), torch.optim.Adam, OPTIONS, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, **STEP_LR))
    for step in range(total):
        ref.step(worker_grads(list(model.parameters()), step, W))
    return model, ref


def test_a_whole_service_restart_on_ray_onto_three_shards_continues_exactly(ray_cluster, tmp_path):
    d = str(tmp_path)
    starts = [-1] * W
    service = ps.serve(2, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        _train(service.address, [make_model() for _ in range(W)], STOP_AT, starts)
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
        _train(service.address, models, TOTAL, starts)
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
