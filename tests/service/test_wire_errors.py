"""Errors over the wire, tested against the server with raw gRPC stubs and hand-made chunks.

* the bad-input table: each bad call gets its exact status code and a message naming the problem, and the
  job's state is unchanged afterwards (version, who has pushed, the weights; and the step still closes to
  the reference result once the good push comes);
* a retried push is applied once; a pull for a future version ends at its deadline;
* bearer-token auth (health checks answer without a token; every other call needs it), TLS and mTLS; health and
  reflection (v1 and v1alpha) on every server.

Everything binds 127.0.0.1 and every call has a deadline of a few seconds.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
import pytest
import torch
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from paramserver.core.config import TLSConfig
from paramserver.core.errors import FutureStepError, JobNotFoundError, StaleStepError, UnauthenticatedError
from paramserver.service.local import serve_local as serve
from paramserver.service.server import reflection_v1_descriptor
from paramserver.wire import errors as wire_errors
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc
from tests.helpers.reference import Reference, make_model, worker_grads
from tests.helpers.tls_certs import make_other_client, make_tls_material
from workers.client import ServiceClient, error_from_rpc
from workers.remote_optimizer import RemoteOptimizer

T = 5.0  # the deadline of every call, in seconds
COORDINATOR = "paramserver.v1.Coordinator"
SHARD = "paramserver.v1.Shard"
TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
Code = grpc.StatusCode


# -- plumbing ---------------------------------------------------------------------------------------------------


class Wire:
    """Raw stubs on channels to one service; ``metadata`` goes with every call made through ``call``."""

    def __init__(self, address: str, metadata: Sequence[tuple[str, str]] = (), credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, int]] = ()) -> None:
        self.address = address
        self.metadata = tuple(metadata)
        self.credentials = credentials
        self.options = list(options)
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str | None = None) -> grpc.Channel:
        address = address or self.address
        if address not in self._channels:
            if self.credentials is None:
                self._channels[address] = grpc.insecure_channel(address, options=self.options)
            else:
                self._channels[address] = grpc.secure_channel(address, self.credentials, options=self.options)
        return self._channels[address]

    @property
    def coordinator(self) -> pb_grpc.CoordinatorStub:
        return pb_grpc.CoordinatorStub(self.channel())

    def shard(self, address: str) -> pb_grpc.ShardStub:
        return pb_grpc.ShardStub(self.channel(address))

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    """The error ``fn`` ends with (it must end with one); a streamed reply is read to its end."""
    with pytest.raises(grpc.RpcError) as info:
        result = fn()
        if hasattr(result, "__next__"):
            list(result)
    return info.value


# codes gRPC may make itself (a message too large, a deadline passed, no connection): no ErrorInfo there
GRPC_MADE = {Code.RESOURCE_EXHAUSTED, Code.DEADLINE_EXCEEDED, Code.UNAVAILABLE}


def reason_of(exc: grpc.RpcError) -> str | None:
    """The ErrorInfo reason the server sent with the status (None: none)."""
    info = wire_errors.error_info(exc.code(), exc.trailing_metadata())
    return None if info is None else info.reason


def assert_status(exc: grpc.RpcError, code: grpc.StatusCode, pattern: str, reason: str | None = None) -> None:
    assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
    assert re.search(pattern, exc.details() or ""), f"{exc.details()!r} does not match {pattern!r}"
    if code not in GRPC_MADE:  # the server's own errors carry the reason of their row in the table
        got = reason_of(exc)
        assert got is not None and wire_errors.kind_by_reason(got).code == code, f"reason {got!r} for {code.name}"
        assert reason is None or got == reason, f"expected reason {reason}, got {got}"


SHAPES = {"w": (4, 3), "b": (5,)}  # on two shards: w (48 bytes) on shard 0, b on shard 1
LR, MOMENTUM = 0.1, 0.9


def job_config(num_workers: int = 2, shapes: dict[str, tuple[int, ...]] = SHAPES, **fields: object) -> pb.JobConfig:
    config = pb.JobConfig(
        optimizer="SGD",
        optimizer_kwargs_json=json.dumps({"lr": LR, "momentum": MOMENTUM}),
        group_options_json=["{}"],
        params=[pb.ParamSpec(name=n, shape=list(s), dtype="float32", group=0) for n, s in shapes.items()],
        num_workers=num_workers,
        clip=pb.ClipSettings(norm_type=2.0),
        nonfinite="skip",
        deterministic=True,
    )
    for key, value in fields.items():
        if key == "params":
            del config.params[:]
            config.params.extend(value)  # type: ignore[arg-type]
        elif key == "group_options_json":
            del config.group_options_json[:]
            config.group_options_json.extend(value)  # type: ignore[arg-type]
        else:
            setattr(config, key, value)
    return config


def pack(info: pb.JobInfo, shard: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Shard ``shard``'s flat buffer (every parameter here is float32, so there is one) from the JobInfo's slices."""
    return torch.cat([tensors[s.param].detach().reshape(-1)[s.start : s.stop] for s in info.shards[shard].slices])


