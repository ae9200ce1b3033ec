"""Errors across the wire, as one table: error class <-> gRPC status code <-> reason.

The server sends gRPC's rich status: a ``google.rpc.Status`` in the trailer ``grpc-status-details-bin``
with one ``google.rpc.ErrorInfo`` detail (domain "paramserver", the reason below, and metadata such as
"version"). The client rebuilds the class from the reason, never from the message text; it falls back on
the status code only when there is no ErrorInfo (errors made by gRPC itself, or an older server).

| class | code | reason | when |
|---|---|---|---|
| StaleStepError | FAILED_PRECONDITION | STALE_STEP | a push for a step that has already closed; carries the server's version |
| FutureStepError | FAILED_PRECONDITION | FUTURE_STEP | a push for a step that has not opened yet; carries the server's version |
| StepMismatchError | FAILED_PRECONDITION | STEP_MISMATCH | any other step mismatch (their base class); carries the server's version |
| StateReloadedError | FAILED_PRECONDITION | STATE_RELOADED | a push computed on weights a load has replaced (another generation); carries the loaded step |
| RolledBackError | ABORTED | ROLLED_BACK | a shard died and the job rolled back to its newest checkpoint; carries that step |
| NotReadyError | FAILED_PRECONDITION | NOT_READY | a push to a shard whose initial weights are not in place yet |
| NotAMemberError | FAILED_PRECONDITION | NOT_A_MEMBER | a worker that is not a member of the job (lease expired, left, or never joined); it may join again |
| JobFailedError | FAILED_PRECONDITION | JOB_FAILED | a step's update failed part-way: no step until a state is loaded |
| NonFiniteGradientError | INVALID_ARGUMENT | NONFINITE_GRADIENT | a gradient holds inf or nan and the job's policy is 'error' |
| JobExistsError | ALREADY_EXISTS | JOB_EXISTS | CreateJob names a job that exists with another configuration |
| JobNotFoundError | NOT_FOUND | JOB_NOT_FOUND | a call names a job the server does not have |
| JobFinishedError | FAILED_PRECONDITION | JOB_FINISHED | creating (or joining) a job whose workers all left after it trained: delete it, or join it as rank 0 to continue it |
| WrongServiceError | FAILED_PRECONDITION | WRONG_SERVICE | a Stop names another service instance than this one (GetServiceInfo's id) |
| ValueError | INVALID_ARGUMENT | INVALID_ARGUMENT | any other bad input: shape, dtype, size, chunks, worker, config |
| ShardLostError | UNAVAILABLE | SHARD_LOST | a shard's process died during the call; the worker re-resolves the shards and retries |
| DeadlineExceededError | DEADLINE_EXCEEDED | DEADLINE | a wait on the server ran out (any TimeoutError: a pull, a join) |
| UnauthenticatedError | UNAUTHENTICATED | UNAUTHENTICATED | no or the wrong bearer token (reflection included; health checks need none) |
| InternalError | INTERNAL | INTERNAL | anything else (a bug): the message names the exception, the log has the traceback |

"Carries the server's version": ErrorInfo.metadata["version"], and the trailer "ps-version" for older
clients; the client's error has it as ``.version``.

Without an ErrorInfo the client goes by the code: DEADLINE_EXCEEDED -> DeadlineExceededError (a
TimeoutError), UNAVAILABLE and other transport codes -> ConnectionError, RESOURCE_EXHAUSTED -> ValueError
("message too large"), INVALID_ARGUMENT -> ValueError, NOT_FOUND -> LookupError, UNAUTHENTICATED ->
UnauthenticatedError, PERMISSION_DENIED -> PermissionError, FAILED_PRECONDITION with a "ps-version"
trailer -> StepMismatchError.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from paramserver.core.errors import (
    DeadlineExceededError,
    FutureStepError,
    InternalError,
    JobExistsError,
    JobFailedError,
    JobFinishedError,
    JobNotFoundError,
    NonFiniteGradientError,
    NotAMemberError,
    NotReadyError,
    RolledBackError,
    ShardLostError,
    StaleStepError,
    StateReloadedError,
    StepMismatchError,
    UnauthenticatedError,
    WrongServiceError,
)
from paramserver.wire.protocol import VERSION_METADATA_KEY

DOMAIN = "paramserver"
VERSION_KEY = "version"  # ErrorInfo.metadata key of the server's version (a decimal string)
DETAILS_KEY = "grpc-status-details-bin"  # the trailer gRPC's rich status travels in (as rpc_status writes it)

Code = grpc.StatusCode


@dataclass(frozen=True)
class ErrorKind:
    """One row of the table: ``cls`` is what the server's error matches and what the client rebuilds."""

    cls: type[Exception]
    code: grpc.StatusCode
    reason: str
    when: str


