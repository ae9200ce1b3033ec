"""Errors to gRPC status codes: every error a servicer raises leaves with a status that fits it.

| error                                   | status              |
|-----------------------------------------|---------------------|
| ValueError (bad shape, dtype, config)   | INVALID_ARGUMENT    |
| StaleStepError / FutureStepError        | FAILED_PRECONDITION (trailing metadata "ps-version") |
| NotReadyError                           | FAILED_PRECONDITION |
| JobNotFoundError                        | NOT_FOUND           |
| JobExistsError                          | ALREADY_EXISTS      |
| TimeoutError                            | DEADLINE_EXCEEDED   |
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from paramserver.core.errors import (
    JobExistsError,
    JobFailedError,
    JobNotFoundError,
    NotReadyError,
    StepMismatchError,
)
from paramserver.wire.protocol import VERSION_METADATA_KEY

log = logging.getLogger("paramserver")


def status_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, (StepMismatchError, NotReadyError, JobFailedError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, JobExistsError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, JobNotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def translate_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Abort the call with the status that fits the error; the message names the problem."""

    def abort(context: grpc.ServicerContext, exc: Exception) -> None:
        code = status_for(exc)
        if isinstance(exc, StepMismatchError):
            context.set_trailing_metadata(((VERSION_METADATA_KEY, str(exc.version)),))
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", method.__name__)
        context.abort(code, str(exc))

    if inspect.isgeneratorfunction(method):  # a server-streaming method

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # every error leaves with a status; unexpected ones as INTERNAL, logged
                abort(context, exc)

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # every error leaves with a status; unexpected ones as INTERNAL, logged
            abort(context, exc)

    return unary
