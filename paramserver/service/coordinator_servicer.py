"""The Coordinator service, the front door: jobs, membership, status, state in torch's formats, the service's
identity, stop.

It runs on a ``grpc.aio`` server (``create_coordinator_server``): every method is a coroutine."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

import grpc
import grpc.aio

from paramserver.core.coordinator import StepResult
from paramserver.core.errors import WrongServiceError
from paramserver.core.state import loaded_step
from paramserver.service.coordinator_host import RECOVER_TIMEOUT_S, CoordinatorHost
from paramserver.service.jobs import Job
from paramserver.service.shard_host import MAX_WAIT_S
from paramserver.service.status import translate_errors
from paramserver.wire import codec, jobconfig, json_values
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc

log = logging.getLogger("paramserver")

T = TypeVar("T")


def job_info(job: Job, shard_addresses: list[str]) -> pb.JobInfo:
    plan = job.coordinator.plan
    return pb.JobInfo(
        job=job.name,
        version=job.coordinator.version,
        config=job.config,
        ready=job.ready,
        generation=job.coordinator.generation,
        shards=[
            pb.ShardInfo(shard=j, address=shard_addresses[j], slices=[pb.SliceInfo(param=s.param, start=s.start, stop=s.stop) for s in slices])
            for j, slices in enumerate(plan.shards)
        ],
    )


def step_report(result: StepResult) -> pb.StepReport:
    report = pb.StepReport(
        step=result.step, total_norm=result.total_norm, skipped=result.skipped, lrs=result.lrs, error=result.error or "",
        contributors=sorted(result.contributors), based_on=result.based_on or 0, staleness=result.staleness or 0,
    )
    if result.clip_coef is not None:
        report.clip_coef = result.clip_coef
    return report


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """On a ``grpc.aio`` server. A JoinJob that waits for rank 0 waits on the event loop (no thread); whatever
    may block or cost CPU (creating a job, which on Ray calls every shard actor; status; state) runs on
    ``work``, a small thread pool, so the loop keeps serving the other calls meanwhile."""

    def __init__(self, host: CoordinatorHost, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES, work: Executor | None = None) -> None:
        self.host = host
        self.chunk_bytes = chunk_bytes
        self.work = work  # None: the event loop's default executor

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.work, fn, *args)

    @translate_errors
    async def CreateJob(self, request: pb.CreateJobRequest, context: grpc.aio.ServicerContext) -> pb.JobInfo:
        return await self._run(self._create_job, request)

    def _create_job(self, request: pb.CreateJobRequest) -> pb.JobInfo:
        # defaults written out: a client that leaves a field out means the default, and a retry matches
        job = self.host.create_job(request.job, jobconfig.canonical(request.config))
        log.info("job %s created: %s", request.job, job.coordinator.plan.describe())
        return job_info(job, self.host.shard_addresses)

    @translate_errors
    async def JoinJob(self, request: pb.JoinJobRequest, context: grpc.aio.ServicerContext) -> pb.JobInfo:
        # a worker that lost a shard joins again: a shard that died and restarted is noticed (and the job
        # rolled back) before the answer names the shards' addresses
        await self._run(self.host.recover_shards, RECOVER_TIMEOUT_S)
        # waits for rank 0's job and initial weights on the loop, until the call's deadline (capped)
        job = await self.host.wait_joinable(request.job, request.rank, context.time_remaining())
        return await self._run(self._joined, job, request.rank)

    def _joined(self, job: Job, rank: int) -> pb.JobInfo:
        self.host.add_member(job, rank)
        self.host.renew_lease(job.name, rank)  # a member again, with a fresh lease
        log.info("job %s: worker %d joined", job.name, rank)
        return job_info(job, self.host.shard_addresses)

    @translate_errors
    async def ReportMetrics(self, request: pb.ReportMetricsRequest, context: grpc.aio.ServicerContext) -> pb.ReportMetricsReply:
        await self._run(self._report_metrics, request)
        return pb.ReportMetricsReply()

    def _report_metrics(self, request: pb.ReportMetricsRequest) -> None:
        # a worker's call renews its lease; a worker that is no member is told so (NotAMemberError) and its
        # metric is not recorded
        self.host.renew_lease(request.job, request.worker)
        if "metric" in request.metrics:
            self.host.record_metric(request.job, request.worker, request.step, request.metrics["metric"])

    @translate_errors
    async def RenewLease(self, request: pb.RenewLeaseRequest, context: grpc.aio.ServicerContext) -> pb.RenewLeaseReply:
        # NotAMemberError (lease expired, left, never joined) -> FAILED_PRECONDITION / NOT_A_MEMBER
        epoch = await self._run(self.host.renew_lease, request.job, request.worker, request.transport)
        return pb.RenewLeaseReply(epoch=epoch)

    @translate_errors
    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        return await self._run(self._status, request)

    def _status(self, request: pb.StatusRequest) -> pb.StatusReply:
        st = self.host.status(request.job)
        reply = pb.StatusReply(
            job=request.job,
            version=st["version"],
            num_workers=st["num_workers"],
            members=st["members"],
            shards=[pb.ShardStatus(shard=s["shard"], address=s["address"], version=s["version"], pushed_workers=s["pushed"], placement=s["placement"]) for s in st["shards"]],
            lrs=st["lrs"],
            skipped_steps=st["skipped_steps"],
            last_total_norm=st["last_total_norm"],
            waiting_for=st["waiting_for"],
            param_groups_json=[json_values.dumps(g, "param group") for g in st["hyperparameters"]],
            epoch=st.get("epoch", 0),
            changes=[pb.MembershipChange(rank=c["rank"], reason=c["reason"], step=c["step"]) for c in st.get("changes", ())],
            transports=st.get("transports", {}),
            state=st.get("state", ""),
        )
        last = self.host.job(request.job).coordinator.last_result
        if last is not None:
            reply.last_step.CopyFrom(step_report(last))
        return reply

    @translate_errors
    async def LeaveJob(self, request: pb.LeaveJobRequest, context: grpc.aio.ServicerContext) -> pb.LeaveJobReply:
        await self._run(self.host.leave_job, request.job, request.worker)
        return pb.LeaveJobReply()

    @translate_errors
    async def GetState(self, request: pb.StateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StateChunk]:
        chunks = await self._run(self._state_chunks, request.job)
        # each chunk copies its bytes out of a tensor: on the pool, one at a time, as the stream takes them
        while (chunk := await self._run(next, chunks, None)) is not None:
            yield chunk

    def _state_chunks(self, job: str) -> Iterator[pb.StateChunk]:
        state = self.host.job(job).coordinator.state_dict()
        tensors: list = []
        skeleton = json.dumps(json_values.to_wire(state, "state", tensors))
        return codec.encode_state(skeleton, tensors, self.chunk_bytes, job=job)

    @translate_errors
    async def LoadState(self, request_iterator: AsyncIterator[pb.StateChunk], context: grpc.aio.ServicerContext) -> pb.LoadStateReply:
        # The chunks are decoded on the pool as they arrive (one buffer per tensor, as the sync decoder
        # does); the pool thread takes each next chunk from the stream on the loop, within the deadline.
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = time.monotonic() + (MAX_WAIT_S if remaining is None else min(remaining, MAX_WAIT_S))
        stream = request_iterator.__aiter__()

        def next_chunk() -> pb.StateChunk | None:  # on a pool thread
            future = asyncio.run_coroutine_threadsafe(_next_or_none(stream), loop)
            try:
                return future.result(max(0.0, deadline - time.monotonic()))
            except BaseException:
                future.cancel()
                raise

        await self._run(self._load_state, iter(next_chunk, None))
        return pb.LoadStateReply()

    def _load_state(self, chunks: Iterator[pb.StateChunk]) -> None:
        first = next(chunks, None)
        if first is None:
            raise ValueError("empty state stream")
        job, skeleton, tensors = codec.decode_state(itertools.chain([first], chunks))
        try:
            state = json_values.from_wire(json.loads(skeleton), tensors)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed state skeleton: {exc}") from exc
        if not isinstance(state, dict):
            raise ValueError("a state must be a dict with 'model', 'optimizer' and/or 'scheduler'")
        coordinator = self.host.job(job).coordinator
        # the step the job goes on from: the client's word, else what the state says, else where the job is
        step = first.step if first.HasField("step") else loaded_step(state, coordinator.schedule.interval)
        coordinator.load_state_dict(state, step)
        log.info("job %s: a state was loaded; the job goes on from step %d in weights generation %d", job, coordinator.step, coordinator.generation)

    @translate_errors
    async def Checkpoint(self, request: pb.CheckpointRequest, context: grpc.aio.ServicerContext) -> pb.CheckpointReply:
        step = await self._run(self._checkpoint, request.job, context.time_remaining())
        return pb.CheckpointReply(job=request.job, step=step)

    def _checkpoint(self, job: str, remaining: float | None) -> int:
        if self.host.checkpoints is None:
            raise ValueError("this service has no checkpoint_dir: start it with one to take checkpoints")
        # the copy happens now, under the job's lock; the reply waits until the write made it valid
        return self.host.checkpoints.save(job).result(MAX_WAIT_S if remaining is None else min(remaining, MAX_WAIT_S))

    @translate_errors
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: grpc.aio.ServicerContext) -> pb.DeleteJobReply:
        await self._run(self.host.delete_job, request.job)
        return pb.DeleteJobReply()

    @translate_errors
    async def GetServiceInfo(self, request: pb.ServiceInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServiceInfo:
        return pb.ServiceInfo(service_id=self.host.service_id, shard_addresses=list(self.host.shard_addresses))

    @translate_errors
    async def Stop(self, request: pb.StopRequest, context: grpc.aio.ServicerContext) -> pb.StopReply:
        # A stop names the instance it stops: an empty request (or any payload that happens to parse as one)
        # stops nothing, nor does one meant for an earlier start of the service or another service.
        if not request.service_id:
            raise ValueError("a Stop must name the service it stops (service_id, from GetServiceInfo)")
        if request.service_id != self.host.service_id:
            raise WrongServiceError(
                f"this is service {self.host.service_id}, not {request.service_id!r}: nothing stopped (ask GetServiceInfo for its id)"
            )
        log.info("stop requested")
        await self._run(self.host.stop_requested.set)
        return pb.StopReply()


async def _next_or_none(stream: AsyncIterator[T]) -> T | None:
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None
