"""A parameter without a gradient (frozen, or unused after a set_to_none zero_grad) is skipped as torch.optim
skips it: no update (not even weight decay), no optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch

import paramserver as ps
from paramserver.service.local import serve_local
from tests.helpers.reference import assert_state_equal
from workers.remote_optimizer import RemoteOptimizer


def two_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))


@pytest.mark.parametrize("num_shards", [1, 3])
def test_parity_engine_skips_parameters_no_worker_has_a_gradient_for(num_shards):
    model = two_layers()
    ref = copy.deepcopy(model)
    kwargs = {"lr": 0.1, "weight_decay": 0.1}
    engine = ps.StepEngine(model.named_parameters(), "AdamW", num_shards=num_shards,
                           config=ps.JobConfig(num_workers=2, clip=ps.ClipConfig(max_norm=0.5)), **kwargs)
    ropt = torch.optim.AdamW(ref.named_parameters(), **kwargs)
    for step in range(4):
        torch.manual_seed(step)
        grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
        for w in range(2):
            grads[w][0] = None  # nobody has a gradient for the first weight this step
        if step % 2:
            grads[1][2] = None  # one worker lacks one: it counts as zeros in the mean
        result = None
        for w in range(2):
            result = engine.push(w, step, grads[w])
        for i, p in enumerate(ref.parameters()):
            parts = [g[i] for g in grads]
            if all(part is None for part in parts):
                p.grad = None
            else:  # the mean in rank order, a missing gradient counting as zeros
                p.grad = (parts[0] if parts[0] is not None else torch.zeros_like(p)).clone()
                p.grad.add_(parts[1] if parts[1] is not None else torch.zeros_like(p)).div_(2)
        total = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.5)
        ropt.step()
        assert result.total_norm == float(total)
    for a, b in zip(engine.parameters(), ref.parameters()):
        assert torch.equal(a, b.detach())
    assert sorted(engine.state_dict()["optimizer"]["state"]) == sorted(ropt.state_dict()["state"]) == [1, 2, 3]


@pytest.mark.parametrize("transport", ["grpc", "shared_memory"])
def test_parity_frozen_parameter_through_the_service(transport):
    model = two_layers()
    model[0].weight.requires_grad_(False)  # frozen but given to the optimizer, as model.parameters() does
    ref = copy.deepcopy(model)
    ropt = torch.optim.AdamW(ref.named_parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randn(8, 4)
    with serve_local(2) as service, RemoteOptimizer(model.named_parameters(), "AdamW", lr=0.1, weight_decay=0.1,
                                                   address=service.address, job="frozen", timeout=30, transport=transport) as opt:
        for _ in range(3):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            ropt.zero_grad()
            ref(x).sum().backward()
            ropt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            assert torch.equal(a, b)
        assert_state_equal(opt.state_dict()["optimizer"], ropt.state_dict())


class WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = torch.nn.Linear(4, 64)
        self.head = torch.nn.Linear(64, 2)
        self.unused = torch.nn.Linear(4, 4)  # trainable, never in the graph

    def forward(self, x):
        return self.head(torch.tanh(self.used(x)))


@pytest.mark.parametrize("transport", ["grpc", "shared_memory"])
@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("split", [None, 256], ids=["whole", "split"])
def test_parity_unused_parameters_follow_zero_grad_set_to_none(set_to_none, split, transport):
    """zero_grad(set_to_none=True): an unused parameter has no gradient and is skipped; set_to_none=False:
    it has a zero gradient and weight decay and momentum move it, exactly as in torch. Split parameters
    (copied in and out of the buffers) are cleared by zero_grad like the others."""
    model = WithUnused()
    ref = copy.deepcopy(model)
    kwargs = {"lr": 0.1, "weight_decay": 0.1, "momentum": 0.9}
    ropt = torch.optim.SGD(ref.named_parameters(), **kwargs)
    x = torch.randn(8, 4)
    with serve_local(3) as service, RemoteOptimizer(model.named_parameters(), "SGD", address=service.address, job="unused",
                                                   split_threshold_bytes=split, timeout=30, transport=transport, **kwargs) as opt:
        if split:
            assert any(opt.plan.is_split(p.index) for p in opt.plan.params)
        for _ in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            model(x).square().mean().backward()
            opt.step()
            ropt.zero_grad(set_to_none=set_to_none)
            ref(x).square().mean().backward()
            ropt.step()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            assert torch.equal(a, b), name
        assert_state_equal(opt.state_dict()["optimizer"], ropt.state_dict())
