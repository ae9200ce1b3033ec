"""Parity of the global LR scheduler: every torch scheduler, run by the engine over its shadow optimizer, gives
step for step the lr (and momentum / betas where cycled) trajectory, weights and scheduler state of local
torch.optim training with the same scheduler.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as L

import paramserver as ps
from tests.helpers import lr_lambdas
from tests.helpers.reference import (
    Reference,
    assert_state_equal,
    make_model,
    push_step,
    worker_grads,
)

STEPS = 24


def build_params(model: torch.nn.Module, lrs: tuple[float, float] | None, named: bool) -> list[Any]:
    """The model's parameters, plain or named; with ``lrs``, two groups (weights, then biases and norms) whose
    order differs from the model's, so the index numbering runs in group order."""
    items = list(model.named_parameters()) if named else list(model.parameters())
    if lrs is None:
        return items
    names = [n for n, _ in model.named_parameters()]
    weights = [it for n, it in zip(names, items) if n.endswith("weight") and n != "3.weight"]
    others = [it for n, it in zip(names, items) if not (n.endswith("weight") and n != "3.weight")]
    return [{"params": weights, "lr": lrs[0]}, {"params": others, "lr": lrs[1]}]


def worker_metrics(step: int, num_workers: int) -> list[float]:
    """Each worker's loss for ``step``: falls for 6 steps, then plateaus with a little noise, so
    ReduceLROnPlateau reduces the lr several times within the run."""
    base = 2.0 - 0.2 * step if step < 6 else 0.8 + 0.01 * ((step * 7) % 3)
    return [base + 0.05 * w for w in range(num_workers)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)  # as the engine averages the workers' metrics, in rank order


@dataclass(frozen=True)
class Case:
    id: str
    optimizer: type
    kwargs: dict[str, Any]
    spec: ps.SchedulerSpec
    reference: Callable[[torch.optim.Optimizer], Any]
    lrs: tuple[float, float] | None = (0.1, 0.02)  # two param groups with these lrs; None: one group
    named: bool = True
    shards: int = 2
    workers: int = 3
    metric: bool = False
    cycles: str | None = None  # "momentum" or "betas": also checked to change along the run
    order: tuple[int, ...] | None = None  # the workers' push order (default rank order)


SGDM = (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9})
ADAM = (torch.optim.Adam, {"lr": 0.01})

