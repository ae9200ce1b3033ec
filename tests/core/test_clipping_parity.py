"""Clipping through the engine equals torch.nn.utils clipping: every norm type, value clipping, mixed dtypes,
the reported total norm, and concurrent pushes from threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import paramserver as ps
from tests.helpers.reference import (
    Reference,
    assert_state_equal,
    make_model,
    mean_of,
    push_step,
    worker_grads,
)

STEPS = 20


def run_pair(model, clip, num_shards=3, num_workers=3, split=None, optimizer=torch.optim.SGD, kwargs=None):
    kwargs = kwargs or {"lr": 0.05, "momentum": 0.9}
    ref_model = copy.deepcopy(model)
    engine = ps.StepEngine(
        model.named_parameters(),
        optimizer,
        num_shards=num_shards, config=ps.JobConfig(num_workers=num_workers, clip=clip, split_threshold_bytes=split),
        **kwargs,
    )
    ref = Reference(ref_model.named_parameters(), optimizer, kwargs, clip=clip)
    norms = []
    for t in range(STEPS):
        grads = worker_grads(ref.params, t, num_workers, seed=3)
        result = push_step(engine, t, grads)
        # what torch reports as the total norm of the (value-clipped) mean
        mean = mean_of(grads)
        if clip.clip_value is not None:
            for m in mean:
                m.clamp_(-clip.clip_value, clip.clip_value)
        norms.append((result.total_norm, float(torch.nn.utils.get_total_norm(mean, clip.norm_type))))
        ref.step(grads)
    return engine, ref, norms


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, 0.5, float("inf"), 0.0])
def test_parity_clip_grad_norm_every_norm_type_bitwise(norm_type):
    clip = ps.ClipConfig(max_norm=0.5 if norm_type else 100.0, norm_type=norm_type)
    engine, ref, norms = run_pair(make_model(), clip)
    for got, want in norms:
        assert got == want
    for got, want in zip(engine.parameters(), ref.params):
        assert torch.equal(got, want.detach())
    assert_state_equal(engine.state_dict()["optimizer"], ref.optimizer.state_dict())


def test_a_coefficient_of_one_skips_the_product_and_keeps_the_bits(monkeypatch):
    """Where the norm is within max_norm the coefficient is exactly 1 and the shards run no product (torch
    multiplies by it anyway); where it is above, they scale by it. Both bitwise as torch."""
    clip = ps.ClipConfig(max_norm=20.0)  # the mean gradients' 2-norm is 23..27, halved on even steps
    model = make_model()
    kwargs = {"lr": 0.01}
    ref = Reference(copy.deepcopy(model).named_parameters(), torch.optim.Adam, kwargs, clip=clip)
    engine = ps.StepEngine(model.named_parameters(), "Adam", num_shards=2, config=ps.JobConfig(num_workers=3, clip=clip), **kwargs)
    scales = []
    for shard in engine.shards.shards:
        run = shard.stepper.step
        monkeypatch.setattr(shard.stepper, "step", lambda coef, run=run: (scales.append(coef), run(coef))[1])
    coefs = []
    for t in range(STEPS):
        grads = worker_grads(ref.params, t, 3, seed=3, scale=0.5 if t % 2 == 0 else 1.0)
        coefs.append(push_step(engine, t, grads).clip_coef)
        ref.step(grads)
    assert 0 < coefs.count(1.0) < STEPS, coefs
    assert [c is None for c in scales] == [c == 1.0 for c in coefs for _ in range(2)]
    for got, want in zip(engine.parameters(), ref.params):
        assert torch.equal(got, want.detach())
    assert_state_equal(engine.state_dict()["optimizer"], ref.optimizer.state_dict())


@pytest.mark.parametrize("clip", [ps.ClipConfig(clip_value=0.3), ps.ClipConfig(clip_value=0.3, max_norm=1.0)])
def test_parity_clip_grad_value(clip):
    engine, ref, norms = run_pair(make_model(), clip)
    for got, want in zip(engine.parameters(), ref.params):
        assert torch.equal(got, want.detach())
    assert all(got == want for got, want in norms)


@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_parity_clipping_with_split_tensors(norm_type):
    # A split tensor's norm is rebuilt from its pieces' norms: exact for inf, equal up to rounding for p=2.
    clip = ps.ClipConfig(max_norm=0.5, norm_type=norm_type)
    engine, ref, norms = run_pair(make_model(), clip, split=64, optimizer=torch.optim.Adam, kwargs={"lr": 0.01})
    assert any(engine.plan.is_split(p.index) for p in engine.plan.params)
    tol = 0.0 if norm_type == float("inf") else 1e-6
    for got, want in norms:
        assert abs(got - want) <= tol * abs(want)
    for got, want in zip(engine.parameters(), ref.params):
        torch.testing.assert_close(got, want.detach(), rtol=tol, atol=tol * 1e-2)


def test_parity_clipping_over_mixed_dtypes_stacks_norms_as_torch_does():
    model = make_model()
    model[2].to(torch.float64)  # a middle layer in double precision: torch groups norms by dtype
    model[4].to(torch.float64)
    clip = ps.ClipConfig(max_norm=0.5)
    engine, ref, norms = run_pair(model, clip)
    for got, want in norms:
        assert got == want
    for got, want in zip(engine.parameters(), ref.params):
        assert got.dtype == want.dtype
        assert torch.equal(got, want.detach())


def test_parity_error_if_nonfinite_reports_and_skips():
    model = make_model()
    engine = ps.StepEngine(model.named_parameters(), "SGD", lr=0.1, config=ps.JobConfig(clip=ps.ClipConfig(max_norm=1.0, error_if_nonfinite=True)))
    before = engine.parameters()
    grads = [torch.full_like(p, float("inf")) for p in model.parameters()]
    result = engine.push(0, 0, grads)
    assert result.skipped and "non-finite" in result.error
    assert engine.version == 1 and engine.skipped_steps == 1
    for a, b in zip(before, engine.parameters()):
        assert torch.equal(a, b)


def test_parity_concurrent_pushes_from_threads_are_deterministic():
    """Workers pushing from threads in any interleaving give bitwise the result of rank-order summation."""
    model = make_model()
    ref_model = copy.deepcopy(model)
    kwargs = {"lr": 0.01}
    num_workers = 4
    engine = ps.StepEngine(model.named_parameters(), "Adam", num_shards=3, config=ps.JobConfig(num_workers=num_workers), **kwargs)
    ref = Reference(ref_model.named_parameters(), torch.optim.Adam, kwargs)
    for t in range(10):
        grads = worker_grads(ref.params, t, num_workers, seed=5)
        barrier = threading.Barrier(num_workers)

        def work(w: int) -> None:
            barrier.wait(timeout=10)
            engine.push(w, t, grads[w])

        threads = [threading.Thread(target=work, args=(w,)) for w in reversed(range(num_workers))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=30)
        assert engine.version == t + 1
        ref.step(grads)
    for got, want in zip(engine.parameters(), ref.params):
        assert torch.equal(got, want.detach())
