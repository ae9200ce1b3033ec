"""Which of torch's implementations a shard's optimizer runs: torch's own bits, by the fastest path to them.

On the CPU, ``torch.optim`` runs its single-tensor loop when ``foreach`` is left to it (None). For most built-in
optimizers the foreach implementation performs the same elementwise operations in the same order, so it gives
the same bits, several times faster (Adam over 4.7M fp32 parameters on one thread: 23 ms against 7 ms). A shard
whose job left ``foreach`` unset uses it for the optimizers of ``SAME_BITS`` (the parity suite compares each with
torch's default, bit for bit) when a probe, a dozen steps on small random tensors with each group's
hyperparameters and each dtype of the shard, also gives identical parameters and state; otherwise it runs
torch's default. (A probe alone is not enough: RAdam's and NAdam's foreach paths differ from their loops in
the last bits in some steps and not in others.)
The choice is the shard's alone: the job's hyperparameters (and its state dicts) keep ``foreach`` as the user
gave it, and ``keep_kernel`` puts the choice back after the coordinator's hyperparameters are set.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

# the built-in optimizers whose foreach implementation is their single-tensor loop's operations, in its order
SAME_BITS = frozenset(
    {torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adamax, torch.optim.Rprop,
     torch.optim.RMSprop, torch.optim.Adadelta}
)
PROBE_STEPS = 12  # past the early-step branches (RAdam rectifies from step 6)
PROBE_SHAPES = ((7, 5), (3,), ())


def kernel_choice(
    optimizer_cls: type, group_options: Sequence[dict[str, Any]], optimizer_kwargs: dict[str, Any], dtypes: Sequence[torch.dtype],
    device: torch.device,
) -> dict[str, Any]:
    """``{"foreach": True}`` where that gives torch's default bits on ``device`` for every group and dtype of the
    shard, else ``{}`` (torch's own choice stands)."""
    if device.type != "cpu" or optimizer_cls not in SAME_BITS:
        return {}
    if optimizer_kwargs.get("foreach") is not None or any(g.get("foreach") is not None for g in group_options):
        return {}  # the user chose
    if any(optimizer_kwargs.get(k) for k in ("fused", "differentiable", "capturable")):
        return {}
    for options in group_options:
        for dtype in set(dtypes):
            if not _same_bits(optimizer_cls, {**optimizer_kwargs, **options}, dtype):
                return {}
    return {"foreach": True}


def keep_kernel(optimizer: torch.optim.Optimizer, choice: dict[str, Any]) -> None:
    """Put the shard's kernel choice back into every group (after hyperparameters were set from elsewhere)."""
    for group in optimizer.param_groups:
        group.update(choice)


def _same_bits(optimizer_cls: type, options: dict[str, Any], dtype: torch.dtype) -> bool:
    if not (dtype.is_floating_point or dtype.is_complex):
        return False
    runs = []
    for foreach in (None, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True) for shape in PROBE_SHAPES]
        try:
            optimizer = optimizer_cls(params, **{**copy.deepcopy(options), "foreach": foreach})
            for _ in range(PROBE_STEPS):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen, dtype=dtype)
                optimizer.step()
        except Exception:  # noqa: BLE001 - an implementation that cannot run the probe is not chosen
            return False
        runs.append((params, [optimizer.state.get(p, {}) for p in params]))
    (params_a, state_a), (params_b, state_b) = runs
    if not all(torch.equal(a.detach(), b.detach()) for a, b in zip(params_a, params_b)):
        return False
    return all(_equal_state(a, b) for a, b in zip(state_a, state_b))


def _equal_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True
