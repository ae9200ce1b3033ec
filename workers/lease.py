"""A worker's lease on its job's membership, renewed on a daemon thread while the model computes (pushes and
pulls go to the shards, which renew nothing), so that a slow step never lets a live worker expire."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from paramserver.core.errors import NotAMemberError
from workers.client import ServiceClient

log = logging.getLogger("paramserver")


class LeaseRenewer:
    """Calls ``client.renew_lease(rank)`` every ``lease_timeout / 3`` seconds until ``stop()``. Other errors are
    logged and the next round tries again; ``NotAMemberError`` (the job dropped the worker) ends the renewals
    and is handed to ``on_dropped``."""

    def __init__(self, client: ServiceClient, rank: int, lease_timeout: float, on_dropped: Callable[[NotAMemberError], None]) -> None:
        self.client = client
        self.rank = rank
        self.lease_timeout = lease_timeout
        self.on_dropped = on_dropped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"paramserver-lease-{rank}", daemon=True)

    def start(self) -> LeaseRenewer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.lease_timeout / 3):
            try:
                self.client.renew_lease(self.rank, timeout=max(self.lease_timeout, 1.0))
            except NotAMemberError as exc:
                if not self._stop.is_set():  # a stop meanwhile (it left): not news
                    log.warning("job %s: worker %d is no longer a member: %s", self.client.job, self.rank, exc)
                    self.on_dropped(exc)
                return
            except Exception as exc:  # noqa: BLE001 - logged; the next renewal tries again
                if self._stop.is_set():
                    return
                log.warning("job %s: worker %d could not renew its lease: %s: %s", self.client.job, self.rank, type(exc).__name__, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)  # a renewal in flight may take its call's deadline; the thread is a daemon
