"""Read parameters in every form ``torch.optim`` accepts into one flat, ordered description.

Forms: ``model.parameters()``, ``model.named_parameters()``, or a list of param-group dicts whose
``"params"`` are either of those. Parameters are numbered in group order, exactly as torch's optimizer
state dict numbers them; named parameters also keep their names, as torch does under ``param_names``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of the model: where it stands and what it looks like, without its values."""

    index: int  # position in torch's optimizer state dict numbering
    name: str | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    group: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def key(self) -> str | int:
        """The parameter's key in the model state dict: its name, else its position."""
        return self.name if self.name is not None else self.index


@dataclass
class ParamGroups:
    params: list[ParamInfo]
    tensors: list[torch.Tensor]  # the parameters themselves (not copies), in index order
    group_options: list[dict[str, Any]]  # each group's own options (no "params")
    named: bool

    def group_members(self, group: int) -> list[ParamInfo]:
        return [p for p in self.params if p.group == group]


def _split_named(items: Iterable[Any], where: str) -> list[tuple[str | None, torch.Tensor]]:
    if isinstance(items, torch.Tensor):
        items = [items]
    out: list[tuple[str | None, torch.Tensor]] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            out.append((None, item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            if not isinstance(item[0], str):
                raise ValueError(f"{where}: a parameter name must be a str, got {item[0]!r}")
            out.append((item[0], item[1]))
        else:
            raise ValueError(f"{where}: expected a Tensor or a (name, Tensor) pair, got {type(item).__name__}")
    return out


def normalize_params(params: Any) -> ParamGroups:
    """Validate ``params`` and describe them; raises ``ValueError`` naming the first problem."""
    if isinstance(params, torch.Tensor) or isinstance(params, dict):
        raise ValueError(
            "params must be an iterable of Tensors, of (name, Tensor) pairs, or of param-group dicts, "
            f"got a {type(params).__name__}"
        )
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    raw_groups = items if isinstance(items[0], dict) else [{"params": items}]

    infos: list[ParamInfo] = []
    tensors: list[torch.Tensor] = []
    options: list[dict[str, Any]] = []
    seen_ids: dict[int, int] = {}
    seen_names: dict[str, int] = {}
    for g, group in enumerate(raw_groups):
        if not isinstance(group, dict):
            raise ValueError(f"param group {g}: mixing dicts and tensors in params is not allowed")
        if "params" not in group:
            raise ValueError(f"param group {g} has no 'params' key")
        if "param_names" in group:
            raise ValueError(f"param group {g}: give names as (name, Tensor) pairs, not 'param_names'")
        members = _split_named(group["params"], f"param group {g}")
        if not members:
            raise ValueError(f"param group {g} has an empty 'params' list")
        options.append({k: v for k, v in group.items() if k != "params"})
        for name, tensor in members:
            where = f"parameter {name!r}" if name is not None else f"parameter {len(infos)} (group {g})"
            if not (tensor.is_floating_point() or tensor.is_complex()):
                raise ValueError(f"{where}: can only optimize floating point tensors, got {tensor.dtype}")
            if tensor.is_sparse or tensor.layout != torch.strided:
                raise ValueError(f"{where}: only dense (strided) tensors are supported, got {tensor.layout}")
            if tensor.requires_grad and not tensor.is_leaf:
                raise ValueError(f"{where}: can't optimize a non-leaf Tensor")
            if id(tensor) in seen_ids:
                raise ValueError(f"{where} appears twice (first as parameter {seen_ids[id(tensor)]})")
            seen_ids[id(tensor)] = len(infos)
            if name is not None:
                if name in seen_names:
                    raise ValueError(f"duplicate parameter name {name!r} (parameters {seen_names[name]} and {len(infos)})")
                seen_names[name] = len(infos)
            infos.append(ParamInfo(len(infos), name, tuple(tensor.shape), tensor.dtype, g))
            tensors.append(tensor)

    named = [p.name is not None for p in infos]
    if any(named) and not all(named):
        missing = [p.index for p in infos if p.name is None]
        raise ValueError(f"either all parameters have names or none do; parameters {missing} have no name")
    return ParamGroups(infos, tensors, options, named=all(named))
