"""The reference the parity suite compares against: local torch.optim on a deepcopy of the model.

Each step's gradient is the mean of the W workers' gradients (summed in rank order, then divided by W, as
the engine's deterministic mode does), then ``clip_grad_value_`` / ``clip_grad_norm_``,
``optimizer.step()``, and ``scheduler.step()`` every ``interval`` steps.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import paramserver as ps


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small model whose tensors have many sizes (1 element up to a few hundred)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 17),
        nn.Tanh(),
        nn.Linear(17, 11),
        nn.LayerNorm(11),
        nn.Linear(11, 4),
        nn.Linear(4, 1),
    )
    return model.to(dtype)


def worker_grads(params: Sequence[torch.Tensor], step: int, num_workers: int, seed: int = 0, scale: float = 1.0) -> list[list[torch.Tensor]]:
    """Gradients of each worker for ``step``: random, different per worker and step, reproducible."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101)
    return [
        [torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (1 + w) for p in params]
        for w in range(num_workers)
    ]


def mean_of(grads_per_worker: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    out = [g.clone() for g in grads_per_worker[0]]
    for grads in grads_per_worker[1:]:
        for o, g in zip(out, grads):
            o.add_(g)
    if len(grads_per_worker) > 1:
        for o in out:
            o.div_(len(grads_per_worker))
    return out


class Reference:
    """Local training with torch.optim: the behaviour the service must reproduce."""

    def __init__(
        self,
        params: Any,
        optimizer_cls: type,
        optimizer_kwargs: dict[str, Any],
        clip: ps.ClipConfig = ps.ClipConfig(),
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        interval: int = 1,
    ) -> None:
        self.optimizer = optimizer_cls(params, **copy.deepcopy(optimizer_kwargs))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.clip = clip
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.interval = interval
        self.applied = 0
        self.metrics: list[float] = []

    def step(self, grads_per_worker: Sequence[Sequence[torch.Tensor]], metric: float | None = None) -> None:
        for p, g in zip(self.params, mean_of(grads_per_worker)):
            p.grad = g
        if self.clip.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, self.clip.clip_value)
        if self.clip.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip.max_norm, self.clip.norm_type)
        self.optimizer.step()
        self.applied += 1
        if metric is not None:
            self.metrics.append(metric)
        if self.scheduler is not None and self.applied % self.interval == 0:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(sum(self.metrics) / len(self.metrics))
            else:
                self.scheduler.step()
            self.metrics.clear()


def push_step(engine: ps.StepEngine, step: int, grads_per_worker: Sequence[Sequence[torch.Tensor]], metrics: Sequence[float] | None = None, order: Sequence[int] | None = None) -> ps.StepResult:
    """Push every worker's gradients for ``step`` (in ``order``, default rank order) and return the result."""
    result = None
    for w in order if order is not None else range(len(grads_per_worker)):
        result = engine.push(w, step, grads_per_worker[w], metric=None if metrics is None else metrics[w])
    assert result is not None, "the last push closes the step"
    return result


def assert_state_equal(actual: Any, expected: Any, rtol: float = 0.0, atol: float = 0.0, path: str = "") -> None:
    """Nested equality of state dicts; tensors bitwise when rtol == atol == 0."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: expected a tensor, got {type(actual).__name__}"
        assert actual.shape == expected.shape, f"{path}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        if rtol == 0.0 and atol == 0.0:
            assert torch.equal(actual, expected), f"{path}: max diff {(actual - expected).abs().max().item()}"
        else:
            torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{path}: {m}")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{path}: expected a dict, got {type(actual).__name__}"
        assert set(actual) == set(expected), f"{path}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for k in expected:
            assert_state_equal(actual[k], expected[k], rtol, atol, f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{path}: {actual!r} != {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_state_equal(a, e, rtol, atol, f"{path}[{i}]")
    elif isinstance(expected, float) and (rtol or atol):
        assert abs(actual - expected) <= atol + rtol * abs(expected), f"{path}: {actual} != {expected}"
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def run_threads(num_workers: int, fn: Callable[[int], Any], timeout: float = 120.0) -> None:
    """Run ``fn(rank)`` for every rank in its own thread; re-raise the first failure; fail on a hang."""
    errors: list[BaseException] = []

    def guarded(rank: int) -> None:
        try:
            fn(rank)
        except BaseException as exc:  # surface a worker's failure in the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(r,)) for r in range(num_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    if errors:
        raise errors[0]