CASES = [
    Case("StepLR", *SGDM, ps.SchedulerSpec("StepLR", {"step_size": 4, "gamma": 0.5}),
         lambda o: L.StepLR(o, step_size=4, gamma=0.5), order=(2, 0, 1)),
    Case("StepLR-interval3", *ADAM, ps.SchedulerSpec("StepLR", {"step_size": 2, "gamma": 0.7}, interval=3),
         lambda o: L.StepLR(o, step_size=2, gamma=0.7), lrs=None, named=False, shards=3, workers=1),
    Case("MultiStepLR", *SGDM, ps.SchedulerSpec(L.MultiStepLR, {"milestones": [3, 7, 12], "gamma": 0.3}),
         lambda o: L.MultiStepLR(o, milestones=[3, 7, 12], gamma=0.3), named=False, shards=3),
    Case("ExponentialLR-interval2", *ADAM, ps.SchedulerSpec("ExponentialLR", {"gamma": 0.9}, interval=2),
         lambda o: L.ExponentialLR(o, gamma=0.9)),
    Case("CosineAnnealingLR", *SGDM, ps.SchedulerSpec("CosineAnnealingLR", {"T_max": 8, "eta_min": 1e-3}),
         lambda o: L.CosineAnnealingLR(o, T_max=8, eta_min=1e-3), shards=3, workers=1),
    Case("CosineAnnealingWarmRestarts", *ADAM,
         ps.SchedulerSpec("CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 2, "eta_min": 1e-4}),
         lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=1e-4), named=False),
    Case("LinearLR-interval2", *SGDM, ps.SchedulerSpec("LinearLR", {"start_factor": 0.25, "total_iters": 6}, interval=2),
         lambda o: L.LinearLR(o, start_factor=0.25, total_iters=6), lrs=None),
    Case("ConstantLR", *ADAM, ps.SchedulerSpec("ConstantLR", {"factor": 0.5, "total_iters": 5}),
         lambda o: L.ConstantLR(o, factor=0.5, total_iters=5), shards=3),
    Case("PolynomialLR", *SGDM, ps.SchedulerSpec("PolynomialLR", {"total_iters": 15, "power": 2.0}),
         lambda o: L.PolynomialLR(o, total_iters=15, power=2.0), named=False),
    Case("OneCycleLR-SGD-momentum", *SGDM,
         ps.SchedulerSpec("OneCycleLR", {"max_lr": [0.5, 0.1], "total_steps": 25, "cycle_momentum": True,
                                         "base_momentum": 0.8, "max_momentum": 0.95}),
         lambda o: L.OneCycleLR(o, max_lr=[0.5, 0.1], total_steps=25, cycle_momentum=True,
                                base_momentum=0.8, max_momentum=0.95), shards=3, cycles="momentum"),
    Case("OneCycleLR-Adam-betas-interval2", *ADAM,
         ps.SchedulerSpec("OneCycleLR", {"max_lr": [0.05, 0.01], "total_steps": 13, "three_phase": True,
                                         "anneal_strategy": "linear", "cycle_momentum": True}, interval=2),
         lambda o: L.OneCycleLR(o, max_lr=[0.05, 0.01], total_steps=13, three_phase=True, anneal_strategy="linear",
                                cycle_momentum=True), cycles="betas"),
    Case("OneCycleLR-Adam-betas", *ADAM,
         ps.SchedulerSpec("OneCycleLR", {"max_lr": [0.05, 0.02], "total_steps": 24, "cycle_momentum": True,
                                         "base_momentum": [0.8, 0.85], "max_momentum": 0.95}),
         lambda o: L.OneCycleLR(o, max_lr=[0.05, 0.02], total_steps=24, cycle_momentum=True,
                                base_momentum=[0.8, 0.85], max_momentum=0.95),
         named=False, shards=3, workers=1, cycles="betas"),
    Case("CyclicLR-SGD-momentum", *SGDM,
         ps.SchedulerSpec("CyclicLR", {"base_lr": [0.01, 0.001], "max_lr": [0.1, 0.01], "step_size_up": 4,
                                       "mode": "triangular2", "cycle_momentum": True,
                                       "base_momentum": 0.8, "max_momentum": 0.9}),
         lambda o: L.CyclicLR(o, base_lr=[0.01, 0.001], max_lr=[0.1, 0.01], step_size_up=4, mode="triangular2",
                              cycle_momentum=True, base_momentum=0.8, max_momentum=0.9), cycles="momentum"),
    Case("CyclicLR-exp_range-interval2", *SGDM,
         ps.SchedulerSpec("CyclicLR", {"base_lr": 0.01, "max_lr": 0.1, "step_size_up": 2, "step_size_down": 3,
                                       "mode": "exp_range", "gamma": 0.9, "cycle_momentum": True}, interval=2),
         lambda o: L.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2, step_size_down=3, mode="exp_range",
                              gamma=0.9, cycle_momentum=True),
         lrs=None, named=False, shards=3, workers=1, cycles="momentum"),
    Case("LambdaLR-path", *ADAM, ps.SchedulerSpec("LambdaLR", {"lr_lambda": "tests.helpers.lr_lambdas:warmup"}),
         lambda o: L.LambdaLR(o, lr_lambda=lr_lambdas.warmup), lrs=None),
    Case("LambdaLR-list-interval2", *SGDM,
         ps.SchedulerSpec("LambdaLR", {"lr_lambda": ["tests.helpers.lr_lambdas:halving", "tests.helpers.lr_lambdas:warmup_object"]},
                          interval=2),
         lambda o: L.LambdaLR(o, lr_lambda=[lr_lambdas.halving, lr_lambdas.warmup_object]), named=False, shards=3),
    Case("MultiplicativeLR-path", *SGDM,
         ps.SchedulerSpec("MultiplicativeLR", {"lr_lambda": "tests.helpers.lr_lambdas:every_third"}),
         lambda o: L.MultiplicativeLR(o, lr_lambda=lr_lambdas.every_third), workers=1),
    Case("MultiplicativeLR-list-interval3", *ADAM,
         ps.SchedulerSpec("MultiplicativeLR", {"lr_lambda": ["tests.helpers.lr_lambdas:shrink", "tests.helpers.lr_lambdas:every_third"]},
                          interval=3),
         lambda o: L.MultiplicativeLR(o, lr_lambda=[lr_lambdas.shrink, lr_lambdas.every_third]), shards=3),
    Case("SequentialLR", *SGDM,
         ps.SchedulerSpec("SequentialLR", {
             "schedulers": [ps.SchedulerSpec("LinearLR", {"start_factor": 0.1, "total_iters": 4}),
                            ("ExponentialLR", {"gamma": 0.85})],
             "milestones": [4]}),
         lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.1, total_iters=4), L.ExponentialLR(o, gamma=0.85)],
                                  milestones=[4])),
    Case("SequentialLR-three-interval2", *ADAM,
         ps.SchedulerSpec("SequentialLR", {
             "schedulers": [("ConstantLR", {"factor": 0.5, "total_iters": 3}),
                            ps.SchedulerSpec("CosineAnnealingLR", {"T_max": 4}),
                            ("StepLR", {"step_size": 2, "gamma": 0.5})],
             "milestones": [3, 7]}, interval=2),
         lambda o: L.SequentialLR(o, [L.ConstantLR(o, factor=0.5, total_iters=3), L.CosineAnnealingLR(o, T_max=4),
                                      L.StepLR(o, step_size=2, gamma=0.5)], milestones=[3, 7]),
         named=False, shards=3, workers=1),
    Case("ChainedScheduler", *SGDM,
         ps.SchedulerSpec("ChainedScheduler", {
             "schedulers": [("ConstantLR", {"factor": 0.5, "total_iters": 6}),
                            ps.SchedulerSpec("ExponentialLR", {"gamma": 0.9})]}),
         lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=6), L.ExponentialLR(o, gamma=0.9)]),
         shards=3, order=(1, 2, 0)),
    Case("ChainedScheduler-interval3", *ADAM,
         ps.SchedulerSpec("ChainedScheduler", {
             "schedulers": [ps.SchedulerSpec("MultiStepLR", {"milestones": [2, 4], "gamma": 0.5}),
                            ("LambdaLR", {"lr_lambda": "tests.helpers.lr_lambdas:warmup"})]}, interval=3),
         lambda o: L.ChainedScheduler([L.MultiStepLR(o, milestones=[2, 4], gamma=0.5),
                                       L.LambdaLR(o, lr_lambda=lr_lambdas.warmup)]),
         named=False, workers=1),
    Case("ReduceLROnPlateau", *SGDM,
         ps.SchedulerSpec("ReduceLROnPlateau", {"mode": "min", "factor": 0.5, "patience": 1, "threshold": 1e-3,
                                                "cooldown": 1, "min_lr": [1e-3, 1e-4]}),
         lambda o: L.ReduceLROnPlateau(o, mode="min", factor=0.5, patience=1, threshold=1e-3, cooldown=1,
                                       min_lr=[1e-3, 1e-4]), metric=True),
    Case("ReduceLROnPlateau-interval3", *ADAM,
         ps.SchedulerSpec("ReduceLROnPlateau", {"mode": "min", "factor": 0.3, "patience": 0}, interval=3),
         lambda o: L.ReduceLROnPlateau(o, mode="min", factor=0.3, patience=0), named=False, shards=3, metric=True),
    Case("ReduceLROnPlateau-interval2-one-worker", *SGDM,
         ps.SchedulerSpec("ReduceLROnPlateau", {"mode": "max", "factor": 0.5, "patience": 1, "threshold_mode": "abs"},
                          interval=2),
         lambda o: L.ReduceLROnPlateau(o, mode="max", factor=0.5, patience=1, threshold_mode="abs"),
         lrs=None, workers=1, metric=True),
]