TABLE: tuple[ErrorKind, ...] = (
    ErrorKind(StaleStepError, Code.FAILED_PRECONDITION, "STALE_STEP",
              "a push for a step that has already closed; carries the server's version"),
    ErrorKind(FutureStepError, Code.FAILED_PRECONDITION, "FUTURE_STEP",
              "a push for a step that has not opened yet; carries the server's version"),
    ErrorKind(StepMismatchError, Code.FAILED_PRECONDITION, "STEP_MISMATCH",
              "any other step mismatch (their base class); carries the server's version"),
    ErrorKind(StateReloadedError, Code.FAILED_PRECONDITION, "STATE_RELOADED",
              "a push computed on weights a load has replaced (another generation); carries the loaded step"),
    ErrorKind(RolledBackError, Code.ABORTED, "ROLLED_BACK",
              "a shard died and the job rolled back to its newest checkpoint; carries that step"),
    ErrorKind(NotReadyError, Code.FAILED_PRECONDITION, "NOT_READY",
              "a push to a shard whose initial weights are not in place yet"),
    ErrorKind(NotAMemberError, Code.FAILED_PRECONDITION, "NOT_A_MEMBER",
              "a worker that is not a member of the job (lease expired, left, or never joined); it may join again"),
    ErrorKind(JobFailedError, Code.FAILED_PRECONDITION, "JOB_FAILED",
              "a step's update failed part-way: no step until a state is loaded"),
    ErrorKind(NonFiniteGradientError, Code.INVALID_ARGUMENT, "NONFINITE_GRADIENT",
              "a gradient holds inf or nan and the job's policy is 'error'"),
    ErrorKind(JobExistsError, Code.ALREADY_EXISTS, "JOB_EXISTS",
              "CreateJob names a job that exists with another configuration"),
    ErrorKind(JobNotFoundError, Code.NOT_FOUND, "JOB_NOT_FOUND",
              "a call names a job the server does not have"),
    ErrorKind(JobFinishedError, Code.FAILED_PRECONDITION, "JOB_FINISHED",
              "creating (or joining) a job whose workers all left after it trained: delete it, or join it as rank 0 to continue it"),
    ErrorKind(WrongServiceError, Code.FAILED_PRECONDITION, "WRONG_SERVICE",
              "a Stop names another service instance than this one (GetServiceInfo's id)"),
    ErrorKind(ValueError, Code.INVALID_ARGUMENT, "INVALID_ARGUMENT",
              "any other bad input: shape, dtype, size, chunks, worker, config"),
    ErrorKind(ShardLostError, Code.UNAVAILABLE, "SHARD_LOST",
              "a shard's process died during the call; the worker re-resolves the shards and retries"),
    ErrorKind(DeadlineExceededError, Code.DEADLINE_EXCEEDED, "DEADLINE",
              "a wait on the server ran out (any TimeoutError: a pull, a join)"),
    ErrorKind(UnauthenticatedError, Code.UNAUTHENTICATED, "UNAUTHENTICATED",
              "no or the wrong bearer token (reflection included; health checks need none)"),
    ErrorKind(InternalError, Code.INTERNAL, "INTERNAL",
              "anything else (a bug): the message names the exception, the log has the traceback"),
)

_BY_CLASS: dict[type, ErrorKind] = {k.cls: k for k in TABLE}
_BY_REASON: dict[str, ErrorKind] = {k.reason: k for k in TABLE}
# Builtins the server raises that share a row with a class of ours.
_ALIASES: dict[type, type] = {TimeoutError: DeadlineExceededError, Exception: InternalError}

