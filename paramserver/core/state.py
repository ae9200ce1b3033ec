"""Translate between the shards' sliced state and torch's own formats.

The model state dict is ``{name: tensor}`` (a parameter without a name is keyed by its position). The
optimizer state dict is exactly what ``optimizer.state_dict()`` of a local optimizer over the same
parameters returns: ``{"state": {index: {...}}, "param_groups": [...]}``. A tensor cut across shards has
its per-element state (moments, buffers) joined on export and cut again on import; its scalar state
(``step``) is the same on every piece.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from paramserver.core.params import ParamInfo
from paramserver.core.sharding import ShardingPlan, Slice


def _is_per_element(value: Any, shape: tuple[int, ...]) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == shape


def join_param_state(plan: ShardingPlan, param: ParamInfo, pieces: Sequence[tuple[Slice, dict[str, Any]]]) -> dict[str, Any]:
    """One parameter's optimizer state from the states of its pieces (in element order), as copies."""
    if len(pieces) == 1 and plan.is_whole(pieces[0][0]):
        return copy.deepcopy(pieces[0][1])
    first = pieces[0][1]
    joined: dict[str, Any] = {}
    for key, value in first.items():
        if _is_per_element(value, (pieces[0][0].numel,)):
            joined[key] = torch.cat([st[key].detach() for _, st in pieces]).view(param.shape).clone()
        else:
            joined[key] = copy.deepcopy(value)
    return joined


def cut_param_state(param: ParamInfo, piece: Slice, whole: bool, state: Mapping[str, Any]) -> dict[str, Any]:
    """The state of one piece of a parameter, from the parameter's full state."""
    # Every piece gets its own copies: torch's loader keeps tensors of the right dtype and device as they are
    # (and 'step' always), so a shared tensor would be stepped once per piece, or alias the caller's state.
    if whole:
        return {key: _copy(value) for key, value in state.items()}
    return {
        key: value.reshape(-1)[piece.start : piece.stop].clone() if _is_per_element(value, param.shape) else _copy(value)
        for key, value in state.items()
    }


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def check_model_state(params: Sequence[ParamInfo], model: Mapping[Any, Any]) -> list[torch.Tensor]:
    """Validate a model state dict against the job's parameters; return the tensors in index order."""
    if not isinstance(model, Mapping):
        raise ValueError(f"model state must be a mapping of parameter name to tensor, got {type(model).__name__}")
    expected = {p.key for p in params}
    missing = [k for k in (p.key for p in params) if k not in model]
    unexpected = [k for k in model if k not in expected]
    if missing or unexpected:
        raise ValueError(f"model state does not match the job's parameters: missing {missing}, unexpected {unexpected}")
    out = []
    for p in params:
        value = model[p.key]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model state {p.key!r}: expected a tensor, got {type(value).__name__}")
        if tuple(value.shape) != p.shape:
            raise ValueError(f"model state {p.key!r}: expected shape {p.shape}, got {tuple(value.shape)}")
        if not value.is_floating_point() and not value.is_complex():
            raise ValueError(f"model state {p.key!r}: expected a floating point tensor, got {value.dtype}")
        out.append(value.detach().to(p.dtype))
    return out


def check_optimizer_state(params: Sequence[ParamInfo], num_groups: int, state_dict: Mapping[str, Any]) -> None:
    """Validate a torch optimizer state dict against the job's parameters and groups."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("optimizer state must be a dict with 'state' and 'param_groups', as optimizer.state_dict() returns")
    groups = state_dict["param_groups"]
    if not isinstance(groups, Sequence) or len(groups) != num_groups:
        raise ValueError(f"optimizer state has {len(groups) if isinstance(groups, Sequence) else '?'} param groups, the job has {num_groups}")
    for g, group in enumerate(groups):
        members = [p.index for p in params if p.group == g]
        if not isinstance(group, Mapping) or len(group.get("params", ())) != len(members):
            raise ValueError(f"optimizer state param group {g} does not have the job's {len(members)} parameters")
    ids = [i for group in groups for i in group["params"]]
    if len(set(ids)) != len(ids):
        raise ValueError("optimizer state lists a parameter id twice")
    for key, value in state_dict["state"].items():
        if key not in ids:
            raise ValueError(f"optimizer state has state for parameter {key!r}, which no param group lists")
        if not isinstance(value, Mapping):
            raise ValueError(f"optimizer state of parameter {key!r} must be a dict")


def loaded_step(state_dict: Mapping[str, Any], interval: int = 1) -> int | None:
    """The step a state in torch's formats was saved at, when it says: the largest per-parameter ``"step"``
    of its optimizer state, else its scheduler's ``last_epoch`` times the scheduler ``interval`` (the
    scheduler steps every ``interval`` updates), else None."""
    optimizer = state_dict.get("optimizer")
    steps = []
    if isinstance(optimizer, Mapping) and isinstance(optimizer.get("state"), Mapping):
        for param_state in optimizer["state"].values():
            value = param_state.get("step") if isinstance(param_state, Mapping) else None
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.append(int(value))
    if steps:
        return max(steps)
    scheduler = state_dict.get("scheduler")
    if isinstance(scheduler, Mapping):
        last_epoch = scheduler.get("last_epoch")
        if isinstance(last_epoch, int) and not isinstance(last_epoch, bool) and last_epoch >= 0:
            return last_epoch * interval
    return None
