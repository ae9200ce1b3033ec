"""The rules of protos/PROTOCOL.md, checked with raw gRPC stubs and chunks made by hand from the rules alone
(not by paramserver's codec): how a shard's flat buffers are numbered, their bytes, the header-only chunk of a
shard that holds no parameter, the error that names a shard's real buffers, and dtypes that are refused rather
than converted. Every bad input is refused with its status code and changes no state.

Everything binds 127.0.0.1 and every call has a deadline of a few seconds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import torch

from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from tests.helpers.reference import Reference
from tests.service.test_wire_errors import Wire, assert_status, rpc_error

T = 5.0
LR, MOMENTUM = 0.1, 0.9
Code = grpc.StatusCode
TORCH = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- a client written from PROTOCOL.md ----------------------------------------------------------------------------


def le_bytes(values: torch.Tensor, dtype: str) -> bytes:
    """Little-endian bytes of ``values`` in ``dtype``, by the spec: bfloat16 is the upper 16 bits of the float32
    (these tests use values that bfloat16 holds exactly, so there is nothing to round)."""
    flat = values.detach().reshape(-1)
    if dtype == "bfloat16":
        bits = np.frombuffer(flat.to(torch.float32).numpy().astype("<f4").tobytes(), dtype="<u4")
        assert np.all(bits & 0xFFFF == 0), "a value bfloat16 does not hold exactly"
        return (bits >> 16).astype("<u2").tobytes()
    return flat.numpy().astype({"float32": "<f4", "float64": "<f8", "float16": "<f2"}[dtype]).tobytes()


def from_le_bytes(data: bytes, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        bits = np.frombuffer(data, dtype="<u2").astype("<u4") << 16
        return torch.from_numpy(bits.view("<f4").copy())
    return torch.from_numpy(np.frombuffer(data, dtype={"float32": "<f4", "float64": "<f8", "float16": "<f2"}[dtype]).copy())


def buffers_of(info: pb.JobInfo, shard: int) -> list[tuple[str, list[pb.SliceInfo]]]:
    """Shard ``shard``'s flat buffers: its slices in JobInfo order, a new buffer wherever the dtype changes."""
    out: list[tuple[str, list[pb.SliceInfo]]] = []
    for s in info.shards[shard].slices:
        dtype = info.config.params[s.param].dtype
        if not out or out[-1][0] != dtype:
            assert all(d != dtype for d, _ in out), "a shard's slices are grouped by dtype"
            out.append((dtype, []))
        out[-1][1].append(s)
    return out


def push_stream(info: pb.JobInfo, shard: int, tensors: Sequence[torch.Tensor], *, worker: int = 0, step: int = 0,
                wire_dtype: str | None = None, per: int = 3) -> list[pb.TensorChunk]:
    """One push to ``shard`` of the per-parameter ``tensors``: each buffer's elements back to back, ``per``
    elements a chunk, in ``wire_dtype`` (default: the buffer's own); one header-only chunk for a shard without buffers."""
    head = {"job": info.job, "worker": worker, "step": step, "shard": shard}
    buffers = buffers_of(info, shard)
    if not buffers:
        return [pb.TensorChunk(header=pb.ChunkHeader(**head))]
    chunks = []
    for index, (dtype, slices) in enumerate(buffers):
        dtype = wire_dtype or dtype
        flat = torch.cat([tensors[s.param].detach().reshape(-1)[s.start : s.stop].double() for s in slices])
        size = {"float64": 8, "float32": 4}.get(dtype, 2)
        raw = le_bytes(flat, dtype)
        for offset in range(0, flat.numel(), per):
            chunks.append(pb.TensorChunk(header=pb.ChunkHeader(**head, buffer=index, dtype=dtype, offset=offset, total=flat.numel()),
                                         data=raw[offset * size : (offset + per) * size]))
    return chunks


def pull_chunks(wire: Wire, info: pb.JobInfo, shard: int, min_version: int) -> list[pb.TensorChunk]:
    stub = wire.shard(info.shards[shard].address)
    return list(stub.PullParameters(pb.PullRequest(job=info.job, shard=shard, min_version=min_version), timeout=T))