# Codes gRPC makes itself (or an older server without ErrorInfo): the class the client raises for each.
_BY_CODE: dict[grpc.StatusCode, type[Exception]] = {
    Code.INVALID_ARGUMENT: ValueError,
    Code.RESOURCE_EXHAUSTED: ValueError,
    Code.NOT_FOUND: LookupError,
    Code.ALREADY_EXISTS: JobExistsError,
    Code.UNAUTHENTICATED: UnauthenticatedError,
    Code.PERMISSION_DENIED: PermissionError,
    Code.DEADLINE_EXCEEDED: DeadlineExceededError,
}


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A ``grpc.Status`` (what ``abort_with_status`` takes; aio servers pass its fields to ``abort``)."""


def kind_of(exc: BaseException) -> ErrorKind:
    """The row of an error: the nearest class in its MRO that the table (or an alias) names."""
    for cls in type(exc).__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
        if cls in _ALIASES:
            return _BY_CLASS[_ALIASES[cls]]
    return _BY_CLASS[InternalError]  # a BaseException that is no Exception


def kind_by_reason(reason: str) -> ErrorKind | None:
    return _BY_REASON.get(reason)


def _version(exc: BaseException) -> int | None:
    return exc.version if isinstance(exc, StepMismatchError) else None


def _message(exc: BaseException, kind: ErrorKind) -> str:
    if kind.cls is InternalError and not isinstance(exc, InternalError):
        return f"{type(exc).__name__}: {exc}"  # str(KeyError) alone says little
    return str(exc)


def status_proto(exc: BaseException) -> status_pb2.Status:
    """The ``google.rpc.Status`` of an error, with its ErrorInfo detail."""
    kind = kind_of(exc)
    info = error_details_pb2.ErrorInfo(reason=kind.reason, domain=DOMAIN)
    version = _version(exc)
    if version is not None:
        info.metadata[VERSION_KEY] = str(version)
    detail = any_pb2.Any()
    detail.Pack(info)
    return status_pb2.Status(code=kind.code.value[0], message=_message(exc, kind), details=[detail])


def to_status(exc: BaseException) -> grpc.Status:
    """The ``grpc.Status`` to abort with: code, message, the rich status trailer and, for old clients,
    the version trailer "ps-version"."""
    status = rpc_status.to_status(status_proto(exc))
    version = _version(exc)
    if version is None:
        return status
    return _Status(status.code, status.details, (*status.trailing_metadata, (VERSION_METADATA_KEY, str(version))))


def error_info(code: grpc.StatusCode, trailing_metadata: Sequence[tuple[str, Any]] | None) -> error_details_pb2.ErrorInfo | None:
    """Our ErrorInfo from a call's trailers, or None (no rich status, another domain, or one whose code
    disagrees with the call's: then the code is the truth)."""
    raw = dict(trailing_metadata or ()).get(DETAILS_KEY)
    if not isinstance(raw, bytes):
        return None
    try:
        status = status_pb2.Status.FromString(raw)
    except DecodeError:  # a malformed trailer is as good as none
        return None
    if status.code != code.value[0]:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return info
    return None


def to_exception(code: grpc.StatusCode, details: str | None, trailing_metadata: Sequence[tuple[str, Any]] | None) -> Exception:
    """The Python error of a failed call: by ErrorInfo reason when the server sent one, else by code."""
    details = details or ""
    trailers = dict(trailing_metadata or ())
    info = error_info(code, trailing_metadata)
    kind = kind_by_reason(info.reason) if info is not None else None
    version_text = info.metadata.get(VERSION_KEY) if info is not None else None
    if version_text is None:
        version_text = trailers.get(VERSION_METADATA_KEY)
    try:
        version = None if version_text is None else int(version_text)
    except ValueError:
        version = None
    if kind is not None:
        if issubclass(kind.cls, StepMismatchError):
            if version is not None:
                return kind.cls(details, version)
        else:
            return kind.cls(details)
    return _from_code(code, details, version)


def _from_code(code: grpc.StatusCode, details: str, version: int | None) -> Exception:
    if code == Code.FAILED_PRECONDITION:
        return StepMismatchError(details, version) if version is not None else ValueError(details)
    if code == Code.RESOURCE_EXHAUSTED:
        return ValueError(f"message too large: {details}")
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(details)
    return ConnectionError(f"{code.name}: {details}")  # UNAVAILABLE, CANCELLED, UNKNOWN, INTERNAL from gRPC itself...


def markdown_table() -> str:
    """The table as markdown (for the README); the module docstring holds the same."""
    rows = ["| class | code | reason | when |", "|---|---|---|---|"]
    rows += [f"| {k.cls.__name__} | {k.code.name} | {k.reason} | {k.when} |" for k in TABLE]
    return "\n".join(rows)