def unpack(info: pb.JobInfo, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    tensors = [torch.empty(list(p.shape), dtype=torch.float32) for p in info.config.params]
    for shard, flat in zip(info.shards, flats):
        offset = 0
        for s in shard.slices:
            n = s.stop - s.start
            tensors[s.param].view(-1)[s.start : s.stop] = flat[offset : offset + n]
            offset += n
    return tensors


def chunks(job: str, flat: torch.Tensor, *, worker: int = 0, step: int = 0, shard: int = 0, per: int = 5) -> list[pb.TensorChunk]:
    """A good stream of ``flat`` (float32) by hand: ``per`` elements a chunk."""
    raw = flat.contiguous().numpy().tobytes()
    n = flat.numel()
    return [
        pb.TensorChunk(
            header=pb.ChunkHeader(job=job, worker=worker, step=step, shard=shard, buffer=0, dtype="float32", offset=i, total=n),
            data=raw[4 * i : 4 * min(i + per, n)],
        )
        for i in range(0, n, per)
    ]


@dataclass
class Job:
    wire: Wire
    info: pb.JobInfo

    @property
    def name(self) -> str:
        return self.info.job

    def shard(self, j: int) -> pb_grpc.ShardStub:
        return self.wire.shard(self.info.shards[j].address)

    @property
    def num_shards(self) -> int:
        return len(self.info.shards)

    def init(self, weights: Sequence[torch.Tensor]) -> None:
        for j in range(self.num_shards):
            reply = self.shard(j).PushParameters(iter(chunks(self.name, pack(self.info, j, weights), shard=j)), timeout=T, metadata=self.wire.metadata)
            assert reply.version == 0

    def push(self, worker: int, step: int, grads: Sequence[torch.Tensor], shards: Iterable[int] | None = None) -> list[pb.PushReply]:
        return [
            self.shard(j).PushGradients(
                iter(chunks(self.name, pack(self.info, j, grads), worker=worker, step=step, shard=j)), timeout=T, metadata=self.wire.metadata
            )
            for j in (range(self.num_shards) if shards is None else shards)
        ]

    def pull(self, shard: int, min_version: int = 0, timeout: float = T) -> tuple[int, torch.Tensor]:
        data, version = bytearray(), -1
        for chunk in self.shard(shard).PullParameters(
            pb.PullRequest(job=self.name, shard=shard, min_version=min_version), timeout=timeout, metadata=self.wire.metadata
        ):
            h = chunk.header
            assert (h.job, h.shard, h.buffer, h.dtype, h.offset) == (self.name, shard, 0, "float32", len(data) // 4)
            data += chunk.data
            version = h.step
        assert len(data) == 4 * h.total
        return version, torch.frombuffer(data, dtype=torch.float32).clone()

    def weights(self, min_version: int = 0) -> list[torch.Tensor]:
        return unpack(self.info, [self.pull(j, min_version)[1] for j in range(self.num_shards)])

    def status(self) -> pb.StatusReply:
        return self.wire.coordinator.GetStatus(pb.StatusRequest(job=self.name), timeout=T, metadata=self.wire.metadata)

    def snapshot(self) -> tuple[int, list[tuple[int, list[int]]], list[torch.Tensor]]:
        """What a bad call must not change: the version, each shard's version and pushers, the weights."""
        st = self.status()
        return st.version, [(s.version, list(s.pushed_workers)) for s in st.shards], self.weights()


def assert_same_snapshot(before, after) -> None:  # noqa: ANN001
    assert before[:2] == after[:2], f"status changed: {before[:2]} -> {after[:2]}"
    for a, b in zip(before[2], after[2], strict=True):
        assert torch.equal(a, b), "weights changed"


def create(wire: Wire, name: str, config: pb.JobConfig | None = None) -> Job:
    info = wire.coordinator.CreateJob(pb.CreateJobRequest(job=name, config=config or job_config()), timeout=T, metadata=wire.metadata)
    return Job(wire, info)


def initial_weights(seed: int = 0, shapes: dict[str, tuple[int, ...]] = SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) for s in shapes.values()]


def reference(weights: Sequence[torch.Tensor]) -> Reference:
    return Reference([torch.nn.Parameter(w.clone()) for w in weights], torch.optim.SGD, {"lr": LR, "momentum": MOMENTUM})


def assert_weights(actual: Sequence[torch.Tensor], ref: Reference) -> None:
    for a, p in zip(actual, ref.params, strict=True):
        assert torch.equal(a, p.detach()), f"max diff {(a - p.detach()).abs().max().item()}"


# -- the services -----------------------------------------------------------------------------------------------


# -- the bad-input table: PushGradients ---------------------------------------------------------------------------


@dataclass
class MidStep:
    """A 2-worker job on 2 shards at version 1, where worker 1 has pushed step 1 and worker 0 has not."""

    job: Job
    ref: Reference
    grads: list[list[torch.Tensor]]  # step 1's, per worker

    def finish(self) -> None:
        """Worker 0's good push closes step 1: the result equals the reference's, so nothing bad got in."""
        replies = self.job.push(0, 1, self.grads[0])
        assert [r.already_applied for r in replies] == [False, False]
        self.ref.step(self.grads)
        assert_weights(self.job.weights(min_version=2), self.ref)  # the pull waits for the close
        assert self.job.status().version == 2


def mid_step(wire: Wire, name: str) -> MidStep:
    job = create(wire, name)
    w0 = initial_weights()
    job.init(w0)
    ref = reference(w0)
    g0 = worker_grads(ref.params, 0, 2)
    for worker in (1, 0):
        job.push(worker, 0, g0[worker])
    job.weights(min_version=1)  # the last push's reply does not wait for the close: the pull does
    ref.step(g0)
    g1 = worker_grads(ref.params, 1, 2)
    job.push(1, 1, g1[1])
    st = job.status()
    assert st.version == 1 and [list(s.pushed_workers) for s in st.shards] == [[1], [1]]
    return MidStep(job, ref, g1)


def _h(job: str, n: int, **kw: object) -> pb.ChunkHeader:
    fields = {"job": job, "worker": 0, "step": 1, "shard": 0, "buffer": 0, "dtype": "float32", "offset": 0, "total": n, **kw}
    return pb.ChunkHeader(**fields)


def _f32(count: int, value: float = 0.25) -> bytes:
    return torch.full((count,), value).numpy().tobytes()


# (id, chunks for shard 0 of a job whose shard-0 buffer has n float32, code, pattern of the message, ps-version)
BAD_PUSHES = [
    ("unknown job", lambda job, n: [pb.TensorChunk(header=_h("no-such-job", n), data=_f32(n))], Code.NOT_FOUND, r"no job 'no-such-job'", None),
    ("wrong shard id", lambda job, n: [pb.TensorChunk(header=_h(job, n, shard=1), data=_f32(n))], Code.INVALID_ARGUMENT,
     r"this is shard 0, the chunks are for shard 1", None),
    ("wrong total", lambda job, n: [pb.TensorChunk(header=_h(job, n, total=n + 1), data=_f32(n))], Code.INVALID_ARGUMENT,
     r"buffer 0 has 12 elements, the chunk says 13", None),
    ("unknown dtype", lambda job, n: [pb.TensorChunk(header=_h(job, n, dtype="float99"), data=_f32(n))], Code.INVALID_ARGUMENT,
     r"unknown dtype 'float99'", None),
    ("integer dtype", lambda job, n: [pb.TensorChunk(header=_h(job, n, dtype="int64"), data=bytes(8 * n))], Code.INVALID_ARGUMENT,
     r"dtype int64 is not floating point", None),
    ("buffer index out of range", lambda job, n: [pb.TensorChunk(header=_h(job, n, buffer=1), data=_f32(n))], Code.INVALID_ARGUMENT,
     r"chunk for buffer 1, but there are only 1 buffers", None),
    ("chunk overruns the buffer", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(n - 2)),
                                                  pb.TensorChunk(header=_h(job, n, offset=n - 2), data=_f32(4))],
     Code.INVALID_ARGUMENT, r"chunk at element 10 of 4 elements overruns its 12", None),
    ("partial element", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(n) + b"\0")], Code.INVALID_ARGUMENT,
     r"chunk of 49 bytes is not a whole number of float32", None),
    ("too few chunks", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(n // 2))], Code.INVALID_ARGUMENT,
     r"buffer 0: received 6 of 12 elements", None),
    ("a chunk missing in the middle", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(4)),
                                                      pb.TensorChunk(header=_h(job, n, offset=8), data=_f32(4))],
     Code.INVALID_ARGUMENT, r"buffer 0: chunk at element 8, expected the next at 4", None),
    ("chunks disagree on worker", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(6)),
                                                  pb.TensorChunk(header=_h(job, n, offset=6, worker=1), data=_f32(6))],
     Code.INVALID_ARGUMENT, r"chunks of one stream disagree on job, worker, step or shard", None),
    ("chunks disagree on step", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(6)),
                                                pb.TensorChunk(header=_h(job, n, offset=6, step=2), data=_f32(6))],
     Code.INVALID_ARGUMENT, r"chunks of one stream disagree on job, worker, step or shard", None),
    ("chunks disagree on dtype", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(6)),
                                                 pb.TensorChunk(header=_h(job, n, offset=6, dtype="float64"), data=bytes(8 * 6))],
     Code.INVALID_ARGUMENT, r"chunks disagree on dtype|the chunk carries float64, the buffer takes float32", None),
    ("worker out of range", lambda job, n: [pb.TensorChunk(header=_h(job, n, worker=2), data=_f32(n))], Code.INVALID_ARGUMENT,
     r"worker must be in \[0, 2\), got 2", None),
    # (a step from the past: here step 0, which just closed, is a late retry, answered "already applied";
    # an older step's FAILED_PRECONDITION is in test_retried_push_is_applied_once)
    ("step from the future", lambda job, n: [pb.TensorChunk(header=_h(job, n, step=2), data=_f32(n))], Code.FAILED_PRECONDITION,
     r"step 2 is not open yet \(now at 1\)", "1"),
    ("far future step", lambda job, n: [pb.TensorChunk(header=_h(job, n, step=2**63), data=_f32(n))], Code.FAILED_PRECONDITION,
     r"is not open yet \(now at 1\)", "1"),
    ("overlapping chunks", lambda job, n: [pb.TensorChunk(header=_h(job, n), data=_f32(n // 2)),
                                           pb.TensorChunk(header=_h(job, n), data=_f32(n // 2))],
     Code.INVALID_ARGUMENT, r"buffer 0: chunk at element 0, expected the next at 6", None),
    ("chunks out of order", lambda job, n: [pb.TensorChunk(header=_h(job, n, offset=6), data=_f32(6)),
                                            pb.TensorChunk(header=_h(job, n), data=_f32(6))],
     Code.INVALID_ARGUMENT, r"buffer 0: chunk at element 6, expected the next at 0", None),
    pytest.param(
        "complex gradient for a real parameter", lambda job, n: [pb.TensorChunk(header=_h(job, n, dtype="complex64"), data=bytes(8 * n))],
        Code.INVALID_ARGUMENT, r"complex", None,
        id="complex gradient for a real parameter",
    ),
]


@pytest.mark.parametrize(("case", "stream", "code", "pattern", "version"),
                         [pytest.param(*c, id=c[0]) if type(c) is tuple else c for c in BAD_PUSHES])
def test_bad_push_is_refused_and_changes_nothing(wire, job_name, case, stream, code, pattern, version):
    m = mid_step(wire, job_name)
    n = sum(s.stop - s.start for s in m.job.info.shards[0].slices)
    assert n == 12
    before = m.job.snapshot()
    exc = rpc_error(lambda: m.job.shard(0).PushGradients(iter(stream(job_name, n)), timeout=T))
    reason = {Code.NOT_FOUND: "JOB_NOT_FOUND", Code.INVALID_ARGUMENT: "INVALID_ARGUMENT", Code.FAILED_PRECONDITION: "FUTURE_STEP"}[code]
    assert_status(exc, code, pattern, reason)
    trailing = dict(exc.trailing_metadata() or ())
    assert trailing.get("ps-version") == version
    err = error_from_rpc(exc)
    assert type(err) is {"JOB_NOT_FOUND": JobNotFoundError, "INVALID_ARGUMENT": ValueError, "FUTURE_STEP": FutureStepError}[reason]
    assert getattr(err, "version", None) == (None if version is None else int(version))
    assert_same_snapshot(before, m.job.snapshot())
    m.finish()


def test_empty_push_streams_are_invalid(wire, job_name):
    m = mid_step(wire, job_name)
    before = m.job.snapshot()
    for method in (m.job.shard(0).PushGradients, m.job.shard(1).PushParameters):
        assert_status(rpc_error(lambda: method(iter(()), timeout=T)), Code.INVALID_ARGUMENT, r"empty stream")
    assert_same_snapshot(before, m.job.snapshot())
    m.finish()


def test_push_before_initial_weights_is_refused(wire, job_name):
    job = create(wire, job_name, job_config(num_workers=1))
    assert not job.info.ready
    grads = [torch.ones(s) for s in SHAPES.values()]
    exc = rpc_error(lambda: job.push(0, 0, grads, shards=[0]))
    assert_status(exc, Code.FAILED_PRECONDITION, r"shard 0: the job's initial weights are not in place yet", "NOT_READY")
    assert "ps-version" not in dict(exc.trailing_metadata() or ())
    st = job.status()
    assert st.version == 0 and [list(s.pushed_workers) for s in st.shards] == [[], []]
    # a pull waits for the weights, so it ends at its deadline
    assert_status(rpc_error(lambda: job.pull(0, 0, timeout=0.3)), Code.DEADLINE_EXCEEDED, r"")
    # the weights come, then the same push goes through
    w0 = initial_weights(1)
    job.init(w0)
    assert create(wire, job_name, job_config(num_workers=1)).info.ready
    job.push(0, 0, grads)
    ref = reference(w0)
    ref.step([grads])
    assert_weights(job.weights(min_version=1), ref)


def test_push_parameters_only_from_rank_0_and_only_at_version_0(wire, job_name):
    job = create(wire, job_name, job_config(num_workers=1))
    w0 = initial_weights(2)
    exc = rpc_error(lambda: job.shard(0).PushParameters(iter(chunks(job_name, pack(job.info, 0, w0), worker=1)), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"initial weights come from rank 0, not rank 1")
    assert not create(wire, job_name, job_config(num_workers=1)).info.ready  # still waiting for its weights
    # wrong dtype for the weights (float64 where the job says float32)
    bad = [pb.TensorChunk(header=pb.ChunkHeader(job=job_name, shard=0, dtype="float64", total=12), data=bytes(8 * 12))]
    assert_status(rpc_error(lambda: job.shard(0).PushParameters(iter(bad), timeout=T)), Code.INVALID_ARGUMENT, r"must be torch.float32|the chunk carries float64, the buffer takes float32")
    assert not create(wire, job_name, job_config(num_workers=1)).info.ready
    job.init(w0)
    grads = [torch.ones(s) for s in SHAPES.values()]
    job.push(0, 0, grads)
    before = job.snapshot()
    assert before[0] == 1
    exc = rpc_error(lambda: job.shard(0).PushParameters(iter(chunks(job_name, pack(job.info, 0, initial_weights(3)))), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"job '.*' has begun training; initial weights come before any gradient")
    assert_same_snapshot(before, job.snapshot())


def test_refused_push_does_not_wedge_the_step(wire, job_name):
    job = create(wire, job_name)
    w0 = initial_weights(10)
    job.init(w0)
    g = [torch.ones(s) for s in SHAPES.values()]
    job.push(0, 0, g, shards=[0])
    bad = [pb.TensorChunk(header=pb.ChunkHeader(job=job_name, worker=1, shard=0, dtype="complex64", total=12), data=bytes(8 * 12))]
    exc = rpc_error(lambda: job.shard(0).PushGradients(iter(bad), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"complex")
    st = job.status()
    assert st.version == 0 and [list(s.pushed_workers) for s in st.shards] == [[0], []]
    job.push(0, 0, g, shards=[1])
    assert [r.already_applied for r in job.push(1, 0, g)] == [False, False]
    ref = reference(w0)
    ref.step([g, g])
    assert_weights(job.weights(min_version=1), ref)


def test_push_parameters_after_a_gradient_is_refused(wire, job_name):
    """The proto: PushParameters is for 'version 0 only, before any gradient'."""
    job = create(wire, job_name, job_config(num_workers=2))
    job.init(initial_weights(4))
    job.push(1, 0, [torch.ones(s) for s in SHAPES.values()])
    before = job.snapshot()
    exc = rpc_error(lambda: job.shard(0).PushParameters(iter(chunks(job_name, pack(job.info, 0, initial_weights(5)))), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"gradient|before training")
    assert_same_snapshot(before, job.snapshot())


def test_job_with_more_shards_than_tensors_trains(svc, job_name):
    w = torch.nn.Parameter(initial_weights(11)[0])
    ref = Reference([torch.nn.Parameter(w.detach().clone())], torch.optim.SGD, {"lr": LR, "momentum": MOMENTUM})
    with RemoteOptimizer([("w", w)], torch.optim.SGD, lr=LR, momentum=MOMENTUM, address=svc.address, job=job_name, timeout=T) as opt:
        assert [len(s) for s in opt.plan.shards] == [1, 0]
        for step in range(2):
            grads = worker_grads(ref.params, step, 1, seed=11)
            w.grad = grads[0][0].clone()
            opt.step()
            ref.step(grads)
    assert torch.equal(w.detach(), ref.params[0].detach())


# -- the bad-input table: pulls and coordinator calls --------------------------------------------------------------


def test_pull_errors(wire, job_name):
    job = create(wire, job_name)
    job.init(initial_weights())
    stub = job.shard(0)
    exc = rpc_error(lambda: stub.PullParameters(pb.PullRequest(job="no-such-job", shard=0), timeout=T))
    assert_status(exc, Code.NOT_FOUND, r"no job 'no-such-job' on shard 0", "JOB_NOT_FOUND")
    exc = rpc_error(lambda: stub.PullParameters(pb.PullRequest(job=job_name, shard=1), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"this is shard 0, the pull is for shard 1")


def test_shared_memory_calls_refuse_bad_input_and_change_nothing(wire, job_name):
    from paramserver.dataplane.segments import host_identity

    job = create(wire, job_name)
    job.init(initial_weights())
    before = job.snapshot()
    stub = job.shard(0)
    push = pb.SharedPush(job=job_name, worker=0, step=0, shard=0)
    exc = rpc_error(lambda: stub.PushShared(push, timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"worker 0 of job .* has no shared memory here: attach it first")
    exc = rpc_error(lambda: stub.PullShared(pb.PullRequest(job=job_name, shard=0, min_version=5, worker=0), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"has no shared memory here")  # at once, not at the deadline
    exc = rpc_error(lambda: stub.PushShared(pb.SharedPush(job=job_name, worker=0, step=0, shard=1), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"this is shard 0, the push is for shard 1")
    exc = rpc_error(lambda: stub.AttachSharedMemory(pb.AttachRequest(job="no-such-job", shard=0, host=host_identity()), timeout=T))
    assert_status(exc, Code.NOT_FOUND, r"no job 'no-such-job' on shard 0", "JOB_NOT_FOUND")
    exc = rpc_error(lambda: stub.AttachSharedMemory(pb.AttachRequest(job=job_name, worker=9, shard=0, host=host_identity()), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"worker must be in \[0, 2\), got 9")
    other = stub.AttachSharedMemory(pb.AttachRequest(job=job_name, worker=0, shard=0, host="elsewhere"), timeout=T)
    assert other.host == host_identity() and not other.grads_segment  # another host: nothing made
    assert_same_snapshot(before, job.snapshot())
    attached = stub.AttachSharedMemory(pb.AttachRequest(job=job_name, worker=0, shard=0, host=host_identity()), timeout=T)
    assert attached.grads_segment and attached.weights_shared and list(attached.offsets) == [0]
    stub.DetachSharedMemory(pb.DetachRequest(job=job_name, worker=0, shard=0), timeout=T)
    exc = rpc_error(lambda: stub.PushShared(push, timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"attach it first")


def test_a_shared_push_that_pulls_answers_once_its_step_closes(wire, job_name):
    """``SharedPush.pull_min_version``: the push is taken at once (as without it), and the reply waits as
    ``PullShared`` waits, then carries the same answer; at the deadline the push stays taken."""
    from paramserver.dataplane.segments import host_identity

    job = create(wire, job_name)
    job.init(initial_weights())
    for j in range(job.num_shards):
        for worker in (0, 1):
            job.shard(j).AttachSharedMemory(pb.AttachRequest(job=job_name, worker=worker, shard=j, host=host_identity()), timeout=T)

    def push(j: int, worker: int, step: int, **pull: int) -> grpc.Future:
        # the segments hold zeros: steps of zero gradients
        return job.shard(j).PushShared.future(pb.SharedPush(job=job_name, worker=worker, step=step, shard=j, **pull), timeout=T)

    waiting = [push(j, 0, 0, pull_min_version=1) for j in range(job.num_shards)]
    deadline = time.monotonic() + T
    while [list(s.pushed_workers) for s in job.status().shards] != [[0]] * job.num_shards and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [list(s.pushed_workers) for s in job.status().shards] == [[0]] * job.num_shards  # taken before the reply
    assert not any(f.done() for f in waiting)  # the step waits for worker 1's push
    for j in range(job.num_shards):
        plain = push(j, 1, 0).result()
        # a push that does not pull answers at once; the one that completes the step may see it closed already
        # (its report reaches the coordinator before the reply is sent)
        assert not plain.HasField("pulled") and plain.version in (0, 1)
    for j, future in enumerate(waiting):
        reply = future.result(timeout=T)
        pulled = job.shard(j).PullShared(pb.PullRequest(job=job_name, shard=j, min_version=1, worker=0), timeout=T)
        assert not reply.already_applied and reply.pulled == pulled and pulled.version == 1
    exc = rpc_error(lambda: job.shard(0).PushShared(pb.SharedPush(job=job_name, worker=0, step=1, shard=0, pull_min_version=2), timeout=0.5))
    assert exc.code() == Code.DEADLINE_EXCEEDED, exc
    assert list(job.status().shards[0].pushed_workers) == [0]  # the push stands; sent again, it was applied already
    assert job.shard(0).PushShared(pb.SharedPush(job=job_name, worker=0, step=1, shard=0), timeout=T).already_applied


def test_pull_of_a_future_version_ends_at_its_deadline(wire, job_name):
    job = create(wire, job_name)
    job.init(initial_weights())
    before = job.snapshot()
    for deadline in (0.3, 1.0):
        start = time.monotonic()
        exc = rpc_error(lambda: job.pull(0, min_version=5, timeout=deadline))
        elapsed = time.monotonic() - start
        assert exc.code() == Code.DEADLINE_EXCEEDED, exc
        assert deadline * 0.8 <= elapsed < deadline + 1.0, f"a {deadline}s pull took {elapsed:.2f}s"
    assert_same_snapshot(before, job.snapshot())
    # the server is not left stuck: the job still trains
    job.push(0, 0, [torch.ones(s) for s in SHAPES.values()])
    job.push(1, 0, [torch.ones(s) for s in SHAPES.values()])
    assert job.pull(0, min_version=1)[0] == 1


def test_join_of_a_job_never_created_ends_at_its_deadline(wire, job_name):
    start = time.monotonic()
    exc = rpc_error(lambda: wire.coordinator.JoinJob(pb.JoinJobRequest(job=job_name, rank=1), timeout=0.5))
    assert exc.code() == Code.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0


def test_coordinator_calls_on_unknown_jobs_and_workers(wire, job_name):
    c = wire.coordinator
    for call in (
        lambda: c.GetStatus(pb.StatusRequest(job="no-such-job"), timeout=T),
        lambda: c.LeaveJob(pb.LeaveJobRequest(job="no-such-job", worker=0), timeout=T),
        lambda: c.ReportMetrics(pb.ReportMetricsRequest(job="no-such-job", worker=0, step=0, metrics={"metric": 1.0}), timeout=T),
        lambda: c.GetState(pb.StateRequest(job="no-such-job"), timeout=T),
    ):
        assert_status(rpc_error(call), Code.NOT_FOUND, r"no job 'no-such-job'", "JOB_NOT_FOUND")
    job = create(wire, job_name)
    job.init(initial_weights())
    before = job.snapshot()
    assert_status(rpc_error(lambda: c.LeaveJob(pb.LeaveJobRequest(job=job_name, worker=7), timeout=T)),
                  Code.INVALID_ARGUMENT, r"worker must be in \[0, 2\), got 7")
    assert_status(rpc_error(lambda: c.JoinJob(pb.JoinJobRequest(job=job_name, rank=2), timeout=T)),
                  Code.INVALID_ARGUMENT, r"worker must be in \[0, 2\), got 2")
    assert_same_snapshot(before, job.snapshot())
    assert list(job.status().members) == [0, 1]  # the ranks below num_workers are members from the start (on a lease)


def _params(*groups: int) -> list[pb.ParamSpec]:
    return [pb.ParamSpec(name=f"p{i}", shape=[3], dtype="float32", group=g) for i, g in enumerate(groups)]


BAD_CONFIGS = [
    ("unknown optimizer", job_config(optimizer="Adma"), r"unknown optimizer 'Adma'; did you mean .*'Adam'"),
    ("malformed kwarg JSON", job_config(optimizer_kwargs_json='{"lr": 0.1'), r"malformed JSON value on the wire"),
    ("kwargs not an object", job_config(optimizer_kwargs_json="[0.1]"), r"optimizer kwargs must be a JSON object"),
    ("unknown kwarg", job_config(optimizer_kwargs_json='{"lrr": 0.1}'), r"bad arguments for optimizer SGD: .*lrr"),
    ("bad kwarg value", job_config(optimizer_kwargs_json='{"lr": -1.0}'), r"optimizer SGD rejected its configuration: Invalid learning rate"),
    ("untrusted import path", job_config(optimizer="os:system"), r"optimizer 'os:system' is not allowed: module 'os' is not in trusted_modules"),
    ("untrusted path to a real optimizer", job_config(optimizer="torch.optim:Adam"), r"module 'torch.optim' is not in trusted_modules"),
    ("unsupported optimizer", job_config(optimizer="LBFGS"), r"LBFGS is not supported"),
    ("param in a group that does not exist", job_config(params=_params(0, 1)), r"parameter 1 names group 1, but there are 1 groups"),
    ("no params", job_config(params=[]), r"job config has no parameters"),
    ("unknown param dtype", job_config(params=[pb.ParamSpec(name="p", shape=[3], dtype="float99")]), r"unknown dtype 'float99'"),
    ("negative dimension", job_config(params=[pb.ParamSpec(name="p", shape=[3, -1], dtype="float32")]), r"negative dimension"),
    ("group options not an object", job_config(group_options_json=["[1]"]), r"options of param group 0 must be a JSON object"),
    ("zero workers", job_config(num_workers=0), r"num_workers must be an integer >= 1, got 0"),
    ("unknown nonfinite policy", job_config(nonfinite="ignore"), r"nonfinite must be 'skip' or 'error', got 'ignore'"),
    ("unknown scheduler", job_config(scheduler_json=json.dumps({"__scheduler__": {"scheduler": "StepLRR", "kwargs": {}, "interval": 1}})),
     r"unknown scheduler 'StepLRR'"),
    ("unknown grad dtype", job_config(grad_dtype="float99"), r"unknown dtype 'float99'"),
]


@pytest.mark.parametrize(("case", "config", "pattern"), BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_job_config_is_invalid_argument(wire, job_name, case, config, pattern):
    exc = rpc_error(lambda: wire.coordinator.CreateJob(pb.CreateJobRequest(job=job_name, config=config), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, pattern)
    # no job was created
    assert rpc_error(lambda: wire.coordinator.GetStatus(pb.StatusRequest(job=job_name), timeout=T)).code() == Code.NOT_FOUND


def test_job_without_a_name_is_invalid_argument(wire):
    exc = rpc_error(lambda: wire.coordinator.CreateJob(pb.CreateJobRequest(job="", config=job_config()), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, r"a job needs a name")


def test_create_is_idempotent_and_a_different_config_already_exists(wire, job_name):
    job = create(wire, job_name)
    again = create(wire, job_name).info
    assert again == job.info  # same config: the same job back (a retried create)
    job.init(initial_weights())
    grads = [torch.ones(s) for s in SHAPES.values()]
    job.push(0, 0, grads)
    before = job.snapshot()
    for other in (job_config(num_workers=3), job_config(optimizer="Adam"), job_config(shapes={"w": (4, 3)})):
        exc = rpc_error(lambda: wire.coordinator.CreateJob(pb.CreateJobRequest(job=job_name, config=other), timeout=T))
        assert_status(exc, Code.ALREADY_EXISTS, rf"job '{re.escape(job_name)}' exists already with another configuration", "JOB_EXISTS")
    assert_same_snapshot(before, job.snapshot())
    again = create(wire, job_name).info
    assert again.ready and again.version == 0 and again.config == job.info.config and again.shards == job.info.shards


# -- idempotent retry --------------------------------------------------------------------------------------------


def test_retried_push_is_applied_once(wire, job_name):
    job = create(wire, job_name)
    w0 = initial_weights(6)
    job.init(w0)
    ref = reference(w0)
    for step in range(2):
        grads = worker_grads(ref.params, step, 2, seed=6)
        # worker 0's push to shard 0 arrives twice (a retry after a lost reply), the second with other bytes too
        first, = job.push(0, step, grads[0], shards=[0])
        assert (first.already_applied, first.version) == (False, step)
        for retry in (grads[0], [torch.full_like(g, 1e6) for g in grads[0]]):
            again, = job.push(0, step, retry, shards=[0])
            assert (again.already_applied, again.version) == (True, step)
        st = job.status()
        assert st.version == step and [list(s.pushed_workers) for s in st.shards] == [[0], []]
        job.push(0, step, grads[0], shards=[1])
        job.push(1, step, grads[1])
        ref.step(grads)
        assert_weights(job.weights(min_version=step + 1), ref)  # the pull waits for the close
        assert job.status().version == step + 1
    # a late retry of the step that just closed (its reply was lost) is answered "already applied"
    before = job.snapshot()
    late, = job.push(1, 1, grads[1], shards=[1])
    assert (late.already_applied, late.version) == (True, 2)
    assert_same_snapshot(before, job.snapshot())
    # an older step is a stale step, with the version in the trailers; nothing changes
    exc = rpc_error(lambda: job.push(1, 0, grads[1], shards=[1]))
    assert_status(exc, Code.FAILED_PRECONDITION, r"step 0 has already closed \(now at 2\)", "STALE_STEP")
    assert dict(exc.trailing_metadata() or ()).get("ps-version") == "2"
    err = error_from_rpc(exc)
    assert type(err) is StaleStepError and err.version == 2
    assert_same_snapshot(before, job.snapshot())


# -- message size ------------------------------------------------------------------------------------------------

SMALL_LIMIT = 64 * 1024
SMALL_CHUNK = 16 * 1024


def test_chunk_bytes_must_fit_in_max_message_bytes():
    with pytest.raises(ValueError, match=r"chunk_bytes 65536 must fit in max_message_bytes 65536"):
        serve(1, max_message_bytes=SMALL_LIMIT, chunk_bytes=SMALL_LIMIT)


def test_oversized_message_is_resource_exhausted(job_name):
    shapes = {"big": (32 * 1024,)}  # 128 KiB of float32: more than one message may hold
    with serve(1, max_message_bytes=SMALL_LIMIT, chunk_bytes=SMALL_CHUNK) as small, Wire(small.address) as w:
        job = create(w, job_name, job_config(num_workers=1, shapes=shapes))
        w0 = initial_weights(7, shapes)
        per = SMALL_CHUNK // 4
        for reply in [job.shard(0).PushParameters(iter(chunks(job_name, w0[0], per=per)), timeout=T)]:
            assert reply.version == 0
        before = job.snapshot()
        grads = [torch.randn(shapes["big"], generator=torch.Generator().manual_seed(8))]
        for message in (chunks(job_name, grads[0], per=grads[0].numel()),      # one chunk of 128 KiB
                        chunks(job_name, grads[0], per=per)[:2] + chunks(job_name, grads[0], per=per * 4)[1:]):  # good, then too big
            exc = rpc_error(lambda: job.shard(0).PushGradients(iter(message), timeout=T))
            assert_status(exc, Code.RESOURCE_EXHAUSTED, r"(?i)larger than max")
            assert_same_snapshot(before, job.snapshot())
        # the weights come back in chunks of at most chunk_bytes; a well-chunked push goes through
        sizes = [len(c.data) for c in job.shard(0).PullParameters(pb.PullRequest(job=job_name, shard=0), timeout=T)]
        assert sum(sizes) == 4 * 32 * 1024 and max(sizes) <= SMALL_CHUNK
        reply = job.shard(0).PushGradients(iter(chunks(job_name, grads[0], per=per)), timeout=T)
        assert not reply.already_applied  # the step closes after the reply (the pull below waits for it)
        ref = reference(w0)
        ref.step([grads])
        assert_weights(job.weights(min_version=1), ref)


# -- auth --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_svc():
    service = serve(2, host="127.0.0.1", auth_token=TOKEN)
    yield service
    service.shutdown()


def _health(channel: grpc.Channel, service: str = "", metadata: Sequence[tuple[str, str]] = ()) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=T, metadata=metadata).status


def _v1(name: str) -> type:
    """A message class of grpc.reflection.v1 (grpcio-reflection ships only v1alpha's generated code)."""
    reflection_v1_descriptor()
    return message_factory.GetMessageClass(descriptor_pool.Default().FindMessageTypeByName(f"grpc.reflection.v1.{name}"))


def _reflect(channel: grpc.Channel, version: str = "v1alpha", metadata: Sequence[tuple[str, str]] = (), **request: str) -> list:
    """The replies of one reflection request, under ``grpc.reflection.<version>.ServerReflection``."""
    if version == "v1alpha":
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=T, metadata=metadata))
    call = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=_v1("ServerReflectionRequest").SerializeToString,
                                 response_deserializer=_v1("ServerReflectionResponse").FromString)
    return list(call(iter([_v1("ServerReflectionRequest")(**request)]), timeout=T, metadata=metadata))


def _reflected_services(channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = (), version: str = "v1alpha") -> set[str]:
    replies = _reflect(channel, version, metadata, list_services="")
    return {s.name for r in replies for s in r.list_services_response.service}


BAD_METADATA = {
    "no token": (),
    "wrong token": (("authorization", "Bearer nope"),),
    "token without Bearer": (("authorization", TOKEN),),
    "token prefix": (("authorization", f"Bearer {TOKEN[:-1]}"),),
}


@pytest.mark.parametrize("metadata", list(BAD_METADATA.values()), ids=list(BAD_METADATA))
def test_auth_refuses_calls_without_the_right_token(auth_svc, job_name, metadata):
    with Wire(auth_svc.address, AUTH) as good, Wire(auth_svc.address, metadata) as bad:
        job = create(good, job_name, job_config(num_workers=1))
        job.init(initial_weights())
        before = job.snapshot()
        c = bad.coordinator
        shard = bad.shard(job.info.shards[0].address)
        n = 12
        calls = {
            "CreateJob": lambda: c.CreateJob(pb.CreateJobRequest(job=job_name + "-x", config=job_config()), timeout=T, metadata=metadata),
            "GetStatus": lambda: c.GetStatus(pb.StatusRequest(job=job_name), timeout=T, metadata=metadata),
            "JoinJob": lambda: c.JoinJob(pb.JoinJobRequest(job=job_name, rank=0), timeout=T, metadata=metadata),
            "GetState": lambda: c.GetState(pb.StateRequest(job=job_name), timeout=T, metadata=metadata),
            "LoadState": lambda: c.LoadState(iter([pb.StateChunk(job=job_name, skeleton_json="{}")]), timeout=T, metadata=metadata),
            "PushGradients": lambda: shard.PushGradients(iter([pb.TensorChunk(header=_h(job_name, n, step=0), data=_f32(n))]),
                                                         timeout=T, metadata=metadata),
            "PushParameters": lambda: shard.PushParameters(iter([pb.TensorChunk(header=_h(job_name, n, step=0), data=_f32(n))]),
                                                           timeout=T, metadata=metadata),
            "PullParameters": lambda: shard.PullParameters(pb.PullRequest(job=job_name, shard=0), timeout=T, metadata=metadata),
            "AttachSharedMemory": lambda: shard.AttachSharedMemory(pb.AttachRequest(job=job_name, shard=0), timeout=T, metadata=metadata),
            "PushShared": lambda: shard.PushShared(pb.SharedPush(job=job_name, shard=0), timeout=T, metadata=metadata),
            "PullShared": lambda: shard.PullShared(pb.PullRequest(job=job_name, shard=0), timeout=T, metadata=metadata),
            "DetachSharedMemory": lambda: shard.DetachSharedMemory(pb.DetachRequest(job=job_name, shard=0), timeout=T, metadata=metadata),
            "Stop": lambda: c.Stop(pb.StopRequest(service_id=auth_svc.service_id), timeout=T, metadata=metadata),
            "GetServiceInfo": lambda: c.GetServiceInfo(pb.ServiceInfoRequest(), timeout=T, metadata=metadata),
            "DeleteJob": lambda: c.DeleteJob(pb.DeleteJobRequest(job=job_name), timeout=T, metadata=metadata),
            "Reflection": lambda: _reflected_services(bad.channel(), metadata=metadata),
            "Reflection v1": lambda: _reflected_services(bad.channel(), metadata=metadata, version="v1"),
            "Reflection on a shard": lambda: _reflected_services(bad.channel(job.info.shards[1].address), metadata=metadata),
        }
        for name, call in calls.items():
            exc = rpc_error(call)
            assert exc.code() == Code.UNAUTHENTICATED, f"{name}: {exc.code()} {exc.details()}"
            assert "missing or wrong bearer token" in exc.details(), name
            assert reason_of(exc) == "UNAUTHENTICATED", name
            assert type(error_from_rpc(exc)) is UnauthenticatedError, name
        assert_same_snapshot(before, job.snapshot())
        assert not auth_svc.stop_requested()
        assert rpc_error(lambda: good.coordinator.GetStatus(pb.StatusRequest(job=job_name + "-x"), timeout=T, metadata=AUTH)).code() == Code.NOT_FOUND
        # health checks answer without the token (Kubernetes' gRPC probes and grpc_health_probe send none), and
        # with any token, on the coordinator and on every shard
        for shard_info in [None, *job.info.shards]:
            channel = bad.channel(shard_info.address) if shard_info else bad.channel()
            for name in ("", SHARD if shard_info else COORDINATOR):
                assert _health(channel, name, metadata=metadata) == health_pb2.HealthCheckResponse.SERVING, (shard_info, name)
        # with the token, health and reflection answer
        assert _health(good.channel(), metadata=AUTH) == health_pb2.HealthCheckResponse.SERVING
        assert _health(good.channel(job.info.shards[1].address), SHARD, metadata=AUTH) == health_pb2.HealthCheckResponse.SERVING
        assert COORDINATOR in _reflected_services(good.channel(), metadata=AUTH)
        assert COORDINATOR in _reflected_services(good.channel(), metadata=AUTH, version="v1")


def _train(opt: RemoteOptimizer, model: torch.nn.Module, ref: Reference, steps: int) -> None:
    for step in range(steps):
        grads = worker_grads(ref.params, step, 1, seed=9)
        opt.zero_grad()
        for p, g in zip(model.parameters(), grads[0]):
            p.grad = g.clone()
        opt.step()
        ref.step(grads)
    for p, r in zip(model.parameters(), ref.params):
        assert torch.equal(p.detach(), r.detach())


def _model_and_reference() -> tuple[torch.nn.Module, Reference]:
    model = make_model(3)
    ref = Reference([torch.nn.Parameter(p.detach().clone()) for p in model.parameters()], torch.optim.SGD, {"lr": LR, "momentum": MOMENTUM})
    return model, ref


def test_auth_with_the_right_token_trains(auth_svc, job_name):
    model, ref = _model_and_reference()
    with RemoteOptimizer(model.named_parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, address=auth_svc.address, job=job_name,
                         auth_token=TOKEN, timeout=T) as opt:
        _train(opt, model, ref, 3)
        assert opt.get_last_lr() == [LR]


def test_client_maps_unauthenticated_to_permission_error(auth_svc, job_name):
    for token in (None, "nope"):
        client = ServiceClient(auth_svc.address, job_name, auth_token=token, timeout=T)
        try:
            with pytest.raises(UnauthenticatedError, match="missing or wrong bearer token"):
                client.status()
            with pytest.raises(UnauthenticatedError):
                client.create_job(job_config())
        finally:
            client.close()
        model = make_model(3)
        with pytest.raises(UnauthenticatedError):
            RemoteOptimizer(model.named_parameters(), torch.optim.SGD, lr=LR, address=auth_svc.address, job=job_name, auth_token=token, timeout=T)
    with Wire(auth_svc.address, AUTH) as good:
        assert rpc_error(lambda: good.coordinator.GetStatus(pb.StatusRequest(job=job_name), timeout=T, metadata=AUTH)).code() == Code.NOT_FOUND


# -- TLS ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls():
    return make_tls_material()


@pytest.fixture(scope="module")
def tls_svc(tls):
    service = serve(2, host="127.0.0.1", tls=TLSConfig(tls.server_chain, tls.server_key))
    yield service
    service.shutdown()


@pytest.fixture(scope="module")
def mtls_svc(tls):
    service = serve(2, host="127.0.0.1", tls=TLSConfig(tls.server_chain, tls.server_key, client_ca=tls.ca))
    yield service
    service.shutdown()


def _fails_unavailable_fast(wire: Wire) -> grpc.RpcError:
    start = time.monotonic()
    exc = rpc_error(lambda: wire.coordinator.GetStatus(pb.StatusRequest(job="x"), timeout=T))
    elapsed = time.monotonic() - start
    assert exc.code() == Code.UNAVAILABLE, f"{exc.code()} {exc.details()}"
    assert elapsed < T - 1.0, f"took {elapsed:.2f}s: the failure should not wait for the deadline"
    return exc


def test_tls_with_root_certificates(tls_svc, tls, job_name):
    with Wire(tls_svc.address, credentials=grpc.ssl_channel_credentials(tls.ca)) as w:
        assert _health(w.channel()) == health_pb2.HealthCheckResponse.SERVING
        assert rpc_error(lambda: w.coordinator.GetStatus(pb.StatusRequest(job=job_name), timeout=T)).code() == Code.NOT_FOUND
    model, ref = _model_and_reference()
    with RemoteOptimizer(model.named_parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, address=tls_svc.address, job=job_name,
                         root_certificates=tls.ca, timeout=T) as opt:
        assert len(opt.client.info.shards) == 2  # the shards are reached over TLS too
        _train(opt, model, ref, 3)


def test_tls_refuses_plaintext_and_untrusted_clients(tls_svc, tls):
    with Wire(tls_svc.address) as plain:
        _fails_unavailable_fast(plain)
    other_ca, _, _ = make_other_client()
    with Wire(tls_svc.address, credentials=grpc.ssl_channel_credentials(other_ca)) as wrong_root:
        _fails_unavailable_fast(wrong_root)
    client = ServiceClient(tls_svc.address, "x", timeout=T)
    try:
        with pytest.raises(ConnectionError, match="UNAVAILABLE"):
            client.status()
    finally:
        client.close()


def test_mtls_needs_a_client_certificate_from_the_ca(mtls_svc, tls, job_name):
    with Wire(mtls_svc.address, credentials=grpc.ssl_channel_credentials(tls.ca)) as no_cert:
        _fails_unavailable_fast(no_cert)
    _, chain, key = make_other_client()
    stranger = grpc.ssl_channel_credentials(tls.ca, private_key=key, certificate_chain=chain)
    with Wire(mtls_svc.address, credentials=stranger) as w:
        _fails_unavailable_fast(w)
    good = grpc.ssl_channel_credentials(tls.ca, private_key=tls.client_key, certificate_chain=tls.client_chain)
    with Wire(mtls_svc.address, credentials=good) as w:
        assert _health(w.channel()) == health_pb2.HealthCheckResponse.SERVING
        assert rpc_error(lambda: w.coordinator.GetStatus(pb.StatusRequest(job=job_name), timeout=T)).code() == Code.NOT_FOUND
    # RemoteOptimizer hands both to its ServiceClient: without the client certificate it cannot even create the job
    model, ref = _model_and_reference()
    with pytest.raises(ConnectionError, match="UNAVAILABLE"):
        RemoteOptimizer(model.named_parameters(), torch.optim.SGD, lr=LR, address=mtls_svc.address, job=job_name,
                        root_certificates=tls.ca, timeout=T)
    with RemoteOptimizer(model.named_parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, address=mtls_svc.address, job=job_name,
                         root_certificates=tls.ca, client_certificate=(tls.client_chain, tls.client_key), timeout=T) as opt:
        _train(opt, model, ref, 2)
    client = ServiceClient(mtls_svc.address, job_name, root_certificates=tls.ca, client_certificate=(tls.client_chain, tls.client_key), timeout=T)
    try:
        assert client.status().version == 2
    finally:
        client.close()


# -- health and reflection ---------------------------------------------------------------------------------------


def test_health_and_reflection_on_coordinator_and_shards(wire, job_name):
    job = create(wire, job_name)
    # the front door also serves the Shard service (its relay to the shards); a shard serves only its own
    servers = [(wire.address, COORDINATOR, {COORDINATOR, SHARD})] + [(s.address, SHARD, {SHARD}) for s in job.info.shards]
    assert len({a for a, _, _ in servers}) == 3
    for address, service, served in servers:
        channel = wire.channel(address)
        for name in ("", *served):
            assert _health(channel, name) == health_pb2.HealthCheckResponse.SERVING, (address, name)
        if service == SHARD:
            assert rpc_error(lambda: _health(channel, COORDINATOR)).code() == Code.NOT_FOUND
        expected = {*served, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
        for version in ("v1", "v1alpha"):  # grpcurl and current clients ask v1, older ones v1alpha
            names = _reflected_services(channel, version=version)
            assert names == expected, (version, names)
            # the descriptors are there too, so grpcurl can call the service (and describe reflection itself)
            for symbol, package in ((service, b"paramserver.v1"), ("grpc.reflection.v1.ServerReflection", b"grpc.reflection.v1")):
                replies = _reflect(channel, version, file_containing_symbol=symbol)
                files = [f for r in replies for f in r.file_descriptor_response.file_descriptor_proto]
                assert files and any(package in f for f in files), (version, symbol)


def test_health_answers_without_a_token_on_every_server(auth_svc):
    """Kubernetes' gRPC probes and grpc_health_probe send no token: health answers them on every server."""
    addresses = [auth_svc.address, *auth_svc.coordinator.shard_addresses]
    with Wire(auth_svc.address) as anonymous:
        for address, service in zip(addresses, [COORDINATOR] + [SHARD] * (len(addresses) - 1)):
            for name in ("", service):
                assert _health(anonymous.channel(address), name) == health_pb2.HealthCheckResponse.SERVING, (address, name)
            # Watch too (a probe may stream), and an unknown service is NOT_FOUND, not UNAUTHENTICATED
            watch = health_pb2_grpc.HealthStub(anonymous.channel(address)).Watch(health_pb2.HealthCheckRequest(service=service), timeout=T)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert rpc_error(lambda: _health(anonymous.channel(address), "no.such.Service")).code() == Code.NOT_FOUND


def test_a_job_with_more_workers_than_the_servers_threads_is_accepted():
    # Shard servers are asyncio servers: a waiting pull holds no thread, so the number of workers is not
    # bounded by the gRPC threads (it was: 2 W + 2 of them per shard server). tests/service/test_shard_scale.py
    # trains 128 workers on one shard.
    from paramserver.core.config import ClipConfig
    from paramserver.core.params import normalize_params
    from paramserver.wire.jobconfig import describe_job

    groups = normalize_params([("w", torch.zeros(3))])
    with serve(1) as svc:
        stub = pb_grpc.CoordinatorStub(grpc.insecure_channel(svc.address))
        config = describe_job(groups, "SGD", {"lr": 0.1}, num_workers=40, clip=ClipConfig())
        info = stub.CreateJob(pb.CreateJobRequest(job="many", config=config), timeout=T)
        assert info.config.num_workers == 40
        assert len(info.shards) == 1
