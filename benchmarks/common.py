"""What every benchmark shares: the model, its data, timing and memory helpers."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable

import torch
from torch import nn

# Every Ray process stays on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

INPUT, CLASSES = 1024, 10


def make_mlp(seed: int = 0) -> nn.Module:
    """The ~9.4M-parameter MLP of the end-to-end benchmarks."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(INPUT, 3072), nn.ReLU(), nn.Linear(3072, 1536), nn.ReLU(), nn.Linear(1536, 1024), nn.ReLU(), nn.Linear(1024, CLASSES)
    )


def batch(step: int, rank: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch for (step, rank): the same in every peer, so they do the same compute."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randn(size, INPUT, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rate(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Calls of ``fn`` per second over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
