"""A shard's host: shard j of every job, as the Shard servicer reaches it. Nothing here knows gRPC or Ray."""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from paramserver.core.coordinator import Coordinator
from paramserver.core.errors import FutureStepError, JobNotFoundError, NotAMemberError, StaleStepError
from paramserver.core.shard import Shard
from paramserver.dataplane.plane import Attachment, SharedMemoryPlane
from paramserver.service.wakeup import LoopWakeup

MAX_WAIT_S = 300.0
log = logging.getLogger("paramserver")


class ShardHost:
    def __init__(self, shard_id: int, placement: str = "this process") -> None:
        self.shard_id = shard_id
        self.placement = placement
        self._shards: dict[str, Shard] = {}
        self._coordinators: dict[str, Coordinator] = {}
        self._locks: dict[str, threading.Lock] = {}
        # Called with (job, buffers) once a job's initial weights are in, the job's lock held (a primary hands
        # them to its standby, so that it starts from the same weights).
        self.on_initial_weights: Callable[[str, Sequence[torch.Tensor]], None] | None = None
        # called (job, step) after a shard took a step's mean ahead of the coordinator (a standby gets it too)
        self.on_reduced_ahead: Callable[[str, int], None] | None = None
        # asyncio pulls wait on these: per shard and event loop, one listener on the shard wakes them all
        self._watches: weakref.WeakKeyDictionary[Shard, dict[asyncio.AbstractEventLoop, LoopWakeup]] = weakref.WeakKeyDictionary()
        # workers on this host move their gradients and weights through shared memory (paramserver.dataplane)
        self.shared_memory = SharedMemoryPlane()
        # A push that completes this shard's part of a step reports it from its job's report thread and answers
        # at once: the step's close (the update on every shard) is not the pushing worker's wait; every worker
        # waits in its pull. One thread per job: its reports reach the coordinator in the order they were made.
        self._reports: dict[str, ThreadPoolExecutor] = {}

    def add_job(self, job: str, shard: Shard, coordinator: Any) -> None:
        """Host ``shard`` of ``job``; ``coordinator`` (anything with ``shard_ready(shard, step)``) may come
        later through ``set_coordinator`` when it lives elsewhere."""
        assert shard.shard_id == self.shard_id
        shard.placement = self.placement
        self._locks[job] = threading.Lock()
        if job not in self._reports:
            self._reports[job] = ThreadPoolExecutor(1, thread_name_prefix=f"paramserver-shard{self.shard_id}-report")
        self._coordinators[job] = coordinator
        self._shards[job] = shard
        # a worker that leaves or is dropped lets go of its shared memory
        shard.on_members = lambda members: self.shared_memory.keep(job, members)

    def set_coordinator(self, job: str, coordinator: Any) -> None:
        self.shard(job)
        self._coordinators[job] = coordinator

    def remove_job(self, job: str) -> None:
        self._shards.pop(job, None)
        self._coordinators.pop(job, None)
        self._locks.pop(job, None)
        reports = self._reports.pop(job, None)
        if reports is not None:
            reports.shutdown(wait=False, cancel_futures=True)
        self.shared_memory.drop_job(job)

    def close(self) -> None:
        """The host stops: every job's shared memory goes."""
        for reports in self._reports.values():
            reports.shutdown(wait=False, cancel_futures=True)
        self._reports.clear()
        self.shared_memory.close()

    def shard(self, job: str) -> Shard:
        try:
            return self._shards[job]
        except KeyError:
            raise JobNotFoundError(f"no job {job!r} on shard {self.shard_id}") from None

    def push(
        self, job: str, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = (), generation: int | None = None,
        release: Callable[[Sequence[torch.Tensor]], None] | None = None,
    ) -> tuple[bool, int]:
        """Add a worker's gradients (computed on the weights of ``generation``; None: not checked); when this
        shard then holds all of them, take the step's mean ahead and report to the coordinator, whose call closes
        the step if this was the last shard. The report goes out in the background: the push answers at once,
        and the workers learn of the close from their pulls (a close that fails makes them fail too). The report
        names the shard's generation, so one from before a load is ignored. ``release``: see ``Shard.push``.
        Returns (applied, version after)."""
        shard = self.shard(job)
        with self._locks[job]:  # held until the report is queued: reports are queued in the order they were read
            applied = shard.push(worker, step, grads, missing, generation, release)
            ready, now, version, holds = shard.ready_in()
            if applied and ready:
                # the mean and its norms travel with the report: the step's close need not ask this shard for them
                reduced = shard.reduce_ahead()
                if reduced is not None and self.on_reduced_ahead is not None:
                    self.on_reduced_ahead(job, version)
                reports = self._reports.get(job)
                if reports is not None:  # else the job went meanwhile
                    reports.submit(self._report, job, shard, version, now, holds, reduced)
        return applied, shard.version

    def _report(self, job: str, shard: Shard, version: int, generation: int, holds: dict[int, int], reduced: Any) -> None:
        coordinator = self._coordinators.get(job)
        if coordinator is None or self._shards.get(job) is not shard:
            return  # the job went meanwhile
        try:
            coordinator.shard_ready(self.shard_id, version, generation, holds, reduced)
        except (StaleStepError, FutureStepError) as exc:  # a report the job moved past (a load, a restarted coordinator)
            log.debug("shard %d: job %s's report of step %d: %s", self.shard_id, job, version, exc)
        except Exception as exc:  # noqa: BLE001 - the close failed: the workers waiting for it must not wait on
            reason = f"step {version} of job {job!r} did not close: {type(exc).__name__}: {exc}"
            log.error("shard %d: %s", self.shard_id, reason)
            shard.fail(reason)

    # -- shared memory ------------------------------------------------------------------------------------------

    def attach_shared_memory(self, job: str, worker: int) -> Attachment:
        """Segments for ``worker`` of ``job`` on this host. Under synchronous steps on a CPU shard the worker
        reads the job's live weights (moved into shared memory by the first attach); otherwise its own copy,
        written at each pull. A shard on a GPU page-locks the segments (its copies run by DMA). ``OSError``
        where there is no shared memory."""
        shard = self.shard(job)
        if not isinstance(worker, int) or not 0 <= worker < shard.num_workers:
            raise ValueError(f"shard {self.shard_id}: worker must be in [0, {shard.num_workers}), got {worker!r}")
        sizes = [(layout.numel, layout.dtype) for layout in shard.layouts]
        live = shard.device.type == "cpu" and shard.ledger is None and shard.quorum is None
        with shard.changing():  # the shard's lock first, then the plane's (as on a membership change); no copy under way
            attachment, moved = self.shared_memory.attach(job, worker, sizes, shard.weights if live else None,
                                                          pin=shard.device.type == "cuda")
            if moved is not None:
                shard.place_weights(moved)
        return attachment

    def attachment(self, job: str, worker: int) -> Attachment:
        attachment = self.shared_memory.get(job, worker)
        if attachment is None:
            shard = self.shard(job)
            if worker not in shard.members:
                raise NotAMemberError(f"shard {self.shard_id}: worker {worker} is not a member of job {job!r}: join again")
            raise ValueError(f"shard {self.shard_id}: worker {worker} of job {job!r} has no shared memory here: attach it first")
        return attachment

    def push_shared(self, job: str, worker: int, step: int, missing: Sequence[int] = (), generation: int | None = None) -> tuple[bool, int]:
        """``push`` of the gradients the worker wrote into its shared memory."""
        return self.push(job, worker, step, self.attachment(job, worker).grad_buffers, missing, generation)

    def write_pulled(self, job: str, worker: int) -> tuple[int, int]:
        """After a pull's wait: (version, generation) of the weights the worker now finds in its shared memory.
        A worker with a segment of its own gets the weights copied in, with their version, under the shard's
        lock (another worker's update may land any time under asynchronous steps); one that reads the job's
        live weights needs no copy."""
        attachment = self.attachment(job, worker)
        shard = self.shard(job)
        if attachment.shared_weights:
            return shard.version, shard.generation
        with shard._lock:
            for dst, src in zip(attachment.weight_buffers, shard.weights):
                dst.copy_(src)
            return shard.version, shard.generation

    def initial_weights(self, job: str, buffers: Sequence[torch.Tensor]) -> None:
        shard = self.shard(job)
        with self._locks[job]:
            if shard.version != 0 or shard.accumulator.received:
                raise ValueError(f"shard {self.shard_id}: job {job!r} has begun training; initial weights come before any gradient")
            shard.load_weights(buffers)
            if self.on_initial_weights is not None:
                self.on_initial_weights(job, buffers)

    def pull(
        self, job: str, min_version: int, timeout: float | None, generation: int | None = None, worker: int | None = None
    ) -> tuple[int, int, list[torch.Tensor]]:
        """Wait for ``min_version`` (or, ``generation`` given, for a load that started another generation),
        then (version, generation, flat weights). The weights are the live buffers, and safe to stream: the
        next update needs this worker's next push, which comes after this pull. The generation is read before
        them: the weights of a load are in place before its generation starts."""
        shard = self.shard(job)
        shard.wait_for_version(min_version, MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S), generation, worker)
        return _weights(shard)

    async def pull_async(
        self, job: str, min_version: int, timeout: float | None, generation: int | None = None, worker: int | None = None
    ) -> tuple[int, int, list[torch.Tensor]]:
        """``pull`` for an asyncio server: the wait holds no thread (the shard's version listener wakes it
        through the event loop). Raises ``TimeoutError`` when ``timeout`` (capped by ``MAX_WAIT_S``) passes."""
        return _weights(await self.wait_async(job, min_version, timeout, generation, worker))

    async def wait_async(
        self, job: str, min_version: int, timeout: float | None, generation: int | None = None, worker: int | None = None
    ) -> Shard:
        """The wait of ``pull_async``; returns the shard, ready to be read."""
        shard = self.shard(job)
        wait = MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S)
        loop = asyncio.get_running_loop()
        watches = self._watches.setdefault(shard, {})
        watch = watches.get(loop)
        if watch is None:
            watch = watches[loop] = LoopWakeup(loop)
            shard.add_version_listener(watch.changed)
        if not await watch.wait_until(lambda: shard.reached(min_version, generation, worker), loop.time() + wait):
            raise TimeoutError(
                f"shard {shard.shard_id}: still at version {shard.version}"
                f"{'' if shard.initialized else ' (not initialized)'} after {wait:.1f}s waiting for {min_version}"
            )
        shard.check_not_failed(min_version)
        return shard

    def waiting_pulls(self, job: str) -> int:
        """How many asyncio pulls of ``job`` wait for a version now (all event loops)."""
        return sum(len(w.waiters) for w in self._watches.get(self.shard(job), {}).values())

    def close_watches(self, loop: asyncio.AbstractEventLoop) -> None:
        """Unhook ``loop``'s listeners from every shard (its server stopped)."""
        for shard, watches in list(self._watches.items()):
            watch = watches.pop(loop, None)
            if watch is not None:
                shard.remove_version_listener(watch.changed)


def _weights(shard: Shard) -> tuple[int, int, list[torch.Tensor]]:
    """(version, generation, weights) to stream to a worker. Under synchronous steps the live buffers (no update
    runs before this worker pushes again); under asynchronous steps a copy, taken with the version under the
    shard's lock, since other workers' updates may land while it streams."""
    if shard.ledger is None:
        return shard.version, shard.generation, shard.weight_buffers()
    with shard._lock:
        return shard.version, shard.generation, shard.weight_copies()
