"""Ray Train: a TorchTrainer train loop that uses RemoteOptimizer, ranks from Ray Train's context, ends bitwise
equal to local torch.optim; a worker Ray Train restarts after a SIGKILL (FailureConfig) rejoins the job and the
run still ends equal. On the session's two-node loopback cluster; every wait is bounded."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest
import torch

import paramserver as ps
from tests.helpers.reference import Reference, make_model, worker_grads

pytestmark = pytest.mark.ray
train = pytest.importorskip("ray.train")
from ray.train import FailureConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

W, STEPS = 2, 6
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}


def train_loop(config: dict) -> None:
    """What a Ray Train user writes: the model, the optimizer (here the service's), the loop."""
    import ray.train

    from workers.remote_optimizer import RemoteOptimizer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    model = make_model()
    opt = RemoteOptimizer(model.named_parameters(), torch.optim.Adam, address=config["address"], job=config["job"], rank=rank,
                          num_workers=world, min_workers=world, lease_timeout=config["lease_s"], timeout=60, join_timeout=60,
                          **OPTIONS)
    out = Path(config["out"])
    for step in range(opt.step_count, STEPS):
        if rank == 1 and step == config.get("die_at") and not (out / "died").exists():
            (out / "died").touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies in the middle of the run
        for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), step, world)[rank]):
            p.grad = g.clone()
        opt.step()
    torch.save([p.detach().clone() for p in model.parameters()], out / f"rank{rank}.pt")
    opt.close()


def _torch_weights() -> list[torch.Tensor]:
    model = make_model()
    ref = Reference(model.parameters(), torch.optim.Adam, OPTIONS)
    for step in range(STEPS):
        ref.step(worker_grads(list(model.parameters()), step, W))
    return [p.detach() for p in model.parameters()]


@pytest.fixture
def service(ray_cluster):
    svc = ps.serve(2, cpus_per_shard=0.25, placement_timeout=60.0)
    try:
        yield svc
    finally:
        svc.shutdown()


@pytest.mark.parametrize("die_at", [None, 3], ids=["plain", "worker-restarted"])
def test_a_ray_train_loop_with_remote_optimizer_equals_local_torch(service, tmp_path, die_at):
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"address": service.address, "job": f"ray-train-{die_at}", "out": str(tmp_path), "lease_s": 5.0, "die_at": die_at},
        scaling_config=ScalingConfig(num_workers=W, resources_per_worker={"CPU": 0.25}),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(dir=tmp_path), name="rt", failure_config=FailureConfig(max_failures=1)),
    )
    result = trainer.fit()
    assert result.error is None
    assert (tmp_path / "died").exists() == (die_at is not None)
    expected = _torch_weights()
    for rank in range(W):
        for got, want in zip(torch.load(tmp_path / f"rank{rank}.pt"), expected):
            assert torch.equal(got, want)