def pull_weights(wire: Wire, info: pb.JobInfo, min_version: int) -> list[torch.Tensor]:
    """Every parameter (as float64) from the pulls of every shard, by the buffer numbering of JobInfo."""
    out = [torch.zeros(list(p.shape), dtype=torch.float64) for p in info.config.params]
    for j in range(len(info.shards)):
        data: dict[int, bytearray] = {}
        for chunk in pull_chunks(wire, info, j, min_version):
            h = chunk.header
            assert h.step >= min_version and h.HasField("generation")
            if not info.shards[j].slices:  # a shard without parameters: its one header-only chunk
                assert (h.buffer, h.dtype, h.offset, h.total, chunk.data) == (0, "", 0, 0, b"")
                continue
            got = data.setdefault(h.buffer, bytearray())
            assert h.offset * len(le_bytes(torch.zeros(1), h.dtype)) == len(got), "chunks in order, back to back"
            got += chunk.data
        for index, (dtype, slices) in enumerate(buffers_of(info, j)):
            flat, at = from_le_bytes(bytes(data[index]), dtype), 0
            for s in slices:
                out[s.param].view(-1)[s.start : s.stop] = flat[at : at + s.stop - s.start].double()
                at += s.stop - s.start
            assert at == flat.numel()
    return out


@dataclass
class Job:
    wire: Wire
    info: pb.JobInfo

    def stub(self, shard: int):
        return self.wire.shard(self.info.shards[shard].address)

    def init(self, weights: Sequence[torch.Tensor]) -> None:
        for j in range(len(self.info.shards)):
            assert self.stub(j).PushParameters(iter(push_stream(self.info, j, weights)), timeout=T).version == 0

    def push(self, worker: int, step: int, grads: Sequence[torch.Tensor], wire_dtype: str | None = None) -> None:
        for j in range(len(self.info.shards)):
            reply = self.stub(j).PushGradients(iter(push_stream(self.info, j, grads, worker=worker, step=step, wire_dtype=wire_dtype)), timeout=T)
            assert not reply.already_applied

    def snapshot(self) -> tuple:
        st = self.wire.coordinator.GetStatus(pb.StatusRequest(job=self.info.job), timeout=T)
        return st.version, [(s.version, list(s.pushed_workers)) for s in st.shards], pull_weights(self.wire, self.info, st.version)


def assert_same(before: tuple, after: tuple) -> None:
    assert before[:2] == after[:2], f"status changed: {before[:2]} -> {after[:2]}"
    for a, b in zip(before[2], after[2], strict=True):
        assert torch.equal(a, b), "weights changed"


def create(wire: Wire, name: str, params: dict[str, tuple[tuple[int, ...], str]], num_workers: int = 1, grad_dtype: str = "") -> Job:
    config = pb.JobConfig(
        optimizer="SGD", optimizer_kwargs_json=json.dumps({"lr": LR, "momentum": MOMENTUM}), group_options_json=["{}"],
        params=[pb.ParamSpec(name=n, shape=list(shape), dtype=dtype) for n, (shape, dtype) in params.items()],
        num_workers=num_workers, grad_dtype=grad_dtype,
    )
    return Job(wire, wire.coordinator.CreateJob(pb.CreateJobRequest(job=name, config=config), timeout=T))


