"""The error table of paramserver.wire.errors, both ways: without a network, then over real gRPC.

* every error class of paramserver.core.errors has a row; reasons are unique; the docstring shows each row;
* error -> rich status -> error gives the same class, message and version, also through grpc_status's parser;
* without an ErrorInfo the client goes by the code, and never by the message text;
* translate_errors on sync and grpc.aio servers (plain, streaming, async generators), and the bearer-token
  interceptors (sync and aio) with reason UNAUTHENTICATED;
* through serve_local + ServiceClient: stale and future steps (with .version), unknown and existing jobs,
  a push before the initial weights, a wrong token.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import grpc.aio
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status as grpc_rpc_status

from paramserver.core import errors as core_errors
from paramserver.core.errors import (
    DeadlineExceededError,
    FutureStepError,
    InternalError,
    JobExistsError,
    JobNotFoundError,
    NotReadyError,
    StaleStepError,
    StepMismatchError,
    UnauthenticatedError,
)
from paramserver.service.auth import AsyncBearerTokenInterceptor, BearerTokenInterceptor
from paramserver.service.local import serve_local
from paramserver.service.status import rpc_status, translate_errors
from paramserver.wire import errors
from paramserver.wire.protocol import VERSION_METADATA_KEY
from tests.service.test_wire_errors import job_config
from workers.client import ServiceClient, error_from_rpc

Code = grpc.StatusCode
T = 5.0


def make(cls: type[Exception], message: str = "the message", version: int = 7) -> Exception:
    return cls(message, version) if issubclass(cls, StepMismatchError) else cls(message)


class Call:
    """What a client sees of a failed call (grpc_status's parser takes this)."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> tuple:
        return self._status.trailing_metadata


# -- the table, without a network ----------------------------------------------------------------------------------


def test_every_core_error_has_a_row_and_reasons_are_unique():
    ours = {c for _, c in inspect.getmembers(core_errors, inspect.isclass) if issubclass(c, Exception) and c.__module__ == core_errors.__name__}
    assert ours <= {k.cls for k in errors.TABLE}, ours - {k.cls for k in errors.TABLE}
    reasons = [k.reason for k in errors.TABLE]
    assert len(reasons) == len(set(reasons))
    assert len({k.cls for k in errors.TABLE}) == len(errors.TABLE)
    assert all(k.code != Code.OK and k.reason.isupper() and k.when for k in errors.TABLE)


def test_the_docstring_shows_the_table():
    assert errors.markdown_table() in errors.__doc__


def test_core_errors_keep_their_builtin_bases():
    for cls, base in [(StepMismatchError, ValueError), (NotReadyError, ValueError), (JobExistsError, ValueError),
                      (core_errors.NonFiniteGradientError, ValueError), (JobNotFoundError, LookupError),
                      (core_errors.JobFailedError, RuntimeError), (DeadlineExceededError, TimeoutError),
                      (UnauthenticatedError, PermissionError), (InternalError, RuntimeError)]:
        assert issubclass(cls, base), cls


@pytest.mark.parametrize("kind", errors.TABLE, ids=[k.reason for k in errors.TABLE])
def test_round_trip(kind):
    exc = make(kind.cls)
    status = rpc_status(exc)
    assert (status.code, status.details) == (kind.code, "the message")
    back = errors.to_exception(status.code, status.details, status.trailing_metadata)
    assert type(back) is kind.cls and str(back) == "the message"
    assert getattr(back, "version", None) == getattr(exc, "version", None)
    # the same through gRPC's own parser of the rich status
    proto = grpc_rpc_status.from_call(Call(status))
    assert proto is not None and len(proto.details) == 1
    info = error_details_pb2.ErrorInfo()
    assert proto.details[0].Unpack(info)
    assert (info.reason, info.domain) == (kind.reason, "paramserver")
    trailers = dict(status.trailing_metadata)
    if issubclass(kind.cls, StepMismatchError):
        assert dict(info.metadata) == {"version": "7"} and trailers[VERSION_METADATA_KEY] == "7"  # and for old clients
    else:
        assert dict(info.metadata) == {} and VERSION_METADATA_KEY not in trailers


@pytest.mark.parametrize(("exc", "code", "reason", "message"), [
    (TimeoutError("still at 3"), Code.DEADLINE_EXCEEDED, "DEADLINE", "still at 3"),
    (json.JSONDecodeError("bad", "{", 1), Code.INVALID_ARGUMENT, "INVALID_ARGUMENT", "bad: line 1 column 2 (char 1)"),
    (KeyError("k"), Code.INTERNAL, "INTERNAL", "KeyError: 'k'"),
    (ZeroDivisionError("x"), Code.INTERNAL, "INTERNAL", "ZeroDivisionError: x"),
    (PermissionError("x"), Code.INTERNAL, "INTERNAL", "PermissionError: x"),  # only our class means UNAUTHENTICATED
])
def test_builtins_take_their_row(exc, code, reason, message):
    status = rpc_status(exc)
    assert (status.code, status.details) == (code, message)
    assert errors.error_info(status.code, status.trailing_metadata).reason == reason


def test_a_wrapped_error_keeps_its_row():
    # Ray raises an actor's error as a class deriving from both its own error and the cause
    class RayTaskError(RuntimeError):
        pass

    wrapped = type("RayTaskError(JobNotFoundError)", (RayTaskError, JobNotFoundError), {})("no job 'x'")
    assert errors.kind_of(wrapped).reason == "JOB_NOT_FOUND"


def test_the_reason_decides_never_the_message():
    stale = rpc_status(StaleStepError("step 9 is not open yet", 2))  # a message that reads like a future step
    back = errors.to_exception(stale.code, stale.details, stale.trailing_metadata)
    assert type(back) is StaleStepError and back.version == 2
    # an old server: only the "ps-version" trailer, whatever the message says
    back = errors.to_exception(Code.FAILED_PRECONDITION, "step 0 has already closed", ((VERSION_METADATA_KEY, "2"),))
    assert type(back) is StepMismatchError and back.version == 2


@pytest.mark.parametrize(("code", "cls", "match"), [
    (Code.DEADLINE_EXCEEDED, DeadlineExceededError, "^Deadline Exceeded$"),
    (Code.UNAVAILABLE, ConnectionError, "^UNAVAILABLE: Deadline Exceeded$"),
    (Code.RESOURCE_EXHAUSTED, ValueError, "^message too large: "),
    (Code.INVALID_ARGUMENT, ValueError, "^Deadline Exceeded$"),
    (Code.NOT_FOUND, LookupError, ""),
    (Code.ALREADY_EXISTS, JobExistsError, ""),
    (Code.UNAUTHENTICATED, UnauthenticatedError, ""),
    (Code.PERMISSION_DENIED, PermissionError, ""),
    (Code.FAILED_PRECONDITION, ValueError, ""),
    (Code.INTERNAL, ConnectionError, "^INTERNAL: "),
    (Code.CANCELLED, ConnectionError, "^CANCELLED: "),
])
def test_without_error_info_the_code_decides(code, cls, match):
    back = errors.to_exception(code, "Deadline Exceeded", ())
    assert type(back) is cls and re.search(match, str(back)), (type(back), str(back))


def test_error_info_that_does_not_fit_is_ignored():
    status = rpc_status(JobNotFoundError("no job 'x'"))
    # a code that disagrees with the rich status (a proxy rewrote it): the code is the truth
    assert type(errors.to_exception(Code.UNAVAILABLE, "no job 'x'", status.trailing_metadata)) is ConnectionError
    # a reason this client does not know (a newer server), or another domain: by code
    proto = errors.status_proto(JobNotFoundError("no job 'x'"))
    for reason, domain in (("SOMETHING_NEW", "paramserver"), ("JOB_NOT_FOUND", "elsewhere")):
        info = error_details_pb2.ErrorInfo(reason=reason, domain=domain)
        proto.details[0].Pack(info)
        trailers = ((errors.DETAILS_KEY, proto.SerializeToString()),)
        assert type(errors.to_exception(Code.NOT_FOUND, "no job 'x'", trailers)) is LookupError
    assert type(errors.to_exception(Code.NOT_FOUND, "x", ((errors.DETAILS_KEY, b"\xff\xff"),))) is LookupError


# -- translate_errors and the interceptors on sync and aio servers ----------------------------------------------------

SERVICE = "test.Errors"
IDENTITY = {"request_deserializer": None, "response_serializer": None}


class SyncMethods:
    @translate_errors
    def Unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"abort":
            context.abort(Code.PERMISSION_DENIED, "aborted by the method")  # passes through as it is
        raise StaleStepError("step 1 has already closed (now at 3)", 3)

    @translate_errors
    def Stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"one"
        raise KeyError("k")


class AsyncMethods:
    @translate_errors
    async def Unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if request == b"abort":
            await context.abort(Code.PERMISSION_DENIED, "aborted by the method")
        await asyncio.sleep(0)
        raise StaleStepError("step 1 has already closed (now at 3)", 3)

    @translate_errors
    async def Stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"one"
        raise KeyError("k")


def _handler(methods: object) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(methods.Unary, **IDENTITY),
        "Stream": grpc.unary_stream_rpc_method_handler(methods.Stream, **IDENTITY),
    })


