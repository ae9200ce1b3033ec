"""Prometheus metrics: steps, stage latency, bytes in and out, grad norm, lr, skipped steps, membership."""

from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client import REGISTRY

from paramserver.service.local import serve_local
from paramserver.service.metrics import start_metrics_server
from tests.helpers.reference import make_model
from workers.remote_optimizer import RemoteOptimizer


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("transport", ["grpc", "shared_memory"])
def test_metrics_count_steps_stages_bytes_norm_lr_and_skips(transport):
    job = f"metrics-job-{transport}"
    model = make_model()
    with serve_local(2) as service, RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=service.address, job=job,
                                                    scheduler="StepLR", scheduler_kwargs={"step_size": 1, "gamma": 0.5}, timeout=10,
                                                    transport=transport) as opt:
        assert service.coordinator.status(job)["transports"] == {0: transport}
        assert sample("paramserver_worker_transport", job=job, worker="0", transport=transport) == 1
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        opt.step()
    assert sample("paramserver_steps_total", job=job) == 4
    assert sample("paramserver_skipped_steps_total", job=job) == 1
    for stage in ("aggregate", "clip", "update", "schedule"):
        assert sample("paramserver_stage_seconds_count", job=job, stage=stage) >= 3
    assert sample("paramserver_stage_seconds_count", job=job, stage="queued") == 4  # every closed step, the skipped one too
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    grpc_in, grpc_out = (sum(sample(f"paramserver_bytes_{d}_total", job=job, shard=str(j)) for j in range(2)) for d in ("in", "out"))
    shm_in, shm_out = (
        sum(sample("paramserver_shared_memory_bytes_total", job=job, shard=str(j), direction=d) for j in range(2)) for d in ("in", "out")
    )
    if transport == "grpc":
        assert (grpc_in, grpc_out, shm_in, shm_out) == (nbytes * 5, nbytes * 4, 0, 0)  # initial + 4 pushes; 4 pulls
    else:  # the initial weights go over gRPC; then every push and pull through shared memory
        assert (grpc_in, grpc_out, shm_in, shm_out) == (nbytes, 0, nbytes * 4, nbytes * 4)
        assert sample("paramserver_shared_memory_workers", job=job, shard="0") == 0  # the worker let go when it closed
    assert sample("paramserver_lr", job=job, group="0") == 0.1 * 0.5**3
    assert sample("paramserver_grad_norm", job=job) != sample("paramserver_grad_norm", job=job)  # nan after the skipped step


def test_metrics_show_membership_changes_with_their_reason():
    job = "metrics-members"
    models = [make_model() for _ in range(2)]
    with serve_local(1) as service:
        opts = [RemoteOptimizer(m.named_parameters(), "SGD", lr=0.1, address=service.address, job=job, rank=r, num_workers=2,
                                max_workers=3, timeout=10) for r, m in enumerate(models)]
        extra = RemoteOptimizer(make_model().named_parameters(), "SGD", lr=0.1, address=service.address, job=job, rank=2,
                                num_workers=2, max_workers=3, timeout=10)
        assert sample("paramserver_membership_changes_total", job=job, reason="joined") == 1 and sample("paramserver_members", job=job) == 3
        extra.close()
        assert sample("paramserver_membership_changes_total", job=job, reason="left") == 1 and sample("paramserver_members", job=job) == 2
        for o in opts:
            o.close()


def test_metrics_are_served_over_http_on_loopback():
    port = start_metrics_server(0, "127.0.0.1")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "paramserver_steps_total" in body or "# HELP paramserver_steps" in body
