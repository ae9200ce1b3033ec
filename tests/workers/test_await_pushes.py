"""``RemoteOptimizer._await_pushes``: a push that pulls too answers only once its step closes, which another
shard's failed push may keep from happening; so the wait ends at the first failure and gives up the pushes still
under way (cancelled, to go again), instead of waiting for their deadline. And ``workers.client.CallFuture``, the
future such a push is: a gRPC call under way whose cancel cancels the call. Plain futures, no service."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, wait
from types import SimpleNamespace

import grpc
import pytest

from workers.client import CallFuture
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


# -- CallFuture: a gRPC call under way as a concurrent future ---------------------------------------------------


class _Call(grpc.Future):
    """A unary call under way, ended by the test (``reply``, ``fail``) or cancelled by the caller."""

    def __init__(self) -> None:
        self._callbacks: list = []
        self._outcome: tuple[str, object] | None = None

    def _end(self, kind: str, value: object) -> None:
        self._outcome = (kind, value)
        for callback in self._callbacks:
            callback(self)

    def reply(self, value: object) -> None:
        self._end("reply", value)

    def fail(self, error: grpc.RpcError) -> None:
        self._end("error", error)

    def cancel(self) -> bool:
        if self._outcome is None:
            self._end("cancelled", None)
        return True

    def result(self, timeout=None):  # noqa: ANN001, ANN201
        assert self._outcome is not None
        kind, value = self._outcome
        if kind == "cancelled":
            raise grpc.FutureCancelledError()
        if kind == "error":
            raise value  # type: ignore[misc]
        return value

    def add_done_callback(self, fn) -> None:  # noqa: ANN001
        self._callbacks.append(fn) if self._outcome is None else fn(self)

    def cancelled(self) -> bool:
        return self._outcome is not None and self._outcome[0] == "cancelled"

    def running(self) -> bool:
        return self._outcome is None

    def done(self) -> bool:
        return self._outcome is not None

    def exception(self, timeout=None):  # noqa: ANN001, ANN201
        return None

    def traceback(self, timeout=None):  # noqa: ANN001, ANN201
        return None


class _NotFound(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "no job 'j' on shard 0"

    def trailing_metadata(self) -> tuple:
        return ()


def test_a_call_future_holds_the_reply_or_the_translated_error():
    answered, refused = _Call(), _Call()
    ok, failed = CallFuture(answered), CallFuture(refused)
    assert not ok.done() and not failed.done()
    answered.reply("the reply")
    refused.fail(_NotFound())
    assert ok.result(timeout=1) == "the reply"
    with pytest.raises(LookupError, match="no job 'j' on shard 0"):  # as the blocking calls raise it (error_from_rpc)
        failed.result(timeout=1)


def test_cancelling_a_call_future_cancels_the_call_and_wakes_its_waiters():
    call = _Call()
    future = CallFuture(call)
    waiter = threading.Thread(target=lambda: wait([future], timeout=TIMEOUT))
    waiter.start()
    assert future.cancel() and call.cancelled() and future.cancelled()
    waiter.join(timeout=TIMEOUT / 2)
    assert not waiter.is_alive()  # concurrent.futures.wait counts it as done at once
    assert future.cancel()  # again: still cancelled, nothing raised
    ended = CallFuture(_Call())
    ended._call.reply("late")  # type: ignore[attr-defined]
    assert not ended.cancel() and ended.result() == "late"  # a call that ended first is not cancelled