def test_translate_errors_keeps_its_kind_of_method():
    assert inspect.iscoroutinefunction(AsyncMethods.Unary) and inspect.isasyncgenfunction(AsyncMethods.Stream)
    assert inspect.isgeneratorfunction(SyncMethods.Stream) and not inspect.isgeneratorfunction(SyncMethods.Unary)


async def _calls(address: str, metadata: tuple = ()) -> list[grpc.RpcError]:
    """Four calls: stale, the method's own abort, a stream that fails after one item, unauthenticated-or-not."""
    found = []
    async with grpc.aio.insecure_channel(address) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        stream = channel.unary_stream(f"/{SERVICE}/Stream")
        for request in (b"stale", b"abort"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary(request, timeout=T, metadata=metadata)
            found.append(info.value)
        items = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in stream(b"", timeout=T, metadata=metadata):
                items.append(item)
        found.append(info.value)
        assert items == ([] if metadata == (("authorization", "Bearer nope"),) else [b"one"])
    return found


def _check_errors(found: list[grpc.RpcError]) -> None:
    stale, aborted, stream = (error_from_rpc(e) for e in found)
    assert type(stale) is StaleStepError and stale.version == 3 and str(stale) == "step 1 has already closed (now at 3)"
    assert dict(found[0].trailing_metadata())[VERSION_METADATA_KEY] == "3"
    assert found[1].code() == Code.PERMISSION_DENIED and found[1].details() == "aborted by the method"
    assert type(aborted) is PermissionError
    assert type(stream) is InternalError and str(stream) == "KeyError: 'k'"


async def _serve_aio(methods: object, interceptors: tuple = ()) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_handler(methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_sync_server():
    server = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[BearerTokenInterceptor("t")])
    server.add_generic_rpc_handlers((_handler(SyncMethods()),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _check_errors(asyncio.run(_calls(f"127.0.0.1:{port}", (("authorization", "Bearer t"),))))
        denied = asyncio.run(_calls(f"127.0.0.1:{port}", (("authorization", "Bearer nope"),)))
        assert all(type(error_from_rpc(e)) is UnauthenticatedError for e in denied)
        assert all(errors.error_info(e.code(), e.trailing_metadata()).reason == "UNAUTHENTICATED" for e in denied)
    finally:
        server.stop(None)


def test_aio_server():
    async def main() -> None:
        server, address = await _serve_aio(AsyncMethods(), (AsyncBearerTokenInterceptor("t"),))
        try:
            _check_errors(await _calls(address, (("authorization", "Bearer t"),)))
            denied = await _calls(address, (("authorization", "Bearer nope"),))
            assert all(type(error_from_rpc(e)) is UnauthenticatedError for e in denied)
            assert all(str(error_from_rpc(e)) == "missing or wrong bearer token" for e in denied)
        finally:
            await server.stop(None)

    asyncio.run(main())


# -- the service, through ServiceClient ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svc():
    with serve_local(2, host="127.0.0.1") as service:
        yield service


def _buffers(client: ServiceClient, value: float) -> list[list[torch.Tensor]]:
    assert client.plan is not None
    return [[torch.full((b.numel,), value, dtype=b.dtype) for b in client.plan.buffers(j)] for j in range(len(client.shards))]


def test_service_errors_come_back_as_their_classes(svc):
    client = ServiceClient(svc.address, "table", timeout=T)
    try:
        client.create_job(job_config(num_workers=1))
        with pytest.raises(NotReadyError, match="initial weights are not in place"):
            client.push(0, 0, _buffers(client, 1.0))
        client.push_initial_weights(_buffers(client, 0.0))
        for step in (0, 1):
            client.push(0, step, _buffers(client, 1.0))
            client.pull(0, step + 1)  # the push is answered before the step closes; the pull waits for the close
            assert client.status().version == step + 1
        with pytest.raises(StaleStepError, match=r"step 0 has already closed \(now at 2\)") as stale:
            client.push(0, 0, _buffers(client, 1.0))
        assert type(stale.value) is StaleStepError and stale.value.version == 2
        with pytest.raises(FutureStepError, match=r"step 5 is not open yet \(now at 2\)") as future:
            client.push(0, 5, _buffers(client, 1.0))
        assert type(future.value) is FutureStepError and future.value.version == 2
        with pytest.raises(JobExistsError, match="exists already with another configuration"):
            client.create_job(job_config(num_workers=2))
        assert client.status().version == 2  # nothing changed
    finally:
        client.close()
    other = ServiceClient(svc.address, "no-such-job", timeout=T)
    try:
        with pytest.raises(JobNotFoundError, match="no job 'no-such-job'"):
            other.status()
        with pytest.raises(DeadlineExceededError):
            other.join_job(1, timeout=0.3)
    finally:
        other.close()


def test_a_wrong_token_is_unauthenticated():
    with serve_local(1, host="127.0.0.1", auth_token="s3cret") as service:
        for token in (None, "nope"):
            client = ServiceClient(service.address, "job", auth_token=token, timeout=T)
            try:
                with pytest.raises(UnauthenticatedError, match="missing or wrong bearer token"):
                    client.status()
            finally:
                client.close()
        client = ServiceClient(service.address, "job", auth_token="s3cret", timeout=T)
        try:
            with pytest.raises(JobNotFoundError):
                client.status()
        finally:
            client.close()
