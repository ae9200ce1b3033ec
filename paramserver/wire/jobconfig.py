"""The one place a job's configuration (``paramserver.core.config.JobConfig``) turns into the ``JobConfig``
proto and back: what rank 0 sends, what the server builds the job from.

A field a client leaves out takes the tree's default (``optional`` proto fields), so a job created from
another language gets what a Python user gets. The server's own settings (number of shards, trusted
modules) are never taken from the wire.
"""

from __future__ import annotations

from typing import Any

import torch

from paramserver.core.config import ClipConfig, JobConfig, OptimizerConfig, SchedulerSpec
from paramserver.core.job import JobSpec
from paramserver.core.params import ParamGroups, normalize_params
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


def to_proto(config: JobConfig, params: ParamGroups) -> pb.JobConfig:
    """``config`` for the model described by ``params``, every field written out."""
    if list(config.groups) not in ([], params.group_options):
        raise ValueError("the config's group options differ from the params' groups; give them in one place")
    clip = config.clip
    msg = pb.JobConfig(
        optimizer=optimizer_name(config.optimizer.name),
        optimizer_kwargs_json=json_values.dumps(config.optimizer.kwargs, "optimizer kwargs"),
        group_options_json=[json_values.dumps(o, f"param group {g}") for g, o in enumerate(params.group_options)],
        params=[pb.ParamSpec(name=p.name or "", shape=list(p.shape), dtype=dtype_name(p.dtype), group=p.group) for p in params.params],
        num_workers=config.num_workers,
        clip=pb.ClipSettings(norm_type=clip.norm_type, error_if_nonfinite=clip.error_if_nonfinite),
        nonfinite=config.nonfinite,
        deterministic=config.deterministic,
        scheduler_json=json_values.dumps(config.scheduler, "scheduler") if config.scheduler is not None else "",
        # 0 on the wire: never split (absent means the default threshold)
        split_threshold_bytes=config.split_threshold_bytes or 0,
        grad_dtype=dtype_name(config.grad_dtype) if config.grad_dtype is not None else "",
        lease_timeout=float(config.lease_timeout),
        min_workers=config.min_workers,
    )
    if config.max_workers is not None:  # absent on the wire: num_workers
        msg.max_workers = config.max_workers
    if config.close_after is not None:  # absent on the wire: synchronous steps
        msg.close_after = config.close_after
    if config.mode != "sync":
        msg.mode = config.mode
    if config.max_staleness is not None:
        msg.max_staleness = config.max_staleness
    msg.staleness_lr = config.staleness_lr
    if clip.max_norm is not None:
        msg.clip.max_norm = clip.max_norm
    if clip.clip_value is not None:
        msg.clip.clip_value = clip.clip_value
    return msg


def from_proto(msg: pb.JobConfig) -> tuple[JobConfig, list[dict[str, Any]]]:
    """The job's config (defaults where the message leaves a field out) and its param groups as torch takes
    them, with meta tensors; raises ``ValueError`` naming the problem."""
    default = JobConfig()
    clip_msg = msg.clip
    clip = ClipConfig(
        max_norm=clip_msg.max_norm if clip_msg.HasField("max_norm") else None,
        norm_type=clip_msg.norm_type if clip_msg.HasField("norm_type") else default.clip.norm_type,
        error_if_nonfinite=clip_msg.error_if_nonfinite,
        clip_value=clip_msg.clip_value if clip_msg.HasField("clip_value") else None,
    )
    scheduler = json_values.loads(msg.scheduler_json) if msg.scheduler_json else None
    if scheduler is not None and not isinstance(scheduler, SchedulerSpec):
        raise ValueError("job config: scheduler_json must encode a scheduler spec")
    kwargs = json_values.loads(msg.optimizer_kwargs_json) or {}
    if not isinstance(kwargs, dict):
        raise ValueError("job config: optimizer kwargs must be a JSON object")
    if msg.HasField("split_threshold_bytes"):
        split = msg.split_threshold_bytes or None
    else:
        split = default.split_threshold_bytes
    groups = _param_groups(msg)
    config = JobConfig(
        optimizer=OptimizerConfig(msg.optimizer or default.optimizer.name, kwargs),
        groups=tuple({k: v for k, v in g.items() if k != "params"} for g in groups),
        clip=clip,
        scheduler=scheduler,
        num_workers=msg.num_workers if msg.HasField("num_workers") else default.num_workers,
        nonfinite=msg.nonfinite if msg.HasField("nonfinite") else default.nonfinite,  # type: ignore[arg-type]
        deterministic=msg.deterministic if msg.HasField("deterministic") else default.deterministic,
        split_threshold_bytes=split,
        grad_dtype=parse_dtype(msg.grad_dtype) if msg.grad_dtype else None,
        max_workers=msg.max_workers if msg.HasField("max_workers") else default.max_workers,
        min_workers=msg.min_workers if msg.HasField("min_workers") else default.min_workers,
        lease_timeout=msg.lease_timeout if msg.HasField("lease_timeout") else default.lease_timeout,
        close_after=msg.close_after if msg.HasField("close_after") else default.close_after,
        mode=msg.mode or default.mode,
        max_staleness=msg.max_staleness if msg.HasField("max_staleness") else default.max_staleness,
        staleness_lr=msg.staleness_lr,
    )
    return config, groups


def canonical(msg: pb.JobConfig) -> pb.JobConfig:
    """``msg`` with every default written out: two clients that mean the same job send the same config."""
    config, groups = from_proto(msg)
    out = to_proto(config, normalize_params(groups))
    out.group_options_json[:] = list(msg.group_options_json)  # keep the client's own JSON of group options
    out.optimizer_kwargs_json = msg.optimizer_kwargs_json or out.optimizer_kwargs_json
    out.scheduler_json = msg.scheduler_json
    if out.HasField("max_workers") and out.max_workers == out.num_workers:
        out.ClearField("max_workers")  # max_workers=num_workers means what leaving it out means
    return out


def build_job(msg: pb.JobConfig, num_shards: int, trusted_modules: tuple[str, ...]) -> JobSpec:
    """Validate a wire job config and build the job from it; raises ``ValueError`` naming the problem."""
    config, groups = from_proto(msg)
    return JobSpec.build(groups, config.replace(groups=()), num_shards, trusted_modules)


def describe_job(params: ParamGroups, optimizer: Any, optimizer_kwargs: dict[str, Any], **options: Any) -> pb.JobConfig:
    """A job config message from torch-style arguments: ``options`` are ``JobConfig``'s fields
    (``num_workers=2, clip=ClipConfig(max_norm=1.0)``)."""
    return to_proto(JobConfig(optimizer=OptimizerConfig(optimizer, dict(optimizer_kwargs)), **options), params)


def _param_groups(msg: pb.JobConfig) -> list[dict[str, Any]]:
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
    return groups


def _options(text: str, group: int) -> dict[str, Any]:
    options = json_values.loads(text) or {}
    if not isinstance(options, dict) or "params" in options:
        raise ValueError(f"job config: options of param group {group} must be a JSON object without 'params'")
    return options
