"""Errors to gRPC statuses: every error a servicer raises leaves with the rich status of its row in
``paramserver.wire.errors`` (code, message, ErrorInfo reason; the version of a stale or future step).

``translate_errors`` decorates servicer methods of any kind: plain, server-streaming (generators), and
the ``async def`` methods and async generators of a ``grpc.aio`` server. ``rpc_status(exc)`` gives the
``grpc.Status`` for code that aborts by itself (aio: ``await context.abort(s.code, s.details, s.trailing_metadata)``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio

from paramserver.wire import errors

log = logging.getLogger("paramserver")


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code of an error (its row in the table)."""
    return errors.kind_of(exc).code


def rpc_status(exc: BaseException) -> grpc.Status:
    """The status to abort with: code, message, rich-status trailer (and "ps-version" where it applies)."""
    return errors.to_status(exc)


def _is_sync_abort(exc: Exception, context: Any) -> bool:
    # A sync context's abort() raises a bare Exception() after recording the status; let it through
    # instead of turning it into INTERNAL.
    if type(exc) is not Exception or exc.args:
        return False
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - a context without code() cannot have aborted this way
        return False
    return code is not None and code != grpc.StatusCode.OK


def _status_of(exc: Exception, name: str) -> grpc.Status:
    status = rpc_status(exc)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("internal error in %s", name, exc_info=exc)
    return status


def translate_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Abort the call with the status that fits the error; the message names the problem."""
    name = method.__name__

    if inspect.isasyncgenfunction(method):  # an aio server-streaming method

        @functools.wraps(method)
        async def async_stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise  # aborted already, by the method itself
            except Exception as exc:  # noqa: BLE001 - every error leaves with a status; unexpected ones as INTERNAL, logged
                status = _status_of(exc, name)
                await context.abort(status.code, status.details, status.trailing_metadata)

        return async_stream

    if inspect.iscoroutinefunction(method):  # an aio unary-reply method

        @functools.wraps(method)
        async def async_unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every error leaves with a status; unexpected ones as INTERNAL, logged
                status = _status_of(exc, name)
                await context.abort(status.code, status.details, status.trailing_metadata)

        return async_unary

    def abort(context: grpc.ServicerContext, exc: Exception) -> None:
        if _is_sync_abort(exc, context):
            raise exc
        context.abort_with_status(_status_of(exc, name))

    if inspect.isgeneratorfunction(method):  # a server-streaming method

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error leaves with a status; unexpected ones as INTERNAL, logged
                abort(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error leaves with a status; unexpected ones as INTERNAL, logged
            abort(context, exc)

    return unary
