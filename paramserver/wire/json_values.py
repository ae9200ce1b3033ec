"""Optimizer and scheduler arguments as JSON: the values torch.optim takes, without pickle.

JSON has no tuples, tensors or infinities, and torch cares: ``betas`` stays a tuple in the state dict, an
``lr`` given as a tensor takes other kernels. So a tuple is ``{"__tuple__": [...]}``, a tensor is
``{"__tensor__": {"dtype", "shape", "values"}}``, a float that JSON cannot hold is ``{"__float__": "inf"}``,
and a scheduler spec is ``{"__scheduler__": {"scheduler", "kwargs", "interval"}}``. Anything else (a
callable, an object) is refused: code is named by import path, never sent.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch

from paramserver.core.config import SchedulerSpec
from paramserver.wire.codec import dtype_name, parse_dtype


def to_wire(value: Any, where: str = "value", tensors: list[torch.Tensor] | None = None) -> Any:
    """``value`` as JSON-able data. With ``tensors`` given, tensors are appended there and replaced by
    ``{"__ref__": index}`` (their bytes travel separately); otherwise they are written out as numbers."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [to_wire(v, where, tensors) for v in value]}
    if isinstance(value, list):
        return [to_wire(v, where, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not any(k.startswith("__") for k in value):
            return {k: to_wire(v, f"{where}.{k}", tensors) for k, v in value.items()}
        # int keys (torch's optimizer state) and keys JSON would confuse travel as pairs
        return {"__items__": [[to_wire(k, where), to_wire(v, f"{where}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor) and tensors is not None:
        tensors.append(value.detach())
        return {"__ref__": len(tensors) - 1}
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return {"__tensor__": {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "values": to_wire(t.reshape(-1).tolist())}}
    if isinstance(value, SchedulerSpec):
        return {"__scheduler__": {"scheduler": scheduler_name(value.scheduler), "kwargs": to_wire(value.kwargs, where), "interval": value.interval}}
    if isinstance(value, type) or callable(value):
        raise ValueError(f"{where}: {value!r} cannot travel on the wire; name it by import path 'package.module:name'")
    raise ValueError(f"{where}: a {type(value).__name__} cannot travel on the wire")


def from_wire(value: Any, tensors: Sequence[torch.Tensor] = ()) -> Any:
    if isinstance(value, list):
        return [from_wire(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tuple__"}:
        return tuple(from_wire(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__items__"}:
        return {_hashable(from_wire(k)): from_wire(v, tensors) for k, v in value["__items__"]}
    if set(value) == {"__ref__"}:
        index = value["__ref__"]
        if not isinstance(index, int) or not 0 <= index < len(tensors):
            raise ValueError(f"reference to tensor {index!r}, but {len(tensors)} tensors came")
        return tensors[index]
    if set(value) == {"__float__"}:
        return float(value["__float__"])
    if set(value) == {"__tensor__"}:
        spec = value["__tensor__"]
        return torch.tensor(from_wire(spec["values"]), dtype=parse_dtype(spec["dtype"])).reshape(spec["shape"])
    if set(value) == {"__scheduler__"}:
        spec = value["__scheduler__"]
        return SchedulerSpec(spec["scheduler"], from_wire(spec["kwargs"]), spec["interval"])
    if any(k.startswith("__") for k in value):
        raise ValueError(f"unknown tagged value on the wire: {sorted(value)}")
    return {k: from_wire(v, tensors) for k, v in value.items()}


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise ValueError("a dict key on the wire must be a number, a string or a tuple")
    return key


def scheduler_name(scheduler: Any) -> str:
    """A scheduler class as the name the server resolves: short for torch's, an import path otherwise."""
    if isinstance(scheduler, str):
        return scheduler
    if isinstance(scheduler, type):
        if scheduler.__module__ == "torch.optim.lr_scheduler":
            return scheduler.__name__
        return f"{scheduler.__module__}:{scheduler.__qualname__}"
    raise ValueError(f"scheduler must be a class or a name, got {scheduler!r}")


def dumps(value: Any, where: str = "value") -> str:
    return json.dumps(to_wire(value, where))


def loads(text: str) -> Any:
    try:
        return from_wire(json.loads(text)) if text else None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed JSON value on the wire: {exc}") from exc
