"""The model's gradients and weights in the layout the wire carries: flat buffers per shard (one per dtype).

Where a parameter lies whole on one shard and on the CPU, ``param.grad`` and ``param.data`` are views into
these buffers, so pushing the gradients and receiving the weights copy nothing between the model and the
wire (the same idea as DDP's ``gradient_as_bucket_view``). Pieces of a split parameter, and parameters on a
GPU, are copied in and out; for a GPU model the buffers are pinned host memory and the copies run on a
side stream.

The buffers are memory of their own, or, for a shard on this host, its shared-memory segments (``place``):
then backward writes the gradients where the shard reduces from, and under synchronous steps the model's
weights are the job's live weights on that shard.

Views are made afresh from the buffers whenever they are handed out, and every push and pull checks that
each parameter still sits where it should: code that rebinds ``param.data`` or ``param.grad`` gets its
values copied in and the parameter re-pointed; a parameter whose dtype, shape or device changed after the
buffers were made is an error, not a silent divergence.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from paramserver.core.sharding import ShardingPlan


class ShardBuffers:
    def __init__(self, plan: ShardingPlan, params: Sequence[torch.Tensor]) -> None:
        self.plan = plan
        self.params = list(params)
        pin = any(p.is_cuda for p in self.params)
        self.stream = torch.cuda.Stream() if pin else None
        layouts = [plan.buffers(j) for j in range(plan.num_shards)]
        self.grads = [[torch.zeros(l.numel, dtype=l.dtype, pin_memory=pin) for l in shard] for shard in layouts]
        self.weights = [[torch.empty(l.numel, dtype=l.dtype, pin_memory=pin) for l in shard] for shard in layouts]
        self.viewed: dict[int, tuple[int, int, int]] = {}  # param -> (shard, buffer, offset): its views' place
        self.copied: list[tuple[int, int, int, int, int]] = []  # (param, shard, buffer, offset, slice) copied in and out
        for j, shard in enumerate(layouts):
            for b, layout in enumerate(shard):
                for s, off in zip(layout.slices, layout.offsets):
                    if plan.is_whole(s) and not self.params[s.param].is_cuda:
                        self.viewed[s.param] = (j, b, off)
                    else:
                        self.copied.append((s.param, j, b, off, plan.shards[j].index(s)))
        self.elsewhere: set[int] = set()  # the shards whose buffers ``place`` put elsewhere (shared memory)
        # which parameters each shard needs before its gradients are complete
        self.members = [sorted({s.param for s in slices}) for slices in plan.shards]
        with torch.no_grad():
            for index in self.viewed:
                view = self.weight_view(index)
                view.copy_(self.params[index])
                self.params[index].data = view  # the model's weights now live in the buffers
            self._copy_pieces(to_buffers=True, grads=False)
            self.zero_grads()

    def place(self, shard: int, grads: Sequence[torch.Tensor] | None = None, weights: Sequence[torch.Tensor] | None = None,
              weights_hold_values: bool = False) -> None:
        """Move ``shard``'s flat buffers elsewhere (into shared memory, or back into memory of their own, for
        ``None``): the gradients' values go along, the weights' too unless the new buffers already hold them (the
        job's live weights in shared memory), and each viewed parameter is pointed at its place there (a
        ``.grad`` that is None, or not a view, stays as it is)."""
        layouts = self.plan.buffers(shard)
        pin = self.stream is not None
        (self.elsewhere.add if grads is not None else self.elsewhere.discard)(shard)
        if grads is None:
            grads = [torch.zeros(l.numel, dtype=l.dtype, pin_memory=pin) for l in layouts]
        if weights is None:
            weights = [torch.empty(l.numel, dtype=l.dtype, pin_memory=pin) for l in layouts]
            weights_hold_values = False
        here = [i for i, (j, _, _) in self.viewed.items() if j == shard]
        with torch.no_grad():
            was_view = {i for i in here if self.params[i].grad is not None and self.params[i].grad.data_ptr() == self.grad_view(i).data_ptr()}
            for new, old in zip(grads, self.grads[shard]):
                if new.data_ptr() != old.data_ptr():
                    new.copy_(old)
            if not weights_hold_values:
                for new, old in zip(weights, self.weights[shard]):
                    if new.data_ptr() != old.data_ptr():
                        new.copy_(old)
            self.grads[shard], self.weights[shard] = list(grads), list(weights)
            for i in here:
                self.params[i].data = self.weight_view(i)
                if i in was_view:
                    self.params[i].grad = self.grad_view(i)

    def _view(self, buffers: list[list[torch.Tensor]], index: int) -> torch.Tensor:
        j, b, off = self.viewed[index]
        info = self.plan.params[index]
        return buffers[j][b][off : off + info.numel].view(info.shape)

    def grad_view(self, index: int) -> torch.Tensor:
        return self._view(self.grads, index)

    def weight_view(self, index: int) -> torch.Tensor:
        return self._view(self.weights, index)

    def _check(self, index: int) -> torch.Tensor:
        p, info = self.params[index], self.plan.params[index]
        if p.dtype != info.dtype or tuple(p.shape) != info.shape or p.device.type != "cpu":
            raise ValueError(
                f"parameter {info.key!r} is now {p.dtype} {tuple(p.shape)} on {p.device}, but the job has it as "
                f"{info.dtype} {info.shape} on cpu: move or cast the model before making the RemoteOptimizer"
            )
        return p

    def _copy_pieces(self, to_buffers: bool, grads: bool, shard: int | None = None) -> None:
        """Copy the pieces that are not views, between the parameters (or their gradients) and the buffers."""
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
        """For a GPU model, device-host copies run on a side stream, after the work already queued, and are
        complete when the block ends (the host buffers are sent, or the model's next kernels read them)."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        self.stream.synchronize()

    def zero_grads(self, set_to_none: bool = True) -> None:
        """Zero the gradient buffers and point every viewed parameter's ``.grad`` at its place there; the
        copied parameters' gradients are cleared as torch's ``zero_grad(set_to_none)`` clears them."""
        for shard in self.grads:
            for buf in shard:
                buf.zero_()
        for index in self.viewed:
            p = self._check(index)
            if p.requires_grad:  # a frozen parameter keeps grad None, and the service skips it as torch does
                p.grad = self.grad_view(index)
        for index in {c[0] for c in self.copied}:
            p = self.params[index]
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    def missing(self, shard: int | None = None, reached: set[int] | None = None) -> list[int]:
        """The parameters (of ``shard``, if given) without a gradient, which torch.optim would skip: grad
        None, or, when ``reached`` is given, a grad still in its buffer place that backward did not reach."""
        indices = range(len(self.params)) if shard is None else self.members[shard]
        out = []
        for i in indices:
            grad = self.params[i].grad
            untouched_view = (
                reached is not None and i in self.viewed and i not in reached
                and grad is not None and grad.data_ptr() == self.grad_view(i).data_ptr()
            )
            if grad is None or untouched_view:
                out.append(i)
        return out

    def gather_grads(self, shard: int | None = None) -> list[list[torch.Tensor]]:
        """The gradients to push, per shard (of ``shard`` only, if given). A ``.grad`` the caller replaced
        (or set to None) is copied in (or zeroed) and re-pointed at the buffer."""
        indices = self.viewed if shard is None else [i for i in self.members[shard] if i in self.viewed]
        with torch.no_grad():
            for index in indices:
                p = self._check(index)
                view = self.grad_view(index)
                if p.grad is None:
                    view.zero_()
                    continue  # stays None (listed by ``missing``): a view would turn "no gradient" into zeros
                if p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                p.grad = view
            self._copy_pieces(to_buffers=True, grads=True, shard=shard)
        return self.grads

    def scatter_weights(self) -> None:
        """After a pull into ``weights``: the copied parameters take their values, and a parameter whose
        ``.data`` was rebound is pointed back at the buffer (the pulled weights are the job's)."""
        with torch.no_grad():
            for index in self.viewed:
                p = self._check(index)
                view = self.weight_view(index)
                if p.data_ptr() != view.data_ptr():
                    p.data = view
            self._copy_pieces(to_buffers=False, grads=False)
