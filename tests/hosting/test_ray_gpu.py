"""Shards on GPUs through Ray (`gpus_per_shard`), where there is a GPU (skipped elsewhere): two shard actors
share one GPU, their state lives on CUDA, and training equals torch.optim on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

import paramserver as ps
from tests.helpers.reference import Reference, make_model, run_threads, worker_grads
from workers.remote_optimizer import RemoteOptimizer

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_shards_on_a_shared_gpu_train_like_torch_optim_on_cuda(transport):
    """Through shared memory (``auto`` on one host: segments the shards page-lock) and over gRPC (receive buffers
    and pulled weights in pinned memory)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("needs its own Ray with the GPU in it")
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        service = ps.serve(2, gpus_per_shard=0.5, cpus_per_shard=0.5, placement="PACK")
        try:
            assert [p["device"] for p in service.placements() if p["role"] == "primary"] == ["cuda", "cuda"]
            base = make_model(seed=4)
            models = [copy.deepcopy(base) for _ in range(2)]
            ref_model = copy.deepcopy(base).cuda()
            kwargs = {"lr": 1e-2, "weight_decay": 0.01}
            ref = Reference(ref_model.named_parameters(), torch.optim.AdamW, kwargs)
            opts: list = [None, None]

            def create(r: int) -> None:
                opts[r] = RemoteOptimizer(models[r].named_parameters(), "AdamW", address=service.address, job="gpu", num_workers=2,
                                          rank=r, timeout=60.0, transport=transport, **kwargs)

            run_threads(2, create)
            try:
                for t in range(8):
                    grads = worker_grads(list(base.parameters()), t, 2)

                    def step(r: int) -> None:
                        for p, g in zip(models[r].parameters(), grads[r]):
                            p.grad = g.clone()
                        opts[r].step()

                    run_threads(2, step)
                    ref.step([[g.cuda() for g in gw] for gw in grads])
                assert all(o.transport == ("shared_memory" if transport == "auto" else "grpc") for o in opts)
                status = opts[0].client.status()
                assert all("cuda" in s.placement for s in status.shards), [s.placement for s in status.shards]
            finally:
                for o in opts:
                    if o is not None:
                        o.close()
            for m in models:
                for a, b in zip(m.parameters(), ref_model.parameters()):
                    assert torch.equal(a, b.detach().cpu()), f"max diff {(a - b.detach().cpu()).abs().max()}"
        finally:
            service.shutdown()
    finally:
        ray.shutdown()