def values(params: dict[str, tuple[tuple[int, ...], str]], seed: int) -> list[torch.Tensor]:
    """Values every wire dtype here holds exactly (multiples of 1/8 below 16)."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(-64, 64, shape, generator=gen) / 8).to(TORCH[dtype]) for shape, dtype in params.values()]


def reference(weights: Sequence[torch.Tensor]) -> Reference:
    return Reference([torch.nn.Parameter(w.clone()) for w in weights], torch.optim.SGD, {"lr": LR, "momentum": MOMENTUM})


def assert_weights(job: Job, version: int, ref: Reference) -> None:
    for got, want in zip(pull_weights(job.wire, job.info, version), ref.params, strict=True):
        assert torch.equal(got.to(want.dtype), want.detach())


# a: 40 bytes on shard 0; b (the larger of the other two) and c on shard 1, where c's float32 buffer comes first:
# a shard's buffers follow the order in which their dtypes first appear in the job's parameters, not size
MIXED = {"a": ((10,), "float32"), "b": ((2,), "float64"), "c": ((2,), "float32")}
ONE = {"w": ((4, 3), "float32")}  # on two shards: shard 1 holds no parameter


# -- buffers, their numbering and their bytes ---------------------------------------------------------------------


def test_buffers_one_per_dtype_in_order_of_first_appearance(wire, job_name):
    job = create(wire, job_name, MIXED)
    assert [(s.param, s.start, s.stop) for s in job.info.shards[0].slices] == [(0, 0, 10)]
    assert [(s.param, s.start, s.stop) for s in job.info.shards[1].slices] == [(2, 0, 2), (1, 0, 2)]
    assert [(d, len(s)) for d, s in buffers_of(job.info, 1)] == [("float32", 1), ("float64", 1)]
    w0 = values(MIXED, 0)
    job.init(w0)
    pulled = pull_chunks(wire, job.info, 1, 0)
    assert [(c.header.buffer, c.header.dtype, c.header.offset, c.header.total, len(c.data)) for c in pulled] == [
        (0, "float32", 0, 2, 8), (1, "float64", 0, 2, 16)]
    assert pulled[0].data == le_bytes(w0[2], "float32") and pulled[1].data == le_bytes(w0[1], "float64")
    assert all(c.header.step == 0 and c.header.generation == job.info.generation for c in pulled)
    # step 0 by hand-made chunks; after pushing step t a worker pulls min_version t + 1
    ref = reference(w0)
    for step in range(2):
        g = values(MIXED, 10 + step)
        job.push(0, step, g)
        ref.step([g])
        assert_weights(job, step + 1, ref)


# -- a shard that holds no parameter --------------------------------------------------------------------------------


def test_a_shard_without_parameters_takes_and_sends_one_header_only_chunk(wire, job_name):
    job = create(wire, job_name, ONE)
    assert [len(s.slices) for s in job.info.shards] == [1, 0]
    header_only = push_stream(job.info, 1, [])
    assert len(header_only) == 1 and header_only[0].data == b"" and not header_only[0].header.dtype
    w0 = values(ONE, 1)
    job.init(w0)  # shard 1's initial weights: the header-only chunk
    ref = reference(w0)
    before = job.snapshot()

    def refused(stream: list[pb.TensorChunk], pattern: str) -> None:
        exc = rpc_error(lambda: job.stub(1).PushGradients(iter(stream), timeout=T))
        assert_status(exc, Code.INVALID_ARGUMENT, pattern, "INVALID_ARGUMENT")
        assert_same(before, job.snapshot())

    refused([], r"^empty stream: no chunks .*one header-only chunk")
    refused(header_only * 2, r"exactly one header-only chunk, not two")
    data = pb.TensorChunk(header=pb.ChunkHeader(job=job_name, shard=1, buffer=0, dtype="float32", total=2), data=bytes(8))
    refused([data], r"chunk for buffer 0, but there are only 0 buffers: none \(this shard holds no parameter")
    refused(header_only + [data], r"chunk for buffer 0, but there are only 0 buffers")
    # the step goes on: the header-only push counts as worker 0's push to shard 1
    g = values(ONE, 2)
    job.push(0, 0, g)
    ref.step([g])
    assert job.snapshot()[0] == 1
    pulled = pull_chunks(wire, job.info, 1, 1)
    assert len(pulled) == 1 and pulled[0].data == b""
    h = pulled[0].header
    assert (h.job, h.shard, h.step, h.buffer, h.dtype, h.offset, h.total) == (job_name, 1, 1, 0, "", 0, 0)
    assert h.HasField("generation") and h.generation == job.info.generation
    assert_weights(job, 1, ref)


def test_a_shard_with_buffers_refuses_a_header_only_or_empty_stream(wire, job_name):
    job = create(wire, job_name, ONE)
    job.init(values(ONE, 3))
    before = job.snapshot()
    header_only = [pb.TensorChunk(header=pb.ChunkHeader(job=job_name, shard=0))]
    for stream, pattern in [([], r"^empty stream"), (header_only, r"buffer 0 has 12 elements, the chunk says 0")]:
        assert_status(rpc_error(lambda stream=stream: job.stub(0).PushGradients(iter(stream), timeout=T)), Code.INVALID_ARGUMENT, pattern, "INVALID_ARGUMENT")
        assert_same(before, job.snapshot())


# -- errors that name the shard's buffers ---------------------------------------------------------------------------


def test_a_chunk_for_a_buffer_that_does_not_exist_names_the_real_ones(wire, job_name):
    job = create(wire, job_name, MIXED)
    job.init(values(MIXED, 4))
    before = job.snapshot()
    for shard, buffer, names in [(1, 2, r"0 \(float32, 2 elements\), 1 \(float64, 2 elements\)$"), (0, 1, r"0 \(float32, 10 elements\)$")]:
        bad = pb.TensorChunk(header=pb.ChunkHeader(job=job_name, shard=shard, buffer=buffer, dtype="float32", total=2), data=bytes(8))
        exc = rpc_error(lambda shard=shard, bad=bad: job.stub(shard).PushGradients(iter([bad]), timeout=T))
        count = len(job.info.shards[shard].slices)
        assert_status(exc, Code.INVALID_ARGUMENT, rf"chunk for buffer {buffer}, but there are only {count} buffers: {names}", "INVALID_ARGUMENT")
        assert_same(before, job.snapshot())


# -- dtypes: the buffer's own, or the job's grad_dtype for gradients; never converted --------------------------------


@pytest.mark.parametrize(("param", "chunk"), [("float32", "float64"), ("float32", "bfloat16"), ("float32", "float16"), ("float64", "float32")])
def test_a_chunk_of_another_dtype_is_refused_not_converted(wire, job_name, param, chunk):
    params = {"w": ((4, 3), param)}
    job = create(wire, job_name, params)
    w0 = values(params, 5)
    # initial weights of another dtype: refused as well
    exc = rpc_error(lambda: job.stub(0).PushParameters(iter(push_stream(job.info, 0, w0, wire_dtype=chunk)), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, rf"buffer 0: the chunk carries {chunk}, the buffer takes {param}$", "INVALID_ARGUMENT")
    job.init(w0)
    before = job.snapshot()
    g = values(params, 6)
    exc = rpc_error(lambda: job.stub(0).PushGradients(iter(push_stream(job.info, 0, g, wire_dtype=chunk)), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, rf"buffer 0: the chunk carries {chunk}, the buffer takes {param}$", "INVALID_ARGUMENT")
    assert_same(before, job.snapshot())
    job.push(0, 0, g)
    ref = reference(w0)
    ref.step([g])
    assert_weights(job, 1, ref)


@pytest.mark.parametrize("grad_dtype", ["bfloat16", "float16"])
def test_grad_dtype_gradients_travel_in_it_and_only_in_it(wire, job_name, grad_dtype):
    job = create(wire, job_name, MIXED, num_workers=2, grad_dtype=grad_dtype)
    w0 = values(MIXED, 7)
    # the initial weights travel in the parameters' dtypes
    exc = rpc_error(lambda: job.stub(0).PushParameters(iter(push_stream(job.info, 0, w0, wire_dtype=grad_dtype)), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, rf"the chunk carries {grad_dtype}, the buffer takes float32$")
    job.init(w0)
    before = job.snapshot()
    g = [values(MIXED, 8), values(MIXED, 9)]
    for shard, own in [(0, "float32"), (1, "float32")]:  # the parameters' own dtype is refused too
        exc = rpc_error(lambda shard=shard, own=own: job.stub(shard).PushGradients(iter(push_stream(job.info, shard, g[0], wire_dtype=own)), timeout=T))
        assert_status(exc, Code.INVALID_ARGUMENT,
                      rf"buffer 0: the chunk carries float32, the buffer takes {grad_dtype} \(the job's grad_dtype; the buffer itself is float32\)")
        assert_same(before, job.snapshot())
    # shard 1's float64 buffer takes grad_dtype as well: a stream whose first buffer is right and second is not
    mixed = [c for c in push_stream(job.info, 1, g[0], wire_dtype=grad_dtype) if c.header.buffer == 0]
    mixed += [c for c in push_stream(job.info, 1, g[0]) if c.header.buffer == 1]
    exc = rpc_error(lambda: job.stub(1).PushGradients(iter(mixed), timeout=T))
    assert_status(exc, Code.INVALID_ARGUMENT, rf"buffer 1: the chunk carries float64, the buffer takes {grad_dtype} \(.*itself is float64\)")
    assert_same(before, job.snapshot())
    # in grad_dtype the push goes through and is summed in the parameters' dtypes
    for worker in (0, 1):
        job.push(worker, 0, g[worker], wire_dtype=grad_dtype)
    ref = reference(w0)
    ref.step(g)
    assert_weights(job, 1, ref)
