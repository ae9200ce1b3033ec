"""The parity suite through the service on 127.0.0.1, over both transports (gRPC chunks, and shared memory with
gRPC control messages): workers as threads and as processes, equal to local torch.optim."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paramserver as ps
from paramserver.service.local import serve_local as serve
from tests.helpers import wire_worker
from tests.helpers.custom_optimizers import InPlaceMomentum
from tests.helpers.reference import (
    Reference,
    assert_state_equal,
    make_model,
    run_threads,
    worker_grads,
)
from workers.remote_optimizer import RemoteOptimizer

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12


@pytest.fixture(
    scope="module",
    params=[(1, "grpc"), (3, "grpc"), (1, "shared_memory"), (3, "shared_memory")],
    ids=["1shard-grpc", "3shards-grpc", "1shard-shm", "3shards-shm"],
)
def service(request):
    num_shards, transport = request.param
    svc = serve(num_shards, trusted_modules=("tests",))
    svc.transport = transport  # the transport every worker of the module's tests asks for
    yield svc
    svc.shutdown()


CASES = [
    # (id, optimizer, kwargs, groups?, clip, norm_type, scheduler, scheduler kwargs, plateau, workers)
    ("adam-clip2-steplr", torch.optim.Adam, {"lr": 0.01}, False, 0.5, 2.0, torch.optim.lr_scheduler.StepLR, {"step_size": 4, "gamma": 0.5}, 3),
    ("sgd-nesterov-clipinf-plateau", torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, False, 0.3, float("inf"), torch.optim.lr_scheduler.ReduceLROnPlateau, {"patience": 1, "factor": 0.5}, 2),
    ("adamw-groups-onecycle", torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, True, None, 2.0, torch.optim.lr_scheduler.OneCycleLR, {"max_lr": [0.05, 0.02], "total_steps": STEPS + 1}, 2),
    ("rmsprop-centered-tensor-lr", torch.optim.RMSprop, {"lr": torch.tensor(0.01), "centered": True, "momentum": 0.5}, False, 1.0, 2.0, None, {}, 2),
    ("adafactor-one-worker", torch.optim.Adafactor, {"lr": 0.01}, False, None, 2.0, None, {}, 1),
    ("custom-optimizer", "tests.helpers.custom_optimizers:InPlaceMomentum", {"lr": 0.05}, False, 0.5, 2.0, None, {}, 2),
]


def groups_of(model, use_groups):
    if not use_groups:
        return model.named_parameters()
    return [{"params": [(n, p) for n, p in model.named_parameters() if n.startswith(("0.", "2."))]},
            {"params": [(n, p) for n, p in model.named_parameters() if not n.startswith(("0.", "2."))], "lr": 0.002}]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_over_grpc_with_worker_threads(service, case):
    name, optimizer, kwargs, use_groups, clip, norm_type, scheduler, sched_kwargs, num_workers = case
    job = f"{name}-{id(service)}"
    base = make_model()
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    for m in models[1:]:  # joiners start from the server's weights, not their own
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1.0)
    ref_model = copy.deepcopy(base)
    ref_cls = optimizer if isinstance(optimizer, type) else InPlaceMomentum
    ref = Reference(
        groups_of(ref_model, use_groups), ref_cls, kwargs, clip=ps.ClipConfig(max_norm=clip, norm_type=norm_type),
        scheduler=(lambda o: scheduler(o, **copy.deepcopy(sched_kwargs))) if scheduler else None,
    )
    opts: list[RemoteOptimizer | None] = [None] * num_workers

    def create(rank):
        opts[rank] = RemoteOptimizer(
            groups_of(models[rank], use_groups), optimizer, address=service.address, transport=service.transport, job=job,
            num_workers=num_workers, rank=rank,
            clip_grad_norm=clip, norm_type=norm_type, scheduler=scheduler, scheduler_kwargs=sched_kwargs, timeout=30.0, **kwargs,
        )

    run_threads(num_workers, create)
    plateau = scheduler is torch.optim.lr_scheduler.ReduceLROnPlateau
    try:
        for t in range(STEPS):
            grads = worker_grads(ref.params, t, num_workers)
            metrics = [1.0 + ((t * 7 + r) % 5) * 0.1 for r in range(num_workers)] if plateau else None

            def step(rank):
                opts[rank].zero_grad()
                for p, g in zip(models[rank].parameters(), grads[rank]):
                    p.grad = g.clone()
                opts[rank].step(metric=None if metrics is None else metrics[rank])

            run_threads(num_workers, step)
            ref.step(grads, metric=None if metrics is None else sum(metrics) / len(metrics))
            assert opts[0].get_last_lr() == [float(g["lr"]) for g in ref.optimizer.param_groups]
        for m in models:
            for got, want in zip(m.parameters(), ref.params):
                assert torch.equal(got, want.detach())
        groups = opts[0].param_groups
        assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in models[0].parameters())
        for got, want in zip(groups, ref.optimizer.param_groups, strict=True):
            assert len(got["params"]) == len(want["params"])
            assert_state_equal({k: v for k, v in got.items() if k != "params"},
                               {k: v for k, v in want.items() if k not in ("params", "param_names")})
        state = opts[num_workers - 1].state_dict()
        assert_state_equal(state["optimizer"], ref.optimizer.state_dict())
        if scheduler is not None:
            assert_state_equal(state["scheduler"], ref.scheduler.state_dict())
    finally:
        for o in opts:
            if o is not None:
                o.close()


def test_parity_over_grpc_with_worker_processes(service, tmp_path):
    num_workers = 2
    job = f"processes-{id(service)}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.wire_worker", service.address, job, str(r), str(num_workers), str(STEPS), str(tmp_path / f"w{r}.pt"),
             service.transport],
            cwd=ROOT,
        )
        for r in range(num_workers)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    ref_model = make_model()
    ref = Reference(
        ref_model.named_parameters(), getattr(torch.optim, wire_worker.OPTIMIZER), wire_worker.KWARGS,
        clip=ps.ClipConfig(max_norm=wire_worker.CLIP),
        scheduler=lambda o: getattr(torch.optim.lr_scheduler, wire_worker.SCHEDULER[0])(o, **wire_worker.SCHEDULER[1]),
    )
    for t in range(STEPS):
        ref.step(worker_grads(ref.params, t, num_workers))
    for r in range(num_workers):
        weights = torch.load(tmp_path / f"w{r}.pt")
        for (n, p) in ref_model.named_parameters():
            assert torch.equal(weights[n], p.detach()), f"worker {r}: {n} differs"


def test_state_dict_round_trip_over_grpc(service):
    """Export over the wire -> load into local torch -> continue equals the service continuing, and back."""
    model = make_model()
    job = f"state-{id(service)}"
    with RemoteOptimizer(model.named_parameters(), "Adam", address=service.address, transport=service.transport, job=job, lr=0.01, timeout=30.0,
                         scheduler="StepLR", scheduler_kwargs={"step_size": 2}) as opt:
        params = list(model.parameters())
        for t in range(3):
            for p, g in zip(params, worker_grads(params, t, 1)[0]):
                p.grad = g
            opt.step()
        state = opt.state_dict()
        local = make_model()
        local.load_state_dict(state["model"])
        local_opt = torch.optim.Adam(local.named_parameters(), lr=0.01)
        local_sched = torch.optim.lr_scheduler.StepLR(local_opt, step_size=2)
        local_opt.load_state_dict(state["optimizer"])
        local_sched.load_state_dict(state["scheduler"])
        for t in range(3, 6):
            for p, g in zip(params, worker_grads(params, t, 1)[0]):
                p.grad = g.clone()
            opt.step()
            for p, g in zip(local.parameters(), worker_grads(params, t, 1)[0]):
                p.grad = g.clone()
            local_opt.step()
            local_sched.step()
        for a, b in zip(model.parameters(), local.parameters()):
            assert torch.equal(a, b)
        # and back: local state into the service, then both continue
        opt.load_state_dict({"model": dict(local.named_parameters()), "optimizer": local_opt.state_dict(), "scheduler": local_sched.state_dict()})
        assert_state_equal(opt.state_dict()["optimizer"], local_opt.state_dict())


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_parity_low_precision_gradients_on_the_wire(service, grad_dtype):
    """bf16/fp16 gradients travel as such and are accumulated in fp32: equal to local training on the
    rounded gradients."""
    num_workers = 2
    base = make_model()
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    ref_model = copy.deepcopy(base)
    ref = Reference(ref_model.named_parameters(), torch.optim.Adam, {"lr": 0.01}, clip=ps.ClipConfig(max_norm=0.5))
    opts: list[RemoteOptimizer | None] = [None] * num_workers
    job = f"lowp-{grad_dtype}-{id(service)}"

    def create(rank):
        opts[rank] = RemoteOptimizer(models[rank].named_parameters(), "Adam", lr=0.01, address=service.address, transport=service.transport, job=job,
                                     num_workers=num_workers, rank=rank, clip_grad_norm=0.5, grad_dtype=grad_dtype, timeout=30.0)

    run_threads(num_workers, create)
    try:
        for t in range(6):
            grads = worker_grads(ref.params, t, num_workers)

            def step(rank):
                for p, g in zip(models[rank].parameters(), grads[rank]):
                    p.grad = g.clone()
                opts[rank].step()

            run_threads(num_workers, step)
            ref.step([[g.to(grad_dtype).float() for g in gs] for gs in grads])
        for got, want in zip(models[0].parameters(), ref.params):
            assert torch.equal(got, want.detach())
    finally:
        for o in opts:
            o.close()


def test_parity_pushing_during_backward(service):
    """Each shard's gradients leave as soon as backward has produced them; the result is unchanged."""
    num_workers = 2
    base = make_model()
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    ref_model = copy.deepcopy(base)
    ref = Reference(ref_model.named_parameters(), torch.optim.Adam, {"lr": 0.01}, clip=ps.ClipConfig(max_norm=0.5))
    job = f"overlap-{id(service)}"
    opts: list[RemoteOptimizer | None] = [None] * num_workers

    def create(rank):
        opts[rank] = RemoteOptimizer(models[rank].named_parameters(), "Adam", lr=0.01, address=service.address, transport=service.transport, job=job,
                                     num_workers=num_workers, rank=rank, clip_grad_norm=0.5, push_during_backward=True, timeout=30.0)

    def data(t, rank):
        gen = torch.Generator().manual_seed(t * 10 + rank)
        return torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)

    run_threads(num_workers, create)
    try:
        for t in range(6):
            grads = []
            for rank in range(num_workers):
                probe = copy.deepcopy(ref_model)
                x, y = data(t, rank)
                torch.nn.functional.mse_loss(probe(x), y).backward()
                grads.append([p.grad for p in probe.parameters()])

            def step(rank):
                x, y = data(t, rank)
                if rank == 0:
                    models[rank].zero_grad()  # set_to_none: the gradients are copied into the buffers
                else:
                    opts[rank].zero_grad()  # the gradients stay views: backward writes into the buffers
                torch.nn.functional.mse_loss(models[rank](x), y).backward()
                opts[rank].step()

            run_threads(num_workers, step)
            ref.step(grads)
        for m in models:
            for a, b in zip(m.parameters(), ref.params):
                assert torch.equal(a, b.detach())
        with pytest.raises(ValueError, match="push_during_backward"):
            opts[0].step(metric=1.0)
    finally:
        for o in opts:
            o.close()


