"""A shard's side of the shared-memory data plane: the segments of each worker of each job on this host.

Per (job, worker): a gradient segment the worker's ``param.grad`` live in and the shard reduces from, and the
weights the worker reads. Under synchronous steps those are the job's live weights on this shard, one segment
for all its workers (the shard's optimizer updates them in place; it never writes while a worker computes,
since the next update needs every worker's next push). Under other step policies an update may land while a
worker computes, so each worker gets a segment of its own that the shard copies the weights into at its pull.

For a shard on a GPU the segments it makes are page-locked (``Segment.pin``): the gradients go to the device
and the weights come back by DMA, at the link's speed.

Lifetimes: a worker's segments go when it detaches, leaves or is dropped (``keep``), when its job is deleted
(``drop_job``) and when the shard stops (``close``); the kernel frees their memory with the last mapping.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from paramserver.dataplane.segments import Segment, host_identity, layout_offsets


@dataclass
class Attachment:
    """One worker's shared memory on one shard."""

    grads: Segment
    grad_buffers: list[torch.Tensor]
    weights: Segment
    weight_buffers: list[torch.Tensor]
    shared_weights: bool  # the job's live weights (read-only for the worker) rather than its own copy
    offsets: list[int]


class SharedMemoryPlane:
    def __init__(self, host: str | None = None) -> None:
        self.host = host_identity() if host is None else host
        self._attached: dict[tuple[str, int], Attachment] = {}
        self._job_weights: dict[str, tuple[Segment, list[torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def attach(
        self, job: str, worker: int, sizes: Sequence[tuple[int, torch.dtype]], live_weights: Sequence[torch.Tensor] | None,
        pin: bool = False,
    ) -> tuple[Attachment, list[torch.Tensor] | None]:
        """New segments for ``worker`` (replacing any it had). ``live_weights``: the job's weights on this shard
        when workers may read them in place (synchronous steps, CPU); the first attach of the job moves them
        into a shared segment, whose buffers are returned for the shard to adopt (``Shard.place_weights``);
        None otherwise. ``pin``: page-lock the worker's segments for the shard's GPU. ``OSError`` when this
        host has no shared memory."""
        offsets, size = layout_offsets(sizes)
        with self._lock:
            self._drop(job, worker)
            grads = Segment.create(size)
            moved = None
            if live_weights is not None:
                if job not in self._job_weights:
                    segment = Segment.create(size)
                    self._job_weights[job] = (segment, segment.tensors(sizes))
                    moved = self._job_weights[job][1]
                weights, weight_buffers = self._job_weights[job]
            else:
                weights = Segment.create(size)
                weight_buffers = weights.tensors(sizes)
            attachment = Attachment(grads, grads.tensors(sizes), weights, weight_buffers, live_weights is not None, offsets)
            if pin:
                grads.pin()
                if not attachment.shared_weights:
                    weights.pin()
            self._attached[(job, worker)] = attachment
        return attachment, moved

    def get(self, job: str, worker: int) -> Attachment | None:
        with self._lock:
            return self._attached.get((job, worker))

    def workers(self, job: str) -> list[int]:
        with self._lock:
            return sorted(w for j, w in self._attached if j == job)

    def detach(self, job: str, worker: int) -> bool:
        with self._lock:
            return self._drop(job, worker)

    def keep(self, job: str, members: Collection[int]) -> None:
        """Let go of the segments of the job's workers that are no longer members (left, lease expired)."""
        with self._lock:
            for j, w in list(self._attached):
                if j == job and w not in members:
                    self._drop(j, w)

    def drop_job(self, job: str) -> None:
        with self._lock:
            for j, w in list(self._attached):
                if j == job:
                    self._drop(j, w)
            shared = self._job_weights.pop(job, None)
            if shared is not None:
                shared[0].unlink()

    def close(self) -> None:
        with self._lock:
            jobs = {j for j, _ in self._attached} | set(self._job_weights)
        for job in jobs:
            self.drop_job(job)

    def _drop(self, job: str, worker: int) -> bool:
        attachment = self._attached.pop((job, worker), None)
        if attachment is None:
            return False
        attachment.grads.unlink()  # a name the worker never claimed (it died, or could not open it)
        attachment.grads.unpin()  # before the mapping can go (with the last tensor over it)
        if not attachment.shared_weights:
            attachment.weights.unlink()
            attachment.weights.unpin()
        return True
