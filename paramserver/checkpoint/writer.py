"""``Checkpointer``: copies a job's state at a step boundary (the only time the step waits) and writes it in the
background, one checkpoint after another: each shard in its own process writes its own file there, shards in
this process are written by the Checkpointer's thread, which then writes the coordinator's file and the
manifest. A job's next copy waits for its write under way, so that at most one copy of its state is in flight."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from paramserver.checkpoint import state, store
from paramserver.core.coordinator import Coordinator
from paramserver.core.shard import SnapshotWrite
from paramserver.core.shards import ShardGroup

log = logging.getLogger("paramserver")

# How long a write waits for the shards' processes to report their files.
SHARD_WRITE_TIMEOUT_S = 300.0


class Checkpointer:
    """Writes checkpoints of any number of jobs under ``root``, keeping each job's newest ``keep``."""

    def __init__(
        self, root: str, keep: int = 3, shard_timeout: float = SHARD_WRITE_TIMEOUT_S, on_copy: Callable[[str, float], None] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.root = root
        self.keep = keep
        self.shard_timeout = shard_timeout
        # one thread: writes of a job never overlap, and each sees what the one before it left
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="paramserver-checkpoint")
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, int], Future[int]] = {}  # (job, step) -> its write, copied and not yet done
        self.last_copy_s = 0.0  # how long the last save held its step (the copy)
        self.on_copy = on_copy  # told (job, seconds) of every copy a save makes (metrics)
        self._warned_slow: set[str] = set()  # jobs told that their checkpoints come faster than they are written
        self.failures = 0

    def save(self, coordinator: Coordinator, job: str, *, config: bytes | None = None, members: Iterable[int] = ()) -> Future[int]:
        """Copy ``job``'s state now (at a step boundary) and write it in the background; the future holds the
        step written once the checkpoint is valid, or the write's error."""
        with coordinator._lock:  # re-entrant: the step hook holds it already
            key = (job, coordinator.step)
            with self._lock:
                under_way = self._in_flight.get(key)
            if under_way is not None:
                return under_way  # a periodic and an on-demand checkpoint of the same step
            if store.written(self.root, job, coordinator.step):
                return _settled(result=coordinator.step)  # its files stay as they are: no shard writes over a valid checkpoint
            late = self._wait_for_writes(job, coordinator.step)
            if late is not None:
                return _settled(error=late)
            start = time.perf_counter()
            part, writes = state.take(coordinator, self.root, job, config=config, members=members)
            self.last_copy_s = copy_s = time.perf_counter() - start
            if self.on_copy is not None:
                self.on_copy(job, copy_s)
            with self._lock:
                future = self._in_flight[key] = self._pool.submit(self._write, job, part, writes, coordinator.shards)
        future.add_done_callback(lambda f: self._report(key, f))
        return future

    def _wait_for_writes(self, job: str, step: int) -> TimeoutError | None:
        """Wait for ``job``'s writes under way before its next copy: each copy is the job's whole state, so
        checkpoints that come faster than they are written would pile up copies without bound. The step waits
        instead (a warning says so, once a job); after ``shard_timeout`` seconds this checkpoint is not taken."""
        with self._lock:
            under_way = [f for (j, _), f in self._in_flight.items() if j == job]
        if all(f.done() for f in under_way):
            return None
        start = time.perf_counter()
        _, pending = wait(under_way, timeout=self.shard_timeout)
        waited = time.perf_counter() - start
        if pending:
            self.failures += 1
            log.error("checkpoint of job %s at step %d not taken: the write before it is still under way after %.0f s", job, step, waited)
            return TimeoutError(f"the checkpoint write of job {job!r} before step {step} is still under way after {waited:.0f}s")
        if job not in self._warned_slow:
            self._warned_slow.add(job)
            log.warning(
                "checkpoints of job %s come faster than they are written: step %d waited %.2f s for the write before "
                "it (a larger checkpoint_every avoids the wait)", job, step, waited,
            )
        return None

    def _write(self, job: str, part: dict, writes: list[SnapshotWrite], shards: ShardGroup) -> int:
        step = part["step"]
        with self._lock:
            busy = {s for j, s in self._in_flight if j == job}
        if store.begin(self.root, job, step, in_flight=busy):
            store.finish(self.root, job, step, part, self._shard_files(writes, shards), self.keep)
        return step

    def _shard_files(self, writes: list[SnapshotWrite], shards: ShardGroup) -> list[dict]:
        """Each shard file's manifest entry: shards in this process (their copy is here) are written now; shards
        in their own processes wrote their files there, and report them (a shard group is all one or the other)."""
        if all(w.piece is not None for w in writes):
            return [write_snapshot(w) for w in writes]
        return shards.snapshots_written([w.path for w in writes], self.shard_timeout)

    def _report(self, key: tuple[str, int], future: Future[int]) -> None:
        with self._lock:
            self._in_flight.pop(key, None)
        if future.exception() is not None:
            self.failures += 1  # the previous checkpoint stays valid; the next write cleans up after this one
            log.error("checkpoint write failed: %s: %s", type(future.exception()).__name__, future.exception())

    def close(self, wait: bool = True) -> None:
        """Stop taking checkpoints; ``wait``: finish the writes already begun."""
        self._pool.shutdown(wait=wait)


def _settled(result: int | None = None, error: BaseException | None = None) -> Future[int]:
    future: Future[int] = Future()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
    return future


def write_snapshot(write: SnapshotWrite) -> dict:
    """Write a shard's copied piece to its file; then its buffers go back to the shard for its next copy."""
    assert write.piece is not None
    try:
        return store.write_file(write.path, write.piece)
    finally:
        if write.release is not None:
            write.release()
