"""The sharding plan: which shard owns which parameter (or which piece of it), and the flat layout there.

Whole tensors go largest first onto the least loaded shard (by bytes), as torch's ZeroRedundancyOptimizer
places them. For elementwise optimizers a tensor above the split threshold is cut into contiguous pieces
so one huge embedding does not pin all the work on one shard. The plan is a pure function of the parameter
shapes, dtypes and settings, so every process that builds it gets the same plan.

On a shard, the slices of one dtype live back to back in one flat buffer (``BufferLayout``); gradients and
weights travel as those flat buffers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from paramserver.core.params import ParamInfo


@dataclass(frozen=True)
class Slice:
    """Elements ``[start, stop)`` of the flattened parameter ``param``."""

    param: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BufferLayout:
    """One flat buffer of one dtype on one shard: slices back to back, in parameter order."""

    dtype: torch.dtype
    slices: tuple[Slice, ...]
    offsets: tuple[int, ...]
    numel: int


@dataclass(frozen=True)
class ShardingPlan:
    params: tuple[ParamInfo, ...]
    shards: tuple[tuple[Slice, ...], ...]  # per shard, its slices in buffer order (by dtype, then parameter)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def is_whole(self, s: Slice) -> bool:
        return s.start == 0 and s.stop == self.params[s.param].numel

    def pieces(self, param: int) -> list[tuple[int, Slice]]:
        """(shard, slice) of every piece of ``param``, in element order."""
        found = [(j, s) for j, slices in enumerate(self.shards) for s in slices if s.param == param]
        return sorted(found, key=lambda js: js[1].start)

    def is_split(self, param: int) -> bool:
        return len(self.pieces(param)) > 1

    def shard_bytes(self) -> list[int]:
        return [sum(s.numel * self.params[s.param].dtype.itemsize for s in slices) for slices in self.shards]

    def balance(self) -> float:
        """Most loaded shard over the mean load: 1.0 is perfect balance."""
        loads = self.shard_bytes()
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean else 1.0

    def describe(self) -> str:
        loads = self.shard_bytes()
        split = sum(1 for p in self.params if self.is_split(p.index))
        rows = ", ".join(f"shard {j}: {len(s)} slices {b / 2**20:.2f} MiB" for j, (s, b) in enumerate(zip(self.shards, loads)))
        return f"{len(self.params)} params on {self.num_shards} shards ({split} split), balance {self.balance():.3f}; {rows}"

    def buffers(self, shard: int) -> list[BufferLayout]:
        """The flat buffers of ``shard``, one per dtype, in order of first appearance."""
        by_dtype: dict[torch.dtype, list[Slice]] = {}
        for s in self.shards[shard]:
            by_dtype.setdefault(self.params[s.param].dtype, []).append(s)
        layouts = []
        for dtype, slices in by_dtype.items():
            offsets, total = [], 0
            for s in slices:
                offsets.append(total)
                total += s.numel
            layouts.append(BufferLayout(dtype, tuple(slices), tuple(offsets), total))
        return layouts


# A piece of a cut tensor starts and ends on a multiple of this many bytes from the tensor's start (only the last
# piece ends where the tensor does). torch's CPU kernels run vectors from a tensor's start (an unrolled pair of
# 64-byte vectors at most) and leave the rest to a scalar tail; fused kernels' scalar tail rounds differently
# from their vectors (fused Adam: 1 ulp in some elements). Cut on these boundaries, every element of a piece
# is computed on the path it takes in the whole tensor, so the pieces give the whole tensor's bits.
CUT_ALIGN_BYTES = 256


def cut_points(numel: int, pieces: int, itemsize: int) -> list[int]:
    """Bounds of about ``pieces`` contiguous pieces of ``numel`` elements, each inner one on a multiple of
    ``CUT_ALIGN_BYTES``: fewer pieces where the tensor is too small for that many aligned ones."""
    align = max(1, CUT_ALIGN_BYTES // itemsize)
    inner = {(2 * numel * i + pieces * align) // (2 * pieces * align) * align for i in range(1, pieces)}  # nearest
    return [0, *sorted(b for b in inner if 0 < b < numel), numel]


def make_plan(
    params: Sequence[ParamInfo], num_shards: int, split_threshold_bytes: int | None, allow_split: bool
) -> ShardingPlan:
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    items: list[Slice] = []
    for p in params:
        pieces = 1
        if allow_split and split_threshold_bytes is not None and num_shards > 1 and p.nbytes > split_threshold_bytes:
            pieces = min(num_shards, math.ceil(p.nbytes / split_threshold_bytes), p.numel)
        bounds = cut_points(p.numel, pieces, p.dtype.itemsize)
        items.extend(Slice(p.index, lo, hi) for lo, hi in zip(bounds, bounds[1:]))

    def nbytes(s: Slice) -> int:
        return s.numel * params[s.param].dtype.itemsize

    loads = [0] * num_shards
    assigned: list[list[Slice]] = [[] for _ in range(num_shards)]
    for s in sorted(items, key=lambda s: (-nbytes(s), s.param, s.start)):
        j = min(range(num_shards), key=lambda j: (loads[j], j))
        assigned[j].append(s)
        loads[j] += nbytes(s)
    # Within a shard, slices are ordered as they lie in its flat buffers: by dtype (first seen first), then
    # by parameter, so every per-slice list (norms, optimizer state) follows this one order.
    dtype_rank: dict[torch.dtype, int] = {}
    for p in params:
        dtype_rank.setdefault(p.dtype, len(dtype_rank))
    shards = tuple(
        tuple(sorted(a, key=lambda s: (dtype_rank[params[s.param].dtype], s.param, s.start))) for a in assigned
    )
    return ShardingPlan(tuple(params), shards)


def pack(plan: ShardingPlan, shard: int, tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> list[torch.Tensor]:
    """Gather ``shard``'s slices of the per-parameter ``tensors`` into its flat buffers (one per dtype): on
    ``device`` where every tensor is there already (the shard's GPU), else in host memory."""
    out = []
    on_device = device is not None and device.type != "cpu" and all(_on(t, device) for t in tensors)
    # Copies from a GPU to the host land in pinned memory, which the device copies into directly.
    pin = not on_device and any(t.is_cuda for t in tensors)
    for layout in plan.buffers(shard):
        flat = torch.empty(layout.numel, dtype=layout.dtype, pin_memory=pin, device=device if on_device else "cpu")
        for s, off in zip(layout.slices, layout.offsets):
            flat[off : off + s.numel].copy_(tensors[s.param].detach().reshape(-1)[s.start : s.stop])
        out.append(flat)
    return out


def _on(tensor: torch.Tensor, device: torch.device) -> bool:
    return tensor.device.type == device.type and device.index in (None, tensor.device.index)


def unpack(plan: ShardingPlan, shard: int, buffers: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor]) -> None:
    """Write ``shard``'s flat buffers back into the per-parameter ``tensors``, in place."""
    for layout, flat in zip(plan.buffers(shard), buffers, strict=True):
        for s, off in zip(layout.slices, layout.offsets):
            target = tensors[s.param]
            with torch.no_grad():
                target.view(-1)[s.start : s.stop].copy_(flat[off : off + s.numel])
