"""The Coordinator service, the front door: jobs, membership, status, state in torch's formats, stop."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import grpc

from paramserver.core.coordinator import StepResult
from paramserver.service.coordinator_host import CoordinatorHost, Job
from paramserver.service.status import translate_errors
from paramserver.wire import codec, jobconfig, json_values
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc

log = logging.getLogger("paramserver")


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


def step_report(result: StepResult) -> pb.StepReport:
    report = pb.StepReport(step=result.step, total_norm=result.total_norm, skipped=result.skipped, lrs=result.lrs, error=result.error or "")
    if result.clip_coef is not None:
        report.clip_coef = result.clip_coef
    return report


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, host: CoordinatorHost, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.host = host
        self.chunk_bytes = chunk_bytes

    @translate_errors
    def CreateJob(self, request: pb.CreateJobRequest, context: grpc.ServicerContext) -> pb.JobInfo:
        # defaults written out: a client that leaves a field out means the default, and a retry matches
        job = self.host.create_job(request.job, jobconfig.canonical(request.config))
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
        )
        last = self.host.job(request.job).coordinator.last_result
        if last is not None:
            reply.last_step.CopyFrom(step_report(last))
        return reply

    @translate_errors
    def LeaveJob(self, request: pb.LeaveJobRequest, context: grpc.ServicerContext) -> pb.LeaveJobReply:
        self.host.leave_job(request.job, request.worker)
        return pb.LeaveJobReply()

    @translate_errors
    def GetState(self, request: pb.StateRequest, context: grpc.ServicerContext) -> Iterator[pb.StateChunk]:
        state = self.host.job(request.job).coordinator.state_dict()
        tensors: list = []
        skeleton = json.dumps(json_values.to_wire(state, "state", tensors))
        yield from codec.encode_state(skeleton, tensors, self.chunk_bytes, job=request.job)

    @translate_errors
    def LoadState(self, request_iterator: Iterator[pb.StateChunk], context: grpc.ServicerContext) -> pb.LoadStateReply:
        job, skeleton, tensors = codec.decode_state(request_iterator)
        try:
            state = json_values.from_wire(json.loads(skeleton), tensors)
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
