"""The shard's block-by-block work (paramserver.core.blocked) gives torch's own bits: the optimizer step against
torch's default (the single-tensor loop) on a deepcopy, the step's mean against a whole-buffer fold, and a job
larger than a block through the service's shard against local torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch

import paramserver as ps
from paramserver.core import blocked as blocked_module
from paramserver.core.blocked import BLOCK_NUMEL, BlockedStep, mean_in_blocks, ranges

BLOCK = 128  # small blocks: every parameter below is cut into several, with a ragged last piece

# the optimizers run in blocks (kernels.SAME_BITS), with their options that change the elementwise ops
CONFIGS = [
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 1e-2, "maximize": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}),
    (torch.optim.SGD, {"lr": 0.1}),  # no momentum: no state at all
    (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01}),
    (torch.optim.Adamax, {"lr": 1e-2, "weight_decay": 0.01}),
    (torch.optim.Rprop, {"lr": 1e-2}),
    (torch.optim.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.9}),
    (torch.optim.Adadelta, {"lr": 1.0, "weight_decay": 0.01}),
]
SHAPES = [(37, 11), (300,), (5,), (), (129,), (2, 3, 64)]


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, requires_grad=True) for shape in SHAPES]


def _two_groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}]


def _equal_state(a: torch.optim.Optimizer, pa: list[torch.Tensor], b: torch.optim.Optimizer, pb: list[torch.Tensor]) -> None:
    for x, y in zip(pa, pb):
        assert torch.equal(x.detach(), y.detach())
        sa, sb = a.state.get(x, {}), b.state.get(y, {})
        assert sa.keys() == sb.keys()
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS, ids=lambda c: c.__name__ if isinstance(c, type) else ",".join(c))
def test_the_blocked_step_gives_torchs_default_bits(cls, kwargs):
    params = _params()
    reference_params = copy.deepcopy(params)
    reference = cls(_two_groups(reference_params), **kwargs)  # torch's default: foreach=None, the loop on the CPU
    optimizer = cls(_two_groups(params), **kwargs, foreach=True)
    blocked = BlockedStep(optimizer, block_numel=BLOCK)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        scale = torch.tensor(0.5 + 0.1 * step)  # the clip coefficient
        skipped = 4 if step == 3 else None  # a parameter without a gradient in one step: torch skips it
        for i, (p, q) in enumerate(zip(params, reference_params)):
            grad = None if i == skipped else torch.randn(p.shape, generator=gen)
            p.grad, q.grad = grad, None if grad is None else grad.clone()
        with torch.no_grad():
            torch._foreach_mul_([q.grad for q in reference_params if q.grad is not None], scale)
            reference.step()
            blocked.step(scale)
        # the first step too: each piece's new state is gathered into the parameter's
        assert blocked.last_blocked
        _equal_state(optimizer, params, reference, reference_params)


@pytest.mark.parametrize(("cls", "kwargs"), [(torch.optim.SGD, {"lr": 0.1}), (torch.optim.Adam, {"lr": 1e-2})], ids=["SGD", "Adam"])
def test_gradients_in_place_reuse_the_plan_from_the_first_step_on(cls, kwargs):
    # a shard's gradients are views of its fixed buffers: the plan of the first step runs again as long as no state
    # was made (plain SGD keeps none) and is rebuilt once it was (Adam's first step)
    params = _params()
    reference_params = copy.deepcopy(params)
    reference = cls(reference_params, **kwargs)
    optimizer = cls(params, **kwargs, foreach=True)
    blocked = BlockedStep(optimizer, block_numel=BLOCK)
    for p in params:
        p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p, q in zip(params, reference_params):
            p.grad.copy_(torch.randn(p.shape, generator=gen))
            q.grad = p.grad.clone()
        with torch.no_grad():
            reference.step()
            blocked.step()
        assert blocked.last_blocked
        _equal_state(optimizer, params, reference, reference_params)


def test_a_loaded_state_is_what_the_blocks_update():
    params = _params()
    reference_params = copy.deepcopy(params)
    reference = torch.optim.Adam(reference_params, lr=1e-2)
    optimizer = torch.optim.Adam(params, lr=1e-2, foreach=True)
    blocked = BlockedStep(optimizer, block_numel=BLOCK)
    gen = torch.Generator().manual_seed(2)

    def step() -> None:
        for p, q in zip(params, reference_params):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        with torch.no_grad():
            reference.step()
            blocked.step()

    for _ in range(3):
        step()
    saved = copy.deepcopy(reference.state_dict())
    for _ in range(2):
        step()
    # both go back to the saved state: the blocks must now update the loaded tensors, not the old ones
    reference.load_state_dict(saved)
    optimizer.load_state_dict(copy.deepcopy(saved))  # its own tensors: torch keeps a loaded step count as it is
    for _ in range(2):
        step()
        assert blocked.last_blocked
    _equal_state(optimizer, params, reference, reference_params)
    assert float(optimizer.state[params[0]]["step"]) == 5


def test_small_work_and_unsupported_state_run_whole():
    small = [torch.randn(10, requires_grad=True)]
    optimizer = torch.optim.Adam(small, lr=1e-2, foreach=True)
    blocked = BlockedStep(optimizer, block_numel=BLOCK)
    for _ in range(2):
        small[0].grad = torch.ones(10)
        blocked.step()
        assert not blocked.last_blocked  # less than one block
    big = [torch.randn(1000, requires_grad=True)]
    optimizer = torch.optim.SGD(big, lr=0.1, foreach=True)
    optimizer.state[big[0]]["momentum_buffer"] = torch.zeros(10)  # state of another shape: cannot be cut
    blocked = BlockedStep(optimizer, block_numel=BLOCK)
    big[0].grad = torch.ones(1000)
    blocked.step()
    assert not blocked.last_blocked


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blocked_mean_is_the_whole_fold(dtype, threads, workers, monkeypatch):
    """Whichever thread folds a block, and however the blocks are split among threads (3 threads, 4 blocks); the
    first two contributions added in one op and a power-of-two divisor as a product give the fold's bits."""
    monkeypatch.setattr(blocked_module, "MEAN_THREADS", threads)
    monkeypatch.setattr(blocked_module, "_pool", None)
    gen = torch.Generator().manual_seed(3)
    numels = [2 * BLOCK_NUMEL + 1000, 77]
    contributions = [[torch.randn(n, generator=gen).to(dtype) for n in numels] for _ in range(workers)]
    contributions[0][1][:4] = torch.tensor([1e-45, -3e-45, 2e-38, 3e38])  # denormal and near-overflow elements
    whole = [torch.zeros(n) for n in numels]
    for i, total in enumerate(whole):
        total.copy_(contributions[0][i])
        for c in contributions[1:]:
            total.add_(c[i])
        if workers > 1:
            total.div_(workers)
    blocked = [torch.empty(n) for n in numels]
    mean_in_blocks(blocked, contributions, workers)
    assert all(torch.equal(a, b) for a, b in zip(whole, blocked))
    mean_in_blocks([], [[]], 3)  # no tensors: nothing to fold
    assert ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_a_shard_larger_than_a_block_trains_as_torch_optim():
    """Through the shard with its default block size: 2 workers, Adam in two groups, clipping, bit for bit."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 640), torch.nn.ReLU(), torch.nn.Linear(640, 10))
    local = copy.deepcopy(model)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": 3e-3}]
    engine = ps.StepEngine(groups, "Adam", lr=1e-2, config=ps.JobConfig(num_workers=2, clip=ps.ClipConfig(max_norm=0.5)))
    local_groups = [{"params": list(local[0].parameters())}, {"params": list(local[2].parameters()), "lr": 3e-3}]
    reference = torch.optim.Adam(local_groups, lr=1e-2)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        grads = [[torch.randn(p.shape, generator=gen) for p in local.parameters()] for _ in range(2)]
        for w in range(2):
            engine.push(w, step, grads[w])
        for p, g0, g1 in zip(local.parameters(), *grads):
            p.grad = (g0.clone() + g1) / 2
        torch.nn.utils.clip_grad_norm_(local.parameters(), 0.5)
        reference.step()
        assert all(torch.equal(a, b) for a, b in zip(engine.parameters(), local.parameters()))
    shard = engine.shards.shards[0]
    assert shard.stepper is not None and shard.stepper.last_blocked
    state = engine.state_dict()["optimizer"]["state"]
    for i, p in enumerate(local.parameters()):
        assert torch.equal(state[i]["exp_avg_sq"], reference.state[p]["exp_avg_sq"])
        assert float(state[i]["step"]) == 4
