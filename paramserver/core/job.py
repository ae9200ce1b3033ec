"""A job, resolved and validated: its parameters, optimizer class, configuration, plan and schedule."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from paramserver.core.config import JobConfig
from paramserver.core.params import ParamGroups, normalize_params
from paramserver.core.policy import quorum
from paramserver.core.registry import is_elementwise, resolve_optimizer
from paramserver.core.scheduling import Schedule, build_shadow_optimizer
from paramserver.core.shard import Shard
from paramserver.core.sharding import ShardingPlan, make_plan, pack


@dataclass
class JobSpec:
    """Everything that defines a job, resolved and validated: the shards and the coordinator are built from it."""

    params: ParamGroups
    optimizer_cls: type
    config: JobConfig  # its ``groups`` are the params' group options
    plan: ShardingPlan
    schedule: Schedule = field(repr=False)

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        return self.config.optimizer.kwargs

    @classmethod
    def build(cls, params: Any, config: JobConfig, num_shards: int, trusted_modules: Sequence[str] = ()) -> JobSpec:
        """Resolve ``config`` for ``params`` (tensors, or meta tensors of a job described on the wire) over
        ``num_shards`` shards; raises ``ValueError`` naming the problem."""
        if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
            raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
        groups = normalize_params(params)
        if config.groups and list(config.groups) != groups.group_options:
            raise ValueError("the config's group options differ from the params' groups; give them in one place")
        config = config.replace(groups=tuple(groups.group_options))
        trusted_modules = tuple(trusted_modules)
        optimizer_cls = resolve_optimizer(config.optimizer.name, trusted_modules)
        shadow = build_shadow_optimizer(optimizer_cls, groups, config.optimizer.kwargs)
        schedule = Schedule(shadow, config.scheduler, trusted_modules)
        elementwise = is_elementwise(optimizer_cls)
        threshold = config.split_threshold_bytes
        if not elementwise and threshold is not None and num_shards > 1:
            big = [p.key for p in groups.params if p.nbytes > threshold]
            if big:
                warnings.warn(
                    f"{optimizer_cls.__name__} is not elementwise, so tensors {big} above split_threshold_bytes="
                    f"{threshold} stay whole on one shard",
                    stacklevel=3,
                )
        plan = make_plan(groups.params, num_shards, threshold, allow_split=elementwise)
        return cls(groups, optimizer_cls, config, plan, schedule)

    def make_shard(self, shard_id: int, device: str | torch.device = "cpu") -> Shard:
        """Shard ``shard_id`` of this job; built from a description alone (meta tensors) it waits for its
        initial weights (``Shard.load_weights``)."""
        described_only = any(t.is_meta for t in self.params.tensors)
        weights = (
            [torch.zeros(layout.numel, dtype=layout.dtype) for layout in self.plan.buffers(shard_id)]
            if described_only
            else pack(self.plan, shard_id, self.params.tensors)
        )
        return Shard(
            shard_id,
            self.plan,
            weights,
            self.optimizer_cls,
            self.params.group_options,
            self.optimizer_kwargs,
            num_workers=self.config.workers_limit,
            members=range(self.config.num_workers),
            quorum=quorum(self.config),
            mode=self.config.step_mode,
            max_staleness=self.config.max_staleness,
            deterministic=self.config.deterministic,
            reject_nonfinite=self.config.nonfinite == "error",
            device=device,
            initialized=not described_only,
            grad_dtype=self.config.grad_dtype,
            clip=(self.config.clip.norm_type, self.config.clip.clip_value),
        )
