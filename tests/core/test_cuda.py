"""The GPU paths, run where there is a GPU (skipped elsewhere): shards on CUDA against torch.optim on CUDA,
fused and foreach kernels, and a worker whose model is on CUDA (pinned buffers, copies on a side stream)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import paramserver as ps
from tests.helpers.reference import Reference, make_model, worker_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPTIMIZERS = [
    ("SGD-momentum", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    ("Adam-foreach", torch.optim.Adam, {"lr": 1e-2, "foreach": True}),
    ("Adam-for-loop", torch.optim.Adam, {"lr": 1e-2, "foreach": False}),
    ("AdamW-fused", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "fused": True}),
    ("Adagrad", torch.optim.Adagrad, {"lr": 0.1}),
]
WORKERS, STEPS = 3, 12


@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("name,cls,kwargs", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_parity_shards_on_cuda(name, cls, kwargs, shards, max_norm):
    model = make_model(seed=1)
    ref_model = copy.deepcopy(model).cuda()
    clip = ps.ClipConfig(max_norm=max_norm)
    engine = ps.StepEngine(model.named_parameters(), cls, num_shards=shards, device="cuda",
                           config=ps.JobConfig(num_workers=WORKERS, clip=clip), **kwargs)
    assert all(s.device.type == "cuda" for s in engine.shards.shards)
    ref = Reference(ref_model.named_parameters(), cls, kwargs, clip=clip)
    for t in range(STEPS):
        grads = worker_grads(list(model.parameters()), t, WORKERS)
        for w in range(WORKERS):
            engine.push(w, t, [g.cuda() for g in grads[w]])
        ref.step([[g.cuda() for g in gw] for gw in grads])
    ours = engine.parameters()
    theirs = [p.detach().cpu() for p in ref_model.parameters()]
    if max_norm is None:
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), f"{name}: not bitwise equal, max diff {(a - b).abs().max()}"
    else:
        # the total norm is reduced from per-tensor norms on the host here and on the device there
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_remote_optimizer_with_a_model_on_cuda():
    """Workers whose models live on the GPU: gradients go out through pinned host buffers and new weights
    come back into the model, equal to torch.optim on the mean of the workers' gradients."""
    from paramserver.service.local import serve_local
    from workers.remote_optimizer import RemoteOptimizer

    base = make_model(seed=2)
    models = [copy.deepcopy(base).cuda() for _ in range(2)]
    ref_model = copy.deepcopy(base)
    ref = Reference(ref_model.named_parameters(), torch.optim.Adam, {"lr": 1e-2}, clip=ps.ClipConfig(max_norm=1.0))
    with serve_local(num_shards=2) as service:
        opts = [RemoteOptimizer(m.named_parameters(), "Adam", lr=1e-2, address=service.address, job="cuda", num_workers=2,
                                rank=r, clip_grad_norm=1.0) for r, m in enumerate(models)]
        try:
            for t in range(6):
                grads = worker_grads(list(ref_model.parameters()), t, 2)

                def work(r: int) -> None:
                    opts[r].zero_grad()
                    # a loss whose gradient is exactly this worker's gradients, so backward's hooks run
                    sum((p * g.cuda()).sum() for p, g in zip(models[r].parameters(), grads[r])).backward()
                    opts[r].step()

                threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join(timeout=60)
                ref.step(grads)
        finally:
            for o in opts:
                o.close()
    for m in models:
        for p, q in zip(m.parameters(), ref_model.parameters()):
            assert p.is_cuda and torch.equal(p.detach().cpu(), q.detach())