CYCLED = ("lr", "momentum", "betas")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scheduler_parity(case: Case) -> None:
    model = make_model(seed=3)
    ref_model = copy.deepcopy(model)
    config = ps.JobConfig(num_workers=case.workers, split_threshold_bytes=64)
    engine = ps.StepEngine(build_params(model, case.lrs, case.named), case.optimizer, config=config,
                           num_shards=case.shards, trusted_modules=("tests",),
                           scheduler=case.spec, **case.kwargs)
    ref = Reference(build_params(ref_model, case.lrs, case.named), case.optimizer, case.kwargs,
                    scheduler=case.reference, interval=case.spec.interval)
    num_groups = 1 if case.lrs is None else 2

    def check(where: str) -> None:
        ref_groups = ref.optimizer.state_dict()["param_groups"]
        lrs = [g["lr"] for g in ref.optimizer.param_groups]
        assert engine.get_last_lr() == lrs, where
        assert_state_equal(engine.state_dict()["optimizer"]["param_groups"], ref_groups, path=f"{where} param_groups")
        for i, (a, b) in enumerate(zip(engine.parameters(), ref.params, strict=True)):
            same = torch.equal(a, b.detach())
            assert same, f"{where}: parameter {i} differs, max diff {(a - b.detach()).abs().max().item()}"

    check("before step 0")
    trajectory = [[{k: g[k] for k in CYCLED if k in g} for g in ref.optimizer.param_groups]]
    for t in range(STEPS):
        grads = worker_grads(ref.params, t, case.workers, seed=5)
        metrics = worker_metrics(t, case.workers) if case.metric else None
        result = push_step(engine, t, grads, metrics, order=case.order)
        ref.step(grads, mean(metrics) if metrics is not None else None)
        assert not result.skipped and result.step == t
        assert result.lrs == [g["lr"] for g in ref.optimizer.param_groups], f"step {t}"
        check(f"after step {t}")
        trajectory.append([{k: g[k] for k in CYCLED if k in g} for g in ref.optimizer.param_groups])

    # the run is not degenerate: every group's lr changed, and so did the cycled momentum / betas
    assert len(trajectory[0]) == num_groups
    for g in range(num_groups):
        assert len({step[g]["lr"] for step in trajectory}) > 1, f"group {g}: lr never changed"
        if case.cycles is not None:
            assert len({step[g][case.cycles] for step in trajectory}) > 2, f"group {g}: {case.cycles} not cycled"
    if case.lrs is not None:
        assert any(step[0]["lr"] != step[1]["lr"] for step in trajectory), "the two groups ran the same lrs"

    final = engine.state_dict()
    assert_state_equal(final["scheduler"], ref.scheduler.state_dict(), path="scheduler")
    assert_state_equal(final["optimizer"], ref.optimizer.state_dict(), path="optimizer")
    assert engine.version == STEPS and engine.skipped_steps == 0


