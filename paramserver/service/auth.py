"""Bearer-token authentication for every server of the service (sync ``grpc.server`` and ``grpc.aio``).

A refused call ends UNAUTHENTICATED with the rich status of ``UnauthenticatedError`` (reason
"UNAUTHENTICATED"), so the client raises that class. Health checks (``grpc.health.v1.Health/*``) answer without
a token: Kubernetes' gRPC probes and grpc_health_probe send none, and a health answer tells nothing but
"serving". Every other call needs it: reflection, and Stop (which also names the service instance it stops).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from paramserver.core.errors import UnauthenticatedError
from paramserver.service.status import rpc_status

log = logging.getLogger("paramserver")

DENIED = "missing or wrong bearer token"
# Methods under this prefix need no token (gRPC health checking).
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def _open(handler_call_details: grpc.HandlerCallDetails) -> bool:
    method = handler_call_details.method or ""
    return method.startswith(OPEN_PREFIXES)


class _Token:
    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def accepts(self, handler_call_details: grpc.HandlerCallDetails) -> bool:
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected)


def _denying(handler: grpc.RpcMethodHandler, deny: Callable[[Any, Any], Any]) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` whose every call is ``deny``; the request is never read."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call that lacks ``authorization: Bearer <token>``, health checks excepted."""

    def __init__(self, token: str) -> None:
        self._token = _Token(token)
        status = rpc_status(UnauthenticatedError(DENIED))

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort_with_status(status)

        self._deny = deny

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or _open(handler_call_details) or self._token.accepts(handler_call_details):
            return handler
        return _denying(handler, self._deny)


class AsyncBearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """The same check for a ``grpc.aio`` server."""

    def __init__(self, token: str) -> None:
        self._token = _Token(token)
        status = rpc_status(UnauthenticatedError(DENIED))

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(status.code, status.details, status.trailing_metadata)

        self._deny = deny

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]], handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or _open(handler_call_details) or self._token.accepts(handler_call_details):
            return handler
        return _denying(handler, self._deny)
