"""``Checkpointer``: copies a job's state at a step boundary (the only time the step waits) and writes it on
a background thread, one checkpoint after another."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

from paramserver.checkpoint import state, store
from paramserver.core.coordinator import Coordinator

log = logging.getLogger("paramserver")


class Checkpointer:
    """Writes checkpoints of any number of jobs under ``root``, keeping each job's newest ``keep``."""

    def __init__(self, root: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}")
        self.root = root
        self.keep = keep
        # one thread: writes of a job never overlap, and each sees what the one before it left
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="paramserver-checkpoint")
        self.last_copy_s = 0.0  # how long the last save held its step (the copy)
        self.failures = 0

    def save(self, coordinator: Coordinator, job: str, *, config: bytes | None = None, members: Iterable[int] = ()) -> Future[int]:
        """Copy ``job``'s state now (at a step boundary) and write it in the background; the future holds the
        step written once the checkpoint is valid, or the write's error."""
        start = time.perf_counter()
        part, shards = state.take(coordinator, config=config, members=members)
        self.last_copy_s = time.perf_counter() - start
        future = self._pool.submit(self._write, job, part, shards)
        future.add_done_callback(self._report)
        return future

    def _write(self, job: str, part: dict, shards: list[dict]) -> int:
        store.write(self.root, job, part["step"], part, shards, self.keep)
        return part["step"]

    def _report(self, future: Future[int]) -> None:
        if future.exception() is not None:
            self.failures += 1  # the previous checkpoint stays valid; the next write cleans up after this one
            log.error("checkpoint write failed: %s: %s", type(future.exception()).__name__, future.exception())

    def close(self, wait: bool = True) -> None:
        """Stop taking checkpoints; ``wait``: finish the writes already begun."""
        self._pool.shutdown(wait=wait)
