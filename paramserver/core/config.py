"""Configuration of a job: dataclasses that say what the step engine does.

User errors in a config raise ``ValueError`` naming the field; the checks run when the dataclass is
built, so a bad config never reaches a shard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

NonFinitePolicy = Literal["skip", "error"]

# Tensors above this size are cut into contiguous pieces across shards, for elementwise optimizers only.
DEFAULT_SPLIT_THRESHOLD_BYTES = 32 * 2**20


@dataclass(frozen=True)
class ClipConfig:
    """Global gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` do it.

    ``max_norm=None`` disables norm clipping; the total norm of order ``norm_type`` is still computed and
    reported every step.
    """

    max_norm: float | None = None
    norm_type: float = 2.0
    error_if_nonfinite: bool = False
    clip_value: float | None = None

    def __post_init__(self) -> None:
        norm_type = float(self.norm_type)
        if math.isnan(norm_type):
            raise ValueError("clip norm_type must be a number or inf, got nan")
        object.__setattr__(self, "norm_type", norm_type)
        if self.max_norm is not None and not (float(self.max_norm) >= 0.0):
            raise ValueError(f"clip max_norm must be >= 0, got {self.max_norm}")
        if self.clip_value is not None and not (float(self.clip_value) >= 0.0):
            raise ValueError(f"clip clip_value must be >= 0, got {self.clip_value}")


@dataclass(frozen=True)
class SchedulerSpec:
    """An LR scheduler to run once, globally, over the job's param groups.

    ``scheduler`` is a class of ``torch.optim.lr_scheduler``, its name ("StepLR"), or "pkg.mod:Class" from a
    trusted module. In ``kwargs``, ``lr_lambda`` may be an import path ("pkg.mod:fn", or a list of them), and
    ``schedulers`` (SequentialLR, ChainedScheduler) is a list of ``SchedulerSpec`` or ``(scheduler, kwargs)``.
    The scheduler steps after every ``interval``-th applied optimizer step.
    """

    scheduler: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    interval: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"scheduler interval must be an integer >= 1, got {self.interval!r}")
        if not isinstance(self.kwargs, dict):
            raise ValueError(f"scheduler kwargs must be a dict, got {type(self.kwargs).__name__}")


@dataclass(frozen=True)
class EngineConfig:
    """How a job's step runs: sharding, workers, clipping, non-finite policy, determinism."""

    num_shards: int = 1
    num_workers: int = 1
    clip: ClipConfig = field(default_factory=ClipConfig)
    nonfinite: NonFinitePolicy = "skip"
    # Sum the workers' gradients in rank order, so the result does not depend on arrival order.
    deterministic: bool = True
    split_threshold_bytes: int | None = DEFAULT_SPLIT_THRESHOLD_BYTES
    # Modules whose Optimizer/LRScheduler classes and lr lambdas may be named by import path.
    trusted_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.num_shards, int) or self.num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {self.num_shards!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {self.num_workers!r}")
        if self.nonfinite not in ("skip", "error"):
            raise ValueError(f"nonfinite must be 'skip' or 'error', got {self.nonfinite!r}")
        if self.split_threshold_bytes is not None and (
            not isinstance(self.split_threshold_bytes, int) or self.split_threshold_bytes < 1
        ):
            raise ValueError(
                f"split_threshold_bytes must be a positive integer or None, got {self.split_threshold_bytes!r}"
            )
        object.__setattr__(self, "trusted_modules", tuple(self.trusted_modules))
