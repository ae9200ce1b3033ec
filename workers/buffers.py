"""The model's gradients and weights in the layout the wire carries: flat buffers per shard (one per dtype).

Where a parameter lies whole on one shard and on the CPU, ``param.grad`` and ``param.data`` are views into
these buffers, so pushing the gradients and receiving the weights copy nothing between the model and the
wire (the same idea as DDP's ``gradient_as_bucket_view``). Pieces of a split parameter, and parameters on a
GPU, are copied in and out; for a GPU model the buffers are pinned host memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from paramserver.sharding import ShardingPlan


class ShardBuffers:
    def __init__(self, plan: ShardingPlan, params: Sequence[torch.Tensor]) -> None:
        self.plan = plan
        self.params = list(params)
        pin = any(p.is_cuda for p in self.params)
        self.stream = torch.cuda.Stream() if pin else None
        layouts = [plan.buffers(j) for j in range(plan.num_shards)]
        self.grads = [[torch.zeros(l.numel, dtype=l.dtype, pin_memory=pin) for l in shard] for shard in layouts]
        self.weights = [[torch.empty(l.numel, dtype=l.dtype, pin_memory=pin) for l in shard] for shard in layouts]
        self.grad_views: dict[int, torch.Tensor] = {}
        self.weight_views: dict[int, torch.Tensor] = {}
        self.copied: list[tuple[int, int, int, int, int]] = []  # (param, shard, buffer, offset, slice) copied in and out
        for j, shard in enumerate(layouts):
            for b, layout in enumerate(shard):
                for s, off in zip(layout.slices, layout.offsets):
                    p = self.params[s.param]
                    if plan.is_whole(s) and not p.is_cuda:
                        self.grad_views[s.param] = self.grads[j][b][off : off + s.numel].view(p.shape)
                        self.weight_views[s.param] = self.weights[j][b][off : off + s.numel].view(p.shape)
                    else:
                        self.copied.append((s.param, j, b, off, plan.shards[j].index(s)))
        with torch.no_grad():
            for index, view in self.weight_views.items():
                view.copy_(self.params[index])
                self.params[index].data = view  # the model's weights now live in the buffers
            self._copy_pieces(to_buffers=True, grads=False)
            self.zero_grads()

        # which parameters each shard needs before its gradients are complete
        self.members = [sorted({s.param for s in slices}) for slices in plan.shards]

    def _copy_pieces(self, to_buffers: bool, grads: bool, shard: int | None = None) -> None:
        """Copy the pieces that are not views, between the parameters (or their gradients) and the buffers.

        For a GPU model these are device-host copies into or out of pinned memory: they run on a side
        stream, ordered after the work already queued, and are complete when this returns.
        """
        buffers = self.grads if grads else self.weights
        with self._side_stream():
            for index, j, b, off, k in self.copied:
                if shard is not None and j != shard:
                    continue
                s = self.plan.shards[j][k]
                p = self.params[index]
                source = p.grad if grads else p
                flat = buffers[j][b][off : off + s.numel]
                if to_buffers:
                    if source is None:
                        flat.zero_()
                    else:
                        flat.copy_(source.detach().reshape(-1)[s.start : s.stop], non_blocking=True)
                else:
                    p.detach().view(-1)[s.start : s.stop].copy_(flat, non_blocking=True)

    @contextlib.contextmanager
    def _side_stream(self) -> Iterator[None]:
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        # host buffers are read (pushed) right after; the model's next kernels must see new weights
        self.stream.synchronize()

    def zero_grads(self) -> None:
        """Zero the gradient buffers and point every viewed parameter's ``.grad`` at its place there."""
        for shard in self.grads:
            for buf in shard:
                buf.zero_()
        for index, view in self.grad_views.items():
            self.params[index].grad = view

    def gather_grads(self, shard: int | None = None) -> list[list[torch.Tensor]]:
        """The gradients to push, per shard (of ``shard`` only, if given). A ``.grad`` the caller replaced
        (or set to None) is copied in (or zeroed) and re-pointed at the buffer."""
        indices = self.grad_views if shard is None else [i for i in self.members[shard] if i in self.grad_views]
        with torch.no_grad():
            for index in indices:
                view = self.grad_views[index]
                p = self.params[index]
                if p.grad is None:
                    view.zero_()
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                p.grad = view
            self._copy_pieces(to_buffers=True, grads=True, shard=shard)
        return self.grads

    def scatter_weights(self) -> None:
        """After a pull into ``weights``: bring the copied parameters up to date (viewed ones already are)."""
        with torch.no_grad():
            self._copy_pieces(to_buffers=False, grads=False)
