"""Clip: the global gradient norm and the clip coefficient, as ``torch.nn.utils.clip_grad_norm_`` computes them.

torch splits clipping in two: the total norm (a norm per tensor, then the norm of those norms) and the
scaling. Here the per-tensor norms are taken on the shards (``tensor_norms``), the coordinator stacks them
in the order torch would (``total_norm``) and derives the coefficient (``clip_coefficient``), and each shard
scales its own gradients by it. A tensor cut across shards reports one norm per piece; its norm is rebuilt
from the pieces, which is exact for the inf-norm and equal up to rounding otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype


def tensor_norms(grads: Sequence[torch.Tensor], norm_type: float) -> list[torch.Tensor]:
    """One norm per gradient, with the kernel clip_grad_norm_ uses (grads of one device and dtype)."""
    if not grads:
        return []
    return list(torch._foreach_norm(list(grads), norm_type))


def combine_piece_norms(norms: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The norm of a tensor from the norms of its contiguous pieces."""
    if len(norms) == 1:
        return norms[0]
    stacked = torch.stack(list(norms))
    if norm_type == 0.0:  # the 0-"norm" counts nonzeros: counts add up
        return stacked.sum()
    return torch.linalg.vector_norm(stacked, norm_type)


def torch_norm_order(dtypes: Sequence[torch.dtype]) -> list[int]:
    """The order in which clip_grad_norm_ stacks per-tensor norms.

    torch groups the tensors by (device, dtype) in a C++ hash map, so with several dtypes the groups come in
    that map's order, not in order of appearance. Asking torch's own grouping about placeholder tensors of
    the same dtypes, in the same order, gives the same order.
    """
    placeholders = [torch.empty(0, dtype=d) for d in dtypes]
    grouped = _group_tensors_by_device_and_dtype([placeholders], with_indices=True)
    return [i for _, (_, indices) in grouped.items() for i in indices]


def total_norm(norms_in_param_order: Sequence[torch.Tensor], dtypes: Sequence[torch.dtype], norm_type: float) -> torch.Tensor:
    if not norms_in_param_order:
        return torch.tensor(0.0)
    order = torch_norm_order(dtypes)
    return torch.linalg.vector_norm(torch.stack([norms_in_param_order[i] for i in order]), norm_type)


def clip_coefficient(total: torch.Tensor, max_norm: float) -> torch.Tensor:
    """max_norm / (total + 1e-6), clamped to 1, exactly as torch computes it."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def is_finite(total: torch.Tensor) -> bool:
    value = float(total)
    return not (math.isnan(value) or math.isinf(value))
