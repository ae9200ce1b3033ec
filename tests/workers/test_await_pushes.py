"""``RemoteOptimizer._await_pushes``: a push that pulls too answers only once its step closes, which another
shard's failed push may keep from happening; so the wait ends at the first failure and gives up the pushes still
under way (cancelled, to go again), instead of waiting for their deadline. Plain futures, no service."""

from __future__ import annotations

import time
from concurrent.futures import Future
from types import SimpleNamespace

from workers.remote_optimizer import RemoteOptimizer

TIMEOUT = 30.0


def _await(pushes: dict[int, Future]):  # noqa: ANN202
    return RemoteOptimizer._await_pushes(SimpleNamespace(rank=0, timeout=TIMEOUT), pushes)  # type: ignore[arg-type]


def _done(result: object = None, error: BaseException | None = None) -> Future:
    future: Future = Future()
    future.set_exception(error) if error is not None else future.set_result(result)
    return future


def test_every_push_answered():
    assert _await({0: _done("a"), 1: _done("b")}) == ({}, [])


def test_a_failure_gives_up_the_pushes_under_way_at_once():
    waiting, gone = Future(), ConnectionError("shard 1 is gone")
    start = time.monotonic()
    failures, given_up = _await({0: waiting, 1: _done(error=gone), 2: _done("answered")})
    assert time.monotonic() - start < TIMEOUT / 2  # not the deadline of the push under way
    assert failures == {1: gone} and given_up == [0] and waiting.cancelled()


def test_a_cancelled_push_counts_as_failed():
    cancelled = Future()
    cancelled.cancel()
    cancelled.set_running_or_notify_cancel()  # as a gRPC call's future (workers.client.CallFuture) is
    failures, given_up = _await({0: cancelled, 1: _done("answered")})
    assert list(failures) == [0] and type(failures[0]).__name__ == "CancelledError" and given_up == []