def test_scheduler_parity_reduce_on_plateau_needs_metric() -> None:
    """Without a metric a ReduceLROnPlateau job refuses the push and nothing changes."""
    model = make_model(seed=3)
    engine = ps.StepEngine(model.parameters(), "SGD", num_shards=2, config=ps.JobConfig(num_workers=3),
                           scheduler=ps.SchedulerSpec("ReduceLROnPlateau", {"patience": 0}), lr=0.1)
    grads = worker_grads(list(model.parameters()), 0, 3)
    before = engine.state_dict()
    with pytest.raises(ValueError):
        engine.push(0, 0, grads[0])
    with pytest.raises(ValueError):
        engine.push(0, 0, grads[0], metric="low")  # type: ignore[arg-type]
    assert_state_equal(engine.state_dict(), before)
    # the worker may push again, with a metric
    assert engine.push(0, 0, grads[0], metric=1.0) is None
    assert engine.push(1, 0, grads[1], metric=1.0) is None
    assert engine.push(2, 0, grads[2], metric=1.0) is not None


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_scheduler_parity_plateau_metric_mean_in_rank_order(order: tuple[int, ...]) -> None:
    """The workers' metrics are averaged as the gradients are, in rank order, so ReduceLROnPlateau's state does
    not depend on the order in which the pushes arrive (float addition is not associative)."""
    metrics = [0.1, 0.2, 0.3]  # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floats
    model = make_model(seed=3)
    ref_model = copy.deepcopy(model)
    spec = ps.SchedulerSpec("ReduceLROnPlateau", {"patience": 0, "factor": 0.5})
    engine = ps.StepEngine(build_params(model, (0.1, 0.02), True), "SGD",
                           num_shards=2, config=ps.JobConfig(num_workers=3), scheduler=spec, lr=0.1)
    ref = Reference(build_params(ref_model, (0.1, 0.02), True), torch.optim.SGD, {"lr": 0.1},
                    scheduler=lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5))
    for t in range(4):
        grads = worker_grads(ref.params, t, 3)
        push_step(engine, t, grads, metrics, order=order)
        ref.step(grads, mean(metrics))
    assert ref.scheduler.state_dict()["best"] == mean(metrics)
    assert_state_equal(engine.state_dict()["scheduler"], ref.scheduler.state_dict(), path="scheduler")
    assert engine.get_last_lr() == [g["lr"] for g in ref.optimizer.param_groups]
