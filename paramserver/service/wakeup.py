"""Asyncio waits on a condition that other threads change, holding no thread while they wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopWakeup:
    """The waits of one event loop on one condition: one listener, ``changed``, called on the thread that
    changed the condition, wakes them all through the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiters: set[asyncio.Future[None]] = set()
        self.changed = self._changed  # one bound method, so that removing the listener finds it

    def _changed(self) -> None:
        # possibly with the changer's lock held: hand the news to the loop, nothing more
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:
            pass  # the loop is closed: nobody waits on it any more

    def _wake(self) -> None:
        waiters, self.waiters = self.waiters, set()
        for future in waiters:
            if not future.done():
                future.set_result(None)

    async def wait_until(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``ready()`` or the loop's clock reaches ``deadline``; returns ``ready()``.

        The check and the registration of the future run in one go on the loop, and every change is handed
        to the loop after it is made: no wake-up falls between them.
        """
        while not ready():
            remaining = deadline - self.loop.time()
            if remaining <= 0:
                return False
            changed = self.loop.create_future()
            self.waiters.add(changed)
            try:
                await asyncio.wait_for(changed, remaining)
            except asyncio.TimeoutError:
                pass  # the loop's condition says what it was
            finally:
                self.waiters.discard(changed)
        return True
