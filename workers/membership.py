"""A worker's membership in its job, the part of ``RemoteOptimizer`` that joins, leaves and keeps its lease:
``last_step``, ``leave()``, ``rejoin()`` and the lease renewals' thread. A mixin: it works on the optimizer's
client, buffers and step counters."""

from __future__ import annotations

import time
from typing import Any

from paramserver.core.config import default_of
from paramserver.core.errors import NotAMemberError
from workers.lease import LeaseRenewer

LAST_STEP_WAIT_S = 5.0  # how long ``last_step`` waits for the coordinator's report of the step just closed


class WorkerMembership:
    @property
    def last_step(self) -> dict[str, Any] | None:
        """The step that closed last, as the coordinator reports it (asked when this is read): ``step``,
        ``contributors`` (the sorted ranks whose gradients it averaged), ``total_norm``, ``lrs`` (per param
        group, for the next step) and ``skipped``. None before the job's first step closed."""
        # the shards publish a step's weights a moment before the coordinator records its report: ask again until
        # the report of this worker's last step is there (bounded)
        deadline = time.monotonic() + LAST_STEP_WAIT_S
        while True:
            status = self.client.status()
            current = status.HasField("last_step") and status.last_step.step + 1 >= self.step_count
            if current or self.step_count == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if not status.HasField("last_step"):
            return None
        last = status.last_step
        return {
            "step": last.step,
            "contributors": list(last.contributors),
            "based_on": last.based_on,
            "staleness": last.staleness,
            "total_norm": last.total_norm,
            "lrs": list(last.lrs),
            "skipped": last.skipped,
        }

    def leave(self) -> None:
        """Leave the job now: the open step no longer waits for this worker, and its lease is no longer renewed.
        Calling it again does nothing; ``rejoin()`` joins again."""
        self._stop_renewal()
        if self._left:
            return
        try:
            self.client.leave(self.rank)
        except NotAMemberError:
            pass  # dropped already
        self.client.detach_shared_memory(self.rank, [j for j, s in enumerate(self.client.shared) if s is not None])
        self._left = True
        self._not_a_member = NotAMemberError(f"worker {self.rank} left job {self.client.job!r}; rejoin() to go on")

    def rejoin(self) -> int:
        """Join the job again with this worker's rank (after ``leave()``, or after ``step()`` raised
        ``NotAMemberError``): pull the job's current weights into the model, set ``step_count`` to the step this
        worker goes on from (returned), and renew the lease again."""
        self._stop_renewal()
        self._drop_in_flight()
        info = self.client.join_job(self.rank, timeout=self.join_timeout)
        self._check_same_params()
        self._attach_shared_memory()  # a worker that left or was dropped lost its segments
        self._left = False
        self._not_a_member = None
        self._sent_step, self._sent_missing = None, {}
        self.step_count = self._resync(info.version)
        self._start_renewal(info)
        return self.step_count

    def _raise_if_not_a_member(self) -> None:
        error = self._not_a_member
        if error is not None:
            self._drop_in_flight()
            raise NotAMemberError(str(error))

    def _drop_in_flight(self) -> None:
        """Forget pushes started during backward (their step will not be completed by this worker)."""
        pushes, self._in_flight = getattr(self, "_in_flight", {}), {}
        for future in pushes.values():
            future.cancel()
        self._waiting = [len(m) for m in self.buffers.members]

    def _start_renewal(self, info: Any) -> None:
        """Renew the lease (the job's lease_timeout, from its config) on a daemon thread until ``_stop_renewal``."""
        lease = info.config.lease_timeout if info.config.HasField("lease_timeout") else default_of("lease_timeout")
        renewer = LeaseRenewer(self.client, self.rank, lease, self._dropped)
        with self._membership_lock:
            old, self._renewal = self._renewal, renewer
        if old is not None:
            old.stop()
        renewer.start()

    def _dropped(self, error: NotAMemberError) -> None:
        self._not_a_member = error  # the next step() raises it

    def _stop_renewal(self) -> None:
        with self._membership_lock:
            renewal, self._renewal = self._renewal, None
        if renewal is not None:
            renewal.stop()
