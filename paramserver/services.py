"""gRPC servicers: they translate wire messages into calls on the hosts, and errors into status codes.

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
import hmac
import inspect
import itertools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from paramserver import codec, metrics, wire_values
from paramserver.errors import JobExistsError, JobFailedError, JobNotFoundError, NotReadyError, StepMismatchError
from paramserver.hosts import CoordinatorHost, Job, ShardHost
from paramserver.proto.v1 import paramserver_pb2 as pb
from paramserver.proto.v1 import paramserver_pb2_grpc as pb_grpc

log = logging.getLogger("paramserver")

VERSION_METADATA_KEY = "ps-version"


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


def job_info(job: Job, shard_addresses: list[str]) -> pb.JobInfo:
    plan = job.coordinator.plan
    return pb.JobInfo(
        job=job.name,
        version=job.coordinator.version,
        config=job.config,
        ready=job.ready,
        shards=[
            pb.ShardInfo(shard=j, address=shard_addresses[j], slices=[pb.SliceInfo(param=s.param, start=s.start, stop=s.stop) for s in slices])
            for j, slices in enumerate(plan.shards)
        ],
    )


class ShardServicer(pb_grpc.ShardServicer):
    def __init__(self, host: ShardHost, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.host = host
        self.chunk_bytes = chunk_bytes
        self.pool = codec.BufferPool()

    def _receive(self, request_iterator: Iterator[codec.Chunk], context: grpc.ServicerContext, check_step: bool) -> tuple[pb.ChunkHeader, list]:
        first = next(request_iterator, None)
        if first is None:
            raise ValueError("empty stream: no chunks")
        head = first.header
        if head.shard != self.host.shard_id:
            raise ValueError(f"this is shard {self.host.shard_id}, the chunks are for shard {head.shard}")
        shard = self.host.shard(head.job)
        if check_step and not shard.is_late_retry(head.worker, head.step):
            shard.check_step(head.step)  # fail a stale or future push before its bytes stream in
        layouts = shard.layouts
        assembler = codec.Assembler([layout.numel for layout in layouts], [layout.dtype for layout in layouts], allocate=self.pool.take)
        try:
            for chunk in itertools.chain([first], request_iterator):
                h = chunk.header
                if (h.job, h.worker, h.step, h.shard) != (head.job, head.worker, head.step, head.shard):
                    raise ValueError("chunks of one stream disagree on job, worker, step or shard")
                assembler.add(chunk)
            return head, assembler.result()
        except BaseException:
            self.pool.give_back([b for b in assembler.buffers if b is not None])
            raise

    @translate_errors
    def PushGradients(self, request_iterator: Iterator[codec.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        head, grads = self._receive(request_iterator, context, check_step=True)
        try:
            applied, version = self.host.push(head.job, head.worker, head.step, grads, list(head.missing_params))
        finally:
            # folded into the sum (or refused): the receive buffers can take the next push
            if not self.host.shard(head.job).holds(grads):
                self.pool.give_back(grads)
        metrics.BYTES_IN.labels(head.job, str(head.shard)).inc(sum(g.numel() * g.element_size() for g in grads))
        log.debug("job %s step %d: worker %d pushed to shard %d%s", head.job, head.step, head.worker, head.shard,
                  "" if applied else " (already applied)")
        return pb.PushReply(already_applied=not applied, version=version)

    @translate_errors
    def PushParameters(self, request_iterator: Iterator[codec.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        head, weights = self._receive(request_iterator, context, check_step=False)
        if head.worker != 0:
            raise ValueError(f"initial weights come from rank 0, not rank {head.worker}")
        try:
            self.host.initial_weights(head.job, weights)  # copied into the shard's weights
        finally:
            self.pool.give_back(weights)
        metrics.BYTES_IN.labels(head.job, str(head.shard)).inc(sum(w.numel() * w.element_size() for w in weights))
        log.info("job %s: shard %d has its initial weights", head.job, head.shard)
        return pb.PushReply(version=0)

    @translate_errors
    def PullParameters(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[codec.Chunk]:
        if request.shard != self.host.shard_id:
            raise ValueError(f"this is shard {self.host.shard_id}, the pull is for shard {request.shard}")
        version, weights = self.host.pull(request.job, request.min_version, context.time_remaining())
        yield from codec.encode(weights, self.chunk_bytes, job=request.job, worker=request.worker, step=version, shard=self.host.shard_id)
        metrics.BYTES_OUT.labels(request.job, str(self.host.shard_id)).inc(sum(w.numel() * w.element_size() for w in weights))


SHARD_SERVICE = pb.DESCRIPTOR.services_by_name["Shard"].full_name


def shard_handler(servicer: ShardServicer) -> grpc.GenericRpcHandler:
    """The Shard service with the data path's own chunk codec (wire-compatible with the generated code)."""
    return grpc.method_handlers_generic_handler(
        SHARD_SERVICE,
        {
            "PushGradients": grpc.stream_unary_rpc_method_handler(
                servicer.PushGradients, request_deserializer=codec.decode_chunk, response_serializer=pb.PushReply.SerializeToString
            ),
            "PushParameters": grpc.stream_unary_rpc_method_handler(
                servicer.PushParameters, request_deserializer=codec.decode_chunk, response_serializer=pb.PushReply.SerializeToString
            ),
            "PullParameters": grpc.unary_stream_rpc_method_handler(
                servicer.PullParameters, request_deserializer=pb.PullRequest.FromString, response_serializer=codec.encode_chunk
            ),
        },
    )


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, host: CoordinatorHost, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.host = host
        self.chunk_bytes = chunk_bytes

    @translate_errors
    def CreateJob(self, request: pb.CreateJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.host.create_job(request.job, request.config)
        log.info("job %s created: %s", request.job, job.coordinator.plan.describe())
        return job_info(job, self.host.shard_addresses)

    @translate_errors
    def JoinJob(self, request: pb.JoinJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        job = self.host.join_job(request.job, request.rank, context.time_remaining())
        log.info("job %s: worker %d joined", request.job, request.rank)
        return job_info(job, self.host.shard_addresses)

    @translate_errors
    def ReportMetrics(self, request: pb.ReportMetricsRequest, context: grpc.ServicerContext) -> pb.ReportMetricsReply:
        if "metric" in request.metrics:
            self.host.record_metric(request.job, request.worker, request.step, request.metrics["metric"])
        return pb.ReportMetricsReply()

    @translate_errors
    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        st = self.host.status(request.job)
        return pb.StatusReply(
            job=request.job,
            version=st["version"],
            num_workers=st["num_workers"],
            members=st["members"],
            shards=[pb.ShardStatus(shard=s["shard"], address=s["address"], version=s["version"], pushed_workers=s["pushed"], placement=s["placement"]) for s in st["shards"]],
            lrs=st["lrs"],
            skipped_steps=st["skipped_steps"],
            last_total_norm=st["last_total_norm"],
            waiting_for=st["waiting_for"],
            param_groups_json=[wire_values.dumps(g, "param group") for g in st["hyperparameters"]],
        )

    @translate_errors
    def LeaveJob(self, request: pb.LeaveJobRequest, context: grpc.ServicerContext) -> pb.LeaveJobReply:
        self.host.leave_job(request.job, request.worker)
        return pb.LeaveJobReply()

    @translate_errors
    def GetState(self, request: pb.StateRequest, context: grpc.ServicerContext) -> Iterator[pb.StateChunk]:
        state = self.host.job(request.job).coordinator.state_dict()
        tensors: list = []
        skeleton = json.dumps(wire_values.to_wire(state, "state", tensors))
        yield from codec.encode_state(skeleton, tensors, self.chunk_bytes, job=request.job)

    @translate_errors
    def LoadState(self, request_iterator: Iterator[pb.StateChunk], context: grpc.ServicerContext) -> pb.LoadStateReply:
        job, skeleton, tensors = codec.decode_state(request_iterator)
        try:
            state = wire_values.from_wire(json.loads(skeleton), tensors)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed state skeleton: {exc}") from exc
        if not isinstance(state, dict):
            raise ValueError("a state must be a dict with 'model', 'optimizer' and/or 'scheduler'")
        self.host.job(job).coordinator.load_state_dict(state)
        return pb.LoadStateReply()


    @translate_errors
    def Stop(self, request: pb.StopRequest, context: grpc.ServicerContext) -> pb.StopReply:
        log.info("stop requested")
        self.host.stop_requested.set()
        return pb.StopReply()


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call that lacks ``authorization: Bearer <token>`` (health checks included)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = deny

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: grpc.HandlerCallDetails) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(lambda it, ctx: self._deny(None, ctx))
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(self._deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(lambda req, ctx: self._deny(req, ctx))
        return grpc.unary_unary_rpc_method_handler(self._deny)
