"""A ``grpc.aio`` server on its own event loop, in a background thread, for callers that are not async.

``AioServer`` has the part of ``grpc.Server``'s shape the service uses: ``stop(grace)`` returns a
``threading.Event`` (set once the server has stopped and its loop is closed), so ``server.stop(1.0).wait(5.0)``
works as with a thread-pool server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc.aio

log = logging.getLogger("paramserver")

T = TypeVar("T")
START_TIMEOUT_S = 60.0


class AioServer:
    """Runs ``build()`` (a coroutine function that makes, binds and starts a ``grpc.aio.Server`` and returns it
    with its port) on a new event loop in a daemon thread. ``on_stop`` callbacks run on the loop once the
    server has stopped (free what the servicers hold: thread pools, listeners)."""

    def __init__(self, build: Callable[[], Awaitable[tuple[grpc.aio.Server, int]]], name: str = "grpc-aio") -> None:
        self._loop = asyncio.new_event_loop()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._on_stop: list[Callable[[], Any]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        try:
            self.server, self.port = self.call(build(), START_TIMEOUT_S)
        except BaseException:
            self.stop(None).wait(START_TIMEOUT_S)
            raise

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
            # stopped: end what is left (a call the server's stop did not reach), then close the loop
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        except Exception:  # the loop thread must always end and say so
            log.exception("the event loop of a gRPC server failed")
        finally:
            self._loop.close()
            self._stopped.set()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the server's loop and wait for its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def on_stop(self, callback: Callable[[], Any]) -> None:
        self._on_stop.append(callback)

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving: new calls are refused at once, calls in flight may finish within ``grace`` seconds
        (None: none may), then the rest are cancelled. Returns an event set when all is stopped."""
        with self._stop_lock:
            if not self._stopping:
                self._stopping = True
                try:
                    self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._stop(grace)))
                except RuntimeError:  # the loop is closed already
                    self._stopped.set()
        return self._stopped

    async def _stop(self, grace: float | None) -> None:
        try:
            server = getattr(self, "server", None)
            if server is not None:
                await server.stop(grace)
            for callback in self._on_stop:
                try:
                    callback()
                except Exception:  # one failing clean-up must not keep the others from running
                    log.exception("cleaning up after a gRPC server")
        finally:
            self._loop.stop()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """As ``grpc.Server.wait_for_termination``: True if ``timeout`` passed before the server stopped."""
        return not self._stopped.wait(timeout)
