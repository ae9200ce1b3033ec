"""Checkpoints through the service: every K steps and on demand; a service started on the same directory
restores every job onto any number of shards, and workers continue exactly where it was."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import REGISTRY

from paramserver.__main__ import main
from paramserver.checkpoint import load_torch_state, steps
from paramserver.service.local import serve_local
from tests.helpers.reference import make_model, worker_grads
from tests.helpers.training import resume_workers
from workers.client import ServiceClient

W, TOTAL, STOP_AT = 2, 9, 6
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}
SCHED = {"scheduler": "StepLR", "scheduler_kwargs": {"step_size": 2, "gamma": 0.5}}
WORKER = {"timeout": 30, "optimizer": "Adam", "job": "j", **SCHED, **OPTIONS}


def _reference() -> list[torch.Tensor]:
    model = make_model()
    opt = torch.optim.Adam(model.named_parameters(), **OPTIONS)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for step in range(TOTAL):
        grads = worker_grads(list(model.parameters()), step, W)
        for p, a, b in zip(model.parameters(), *grads):
            p.grad = (a + b) / 2
        opt.step()
        sched.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("before, after", [(2, 3)])
def test_a_restarted_service_restores_the_job_onto_other_shards_and_continues_exactly(tmp_path, before, after):
    d = str(tmp_path)
    starts = [-1] * W
    copies = REGISTRY.get_sample_value("paramserver_checkpoint_copy_seconds_count", {"job": "j"}) or 0.0
    with serve_local(before, checkpoint_dir=d, checkpoint_every=3, checkpoint_keep=2) as service:
        resume_workers(service.address, [make_model() for _ in range(W)], STOP_AT, starts, **WORKER)
        assert starts == [0, 0]
    assert steps(d, "j") == [3, 6]  # written by the time shutdown returns
    # each copy's hold of the job is in the coordinator's metrics
    assert REGISTRY.get_sample_value("paramserver_checkpoint_copy_seconds_count", {"job": "j"}) == copies + 2
    with serve_local(after, checkpoint_dir=d) as service:
        client = ServiceClient(service.address, "j", timeout=10)
        try:
            assert client.status().version == STOP_AT
        finally:
            client.close()
        models = [make_model(seed=7) for _ in range(W)]  # other initial weights: the restored ones win
        resume_workers(service.address, models, TOTAL, starts, **WORKER)
        assert starts == [STOP_AT, STOP_AT]
    expected = _reference()
    for model in models:
        for a, b in zip(model.parameters(), expected):
            assert torch.equal(a.detach(), b)


def test_on_demand_checkpoint_and_export(tmp_path):
    d = str(tmp_path / "ckpt")
    with serve_local(2, checkpoint_dir=d) as service:
        resume_workers(service.address, [make_model() for _ in range(W)], 2, [-1] * W, **WORKER)
        client = ServiceClient(service.address, "j", timeout=30)
        try:
            assert client.checkpoint() == 2
            assert client.checkpoint() == 2  # the same step again: the one checkpoint
        finally:
            client.close()
        assert main(["checkpoint", "--address", service.address, "--job", "j"]) == 0
        assert main(["checkpoint", "--address", service.address, "--job", "nope"]) == 1
    assert steps(d, "j") == [2]
    out = str(tmp_path / "j.pt")
    assert main(["export", "--checkpoint-dir", d, "--job", "j", "--out", out]) == 0
    exported = torch.load(out, weights_only=True)
    assert set(exported) == {"model", "optimizer", "scheduler"}
    for key, value in load_torch_state(d, "j", step=2)["model"].items():
        assert torch.equal(exported["model"][key], value)
    assert main(["export", "--checkpoint-dir", d, "--job", "nope", "--out", out]) == 1


def test_checkpoint_without_a_directory_is_refused():
    with serve_local(1) as service:
        resume_workers(service.address, [make_model() for _ in range(W)], 1, [-1] * W, **WORKER)
        client = ServiceClient(service.address, "j", timeout=10)
        try:
            with pytest.raises(ValueError, match="checkpoint_dir"):
                client.checkpoint()
        finally:
            client.close()