def test_pushing_during_backward_refuses_a_second_backward_in_one_step(service):
    model = make_model()
    with RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=service.address, transport=service.transport, job=f"accum-{id(service)}",
                         push_during_backward=True, timeout=30.0) as opt:
        x = torch.randn(4, 6)
        model(x).sum().backward()
        with pytest.raises(RuntimeError, match="second backward"):
            model(x).sum().backward()
        opt.step()  # the first backward's gradients make the step
        assert opt.step_count == 1


def test_nonfinite_error_refuses_the_whole_push_before_any_shard_takes_it():
    from paramserver.core.errors import NonFiniteGradientError

    model = make_model()
    params = list(model.parameters())
    with serve(2) as svc, RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=svc.address, job="nonfinite-error",
                                          nonfinite="error", timeout=30.0) as opt:
        for p in params:
            p.grad = torch.ones_like(p)
        params[-1].grad[0] = float("nan")  # on one shard only
        with pytest.raises(NonFiniteGradientError, match="nothing was pushed"):
            opt.step()
        assert all(not s.pushed_workers for s in opt.client.status().shards)
        params[-1].grad[0] = 1.0
        opt.step()
        assert opt.client.status().version == 1
        with pytest.raises(ValueError, match="push_during_backward needs"):
            RemoteOptimizer(make_model().named_parameters(), "SGD", lr=0.1, address=svc.address, job="nonfinite-error-2",
                            nonfinite="error", push_during_backward=True, timeout=30.0)
