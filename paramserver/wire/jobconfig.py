"""A job's definition on the wire (``JobConfig``) and back: what rank 0 sends, what the server builds from it.

The server's own settings (number of shards, trusted modules) are never taken from the wire.
"""

from __future__ import annotations

from typing import Any

import torch

from paramserver.core.config import ClipConfig, EngineConfig, SchedulerSpec
from paramserver.core.job import JobSpec
from paramserver.core.params import ParamGroups
from paramserver.wire import json_values
from paramserver.wire.codec import dtype_name, parse_dtype
from paramserver.wire.proto.v1 import paramserver_pb2 as pb


def optimizer_name(optimizer: Any) -> str:
    """How the server will know the optimizer: a torch.optim name, or "package.module:Class"."""
    if isinstance(optimizer, str):
        return optimizer
    if isinstance(optimizer, type):
        if getattr(torch.optim, optimizer.__name__, None) is optimizer:
            return optimizer.__name__
        return f"{optimizer.__module__}:{optimizer.__qualname__}"
    raise ValueError(f"optimizer must be a class, a name or 'package.module:Class', got {optimizer!r}")


def describe_job(
    params: ParamGroups,
    optimizer: Any,
    optimizer_kwargs: dict[str, Any],
    *,
    num_workers: int,
    clip: ClipConfig,
    nonfinite: str = "skip",
    deterministic: bool = True,
    scheduler: SchedulerSpec | None = None,
    split_threshold_bytes: int | None = None,
    grad_dtype: torch.dtype | None = None,
) -> pb.JobConfig:
    msg = pb.JobConfig(
        optimizer=optimizer_name(optimizer),
        optimizer_kwargs_json=json_values.dumps(optimizer_kwargs, "optimizer kwargs"),
        group_options_json=[json_values.dumps(o, f"param group {g}") for g, o in enumerate(params.group_options)],
        params=[pb.ParamSpec(name=p.name or "", shape=list(p.shape), dtype=dtype_name(p.dtype), group=p.group) for p in params.params],
        num_workers=num_workers,
        clip=pb.ClipSettings(norm_type=clip.norm_type, error_if_nonfinite=clip.error_if_nonfinite),
        nonfinite=nonfinite,
        deterministic=deterministic,
        scheduler_json=json_values.dumps(scheduler, "scheduler") if scheduler is not None else "",
        grad_dtype=dtype_name(grad_dtype) if grad_dtype is not None else "",
    )
    if clip.max_norm is not None:
        msg.clip.max_norm = clip.max_norm
    if clip.clip_value is not None:
        msg.clip.clip_value = clip.clip_value
    if split_threshold_bytes is not None:
        msg.split_threshold_bytes = split_threshold_bytes
    return msg


def build_job(msg: pb.JobConfig, num_shards: int, trusted_modules: tuple[str, ...]) -> JobSpec:
    """Validate a wire job config and build the job from it; raises ``ValueError`` naming the problem."""
    if not msg.params:
        raise ValueError("job config has no parameters")
    named = [bool(p.name) for p in msg.params]
    if any(named) and not all(named):
        raise ValueError("job config: either all parameters have names or none do")
    num_groups = len(msg.group_options_json)
    groups: list[dict[str, Any]] = [{"params": [], **_options(text, g)} for g, text in enumerate(msg.group_options_json)]
    for i, p in enumerate(msg.params):
        if p.group >= num_groups:
            raise ValueError(f"job config: parameter {i} names group {p.group}, but there are {num_groups} groups")
        if any(d < 0 for d in p.shape):
            raise ValueError(f"job config: parameter {p.name or i} has a negative dimension {list(p.shape)}")
        tensor = torch.empty(tuple(p.shape), dtype=parse_dtype(p.dtype), device="meta")
        groups[p.group]["params"].append((p.name, tensor) if p.name else tensor)
    order = [p.group for p in msg.params]
    if order != sorted(order):
        raise ValueError("job config: parameters must be listed group by group, in order")
    clip = ClipConfig(
        max_norm=msg.clip.max_norm if msg.clip.HasField("max_norm") else None,
        norm_type=msg.clip.norm_type,
        error_if_nonfinite=msg.clip.error_if_nonfinite,
        clip_value=msg.clip.clip_value if msg.clip.HasField("clip_value") else None,
    )
    config = EngineConfig(
        num_shards=num_shards,
        num_workers=msg.num_workers,
        clip=clip,
        nonfinite=msg.nonfinite or "skip",  # type: ignore[arg-type]
        deterministic=msg.deterministic,
        split_threshold_bytes=msg.split_threshold_bytes if msg.HasField("split_threshold_bytes") else None,
        trusted_modules=trusted_modules,
    )
    scheduler = json_values.loads(msg.scheduler_json) if msg.scheduler_json else None
    if scheduler is not None and not isinstance(scheduler, SchedulerSpec):
        raise ValueError("job config: scheduler_json must encode a scheduler spec")
    kwargs = json_values.loads(msg.optimizer_kwargs_json) or {}
    if not isinstance(kwargs, dict):
        raise ValueError("job config: optimizer kwargs must be a JSON object")
    if msg.grad_dtype:
        parse_dtype(msg.grad_dtype)
    return JobSpec.build(groups, msg.optimizer, config, scheduler, kwargs)


def _options(text: str, group: int) -> dict[str, Any]:
    options = json_values.loads(text) or {}
    if not isinstance(options, dict) or "params" in options:
        raise ValueError(f"job config: options of param group {group} must be a JSON object without 'params'")
    return options
