"""The lower-level client: a job's flat per-shard buffers over gRPC, for trainers that manage them.

Every call has a deadline. Wire errors come back as the Python errors the server raised, by the table in
``paramserver.wire.errors``: a stale or future step as ``StaleStepError`` / ``FutureStepError`` carrying the
server's version, an unknown job as ``JobNotFoundError`` (a ``LookupError``), bad input as ``ValueError``,
a wrong token as ``UnauthenticatedError`` (a ``PermissionError``), a deadline as ``DeadlineExceededError``
(a ``TimeoutError``); transport failures (UNAVAILABLE, ...) as ``ConnectionError``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, InvalidStateError, ThreadPoolExecutor, wait
from typing import Any, TypeVar

import grpc
import torch

from paramserver.core.params import ParamInfo
from paramserver.core.sharding import ShardingPlan, Slice
from paramserver.dataplane.segments import available as shared_memory_available
from paramserver.dataplane.segments import host_identity
from paramserver.wire import codec, json_values
from paramserver.wire import errors as wire_errors
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    SHARD_METADATA_KEY,
    SHARD_SERVICE,
)
from workers.shared_memory import SharedShard, open_attachment

T = TypeVar("T")
log = logging.getLogger("paramserver")
TRANSPORTS = ("auto", "grpc", "shared_memory")
# How a worker reaches a shard: "direct" (its own address), "relay" (through the front door), "auto" (direct
# where the shard's address accepts a connection, else the relay)
ROUTES = ("auto", "direct", "relay")
PROBE_TIMEOUT_S = 1.0


def error_from_rpc(exc: grpc.RpcError) -> Exception:
    """The Python error of a failed call: the class named by the server's ErrorInfo reason (with the
    version of a stale or future step), or, for errors gRPC made itself, the class of the code."""
    return wire_errors.to_exception(exc.code(), exc.details(), exc.trailing_metadata())


def plan_from_info(info: pb.JobInfo) -> ShardingPlan:
    params = tuple(
        ParamInfo(i, p.name or None, tuple(p.shape), codec.parse_dtype(p.dtype), p.group) for i, p in enumerate(info.config.params)
    )
    shards = tuple(tuple(Slice(s.param, s.start, s.stop) for s in shard.slices) for shard in info.shards)
    return ShardingPlan(params, shards)


class ShardCalls:
    """The Shard service's methods on one channel, with the data path's own chunk codec. ``relay_shard``: the
    channel is the front door's, which relays every call to that shard (named in each call's metadata)."""

    def __init__(self, channel: grpc.Channel, relay_shard: int | None = None) -> None:
        prefix = f"/{SHARD_SERVICE}/"
        extra = () if relay_shard is None else ((SHARD_METADATA_KEY, str(relay_shard)),)
        self.relayed = relay_shard is not None
        self.PushGradients = _with_metadata(channel.stream_unary(
            prefix + "PushGradients", request_serializer=codec.encode_chunk, response_deserializer=pb.PushReply.FromString
        ), extra)
        self.PushParameters = _with_metadata(channel.stream_unary(
            prefix + "PushParameters", request_serializer=codec.encode_chunk, response_deserializer=pb.PushReply.FromString
        ), extra)
        self.PullParameters = _with_metadata(channel.unary_stream(
            prefix + "PullParameters", request_serializer=pb.PullRequest.SerializeToString, response_deserializer=codec.decode_chunk
        ), extra)
        stub = pb_grpc.ShardStub(channel)  # the shared-memory calls carry small messages: the generated code
        self.AttachSharedMemory = _with_metadata(stub.AttachSharedMemory, extra)
        self.PushShared = _with_metadata(stub.PushShared, extra)
        self.PullShared = _with_metadata(stub.PullShared, extra)
        self.DetachSharedMemory = _with_metadata(stub.DetachSharedMemory, extra)


def _with_metadata(method: Any, extra: tuple[tuple[str, str], ...]) -> Any:
    """``method`` (a gRPC multi-callable) with ``extra`` added to every call's metadata (none: ``method`` itself)."""
    return method if not extra else _WithMetadata(method, extra)


class _WithMetadata:
    def __init__(self, method: Any, extra: tuple[tuple[str, str], ...]) -> None:
        self.method, self.extra = method, extra

    def __call__(self, request: Any, *, metadata: Sequence[tuple[str, str]] = (), **kwargs: Any) -> Any:
        return self.method(request, metadata=(*metadata, *self.extra), **kwargs)

    def future(self, request: Any, *, metadata: Sequence[tuple[str, str]] = (), **kwargs: Any) -> Any:
        return self.method.future(request, metadata=(*metadata, *self.extra), **kwargs)


class CallFuture(Future):
    """A unary call under way (``multi_callable.future``) as a ``concurrent.futures.Future``: its reply, or the
    call's error as ``error_from_rpc`` translates it. ``cancel()`` cancels the call itself: no thread waits on
    it, so a call that waits long on the server (a push that pulls too) costs nothing once given up."""

    def __init__(self, call: grpc.Future) -> None:
        super().__init__()
        self._call = call
        self._cancel_lock = threading.Lock()
        call.add_done_callback(self._finish)

    def _finish(self, call: grpc.Future) -> None:
        if self.done():
            return  # given up (cancelled) before the call ended
        try:
            self.set_result(call.result())
        except grpc.FutureCancelledError:
            self._cancelled()
        except grpc.RpcError as exc:
            self.set_exception(error_from_rpc(exc))
        except InvalidStateError:
            pass  # cancelled meanwhile

    def cancel(self) -> bool:
        self._call.cancel()
        return self._cancelled()

    def _cancelled(self) -> bool:
        with self._cancel_lock:  # the caller's cancel and the call's end may come at once
            if self.cancelled():
                return True
            if not super().cancel():
                return False  # it ended first
            # notified too, as an executor's future is: ``concurrent.futures.wait`` counts only such a one as done
            self.set_running_or_notify_cancel()
            return True


def reachable(address: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether ``address`` ("host:port", "[v6]:port") accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


class ServiceClient:
    def __init__(
        self,
        address: str,
        job: str = "default",
        *,
        auth_token: str | None = None,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,  # (certificate chain, private key) for mTLS
        timeout: float = 60.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
        transport: str = "auto",
        route: str = "auto",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.job = job
        # "auto": shared memory with the shards on this host (once attach_shared_memory succeeds), gRPC chunks
        # with the others; "grpc": chunks everywhere; "shared_memory": as auto, but a shard it cannot share
        # memory with is an error
        self.transport = transport
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._metadata = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._root_certificates = root_certificates
        self._client_certificate = client_certificate
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        self._channels: list[grpc.Channel] = []
        self._shard_channels: list[grpc.Channel] = []
        self.moved: list[int] = []  # the shards whose address the last (re)join changed
        self.route = route
        self.routes: list[str] = []  # per shard: "direct" or "relay", as the last (re)join chose
        self._reachable: dict[str, bool] = {}  # "auto": each shard address probed once
        self._front_door = self._channel(address)
        self.coordinator = pb_grpc.CoordinatorStub(self._front_door)
        self.shards: list[pb_grpc.ShardStub] = []
        # The last CreateJob/JoinJob reply; its .generation is the job's weights generation at that time (a
        # rejoin compares it with its weights' to tell a standby's takeover from a rollback), unlike
        # self.generation below, the generation of the last pull.
        self.info: pb.JobInfo | None = None
        self.plan: ShardingPlan | None = None
        self._pool: ThreadPoolExecutor | None = None
        # The weights generation each shard reported in the last pull (a load starts a new one on every
        # shard), and the newest of them; None until a pull reported one.
        self.generations: list[int | None] = []
        self.generation: int | None = None
        # per shard: its buffers in shared memory (attach_shared_memory), or None (gRPC chunks)
        self.shared: list[SharedShard | None] = []

    def _channel(self, address: str) -> grpc.Channel:
        if self._root_certificates is not None or self._client_certificate is not None:
            key, chain = (self._client_certificate[1], self._client_certificate[0]) if self._client_certificate else (None, None)
            creds = grpc.ssl_channel_credentials(self._root_certificates, private_key=key, certificate_chain=chain)
            channel = grpc.secure_channel(address, creds, options=self._options)
        else:
            channel = grpc.insecure_channel(address, options=self._options)
        self._channels.append(channel)
        return channel

    def _call(self, fn: Callable[..., T], request: Any, timeout: float | None = None) -> T:
        try:
            return fn(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    def _on_shards(self, fn: Callable[[int], T]) -> list[T]:
        """Run ``fn(shard)`` for every shard in parallel, one stream each. The first error is raised as soon
        as it happens (a shard that is gone does not wait for the others' pulls)."""
        assert self._pool is not None
        futures = [self._pool.submit(fn, j) for j in range(len(self.shards))]
        wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]

    def _attach(self, info: pb.JobInfo) -> pb.JobInfo:
        """Use the shards ``info`` names (again after a rejoin: a shard that restarted has a new address)."""
        old = [s.address for s in self.info.shards] if self.info is not None else []
        self.info = info
        self.plan = plan_from_info(info)
        self.routes = [self._route(s.address) for s in info.shards]
        if "relay" in self.routes:
            log.info("job %s: shards %s go through the front door's relay", self.job, [j for j, r in enumerate(self.routes) if r == "relay"])
        old_channels = self._shard_channels  # the old shards' channels (calls still on them end on their own)
        self._shard_channels = [self._channel(s.address) for s, r in zip(info.shards, self.routes) if r == "direct"]
        channels = iter(self._shard_channels)
        self.shards = [ShardCalls(self._front_door, j) if r == "relay" else ShardCalls(next(channels)) for j, r in enumerate(self.routes)]
        for channel in old_channels:
            channel.close()
            self._channels.remove(channel)
        self.moved = [j for j, s in enumerate(info.shards) if j < len(old) and old[j] != s.address]
        # a shard that moved starts without this worker's shared memory (attach it again)
        kept = self.shared if len(self.shared) == len(self.shards) else [None] * len(self.shards)
        self.shared = [None if j in self.moved else kept[j] for j in range(len(self.shards))]
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        # a push and a pull per shard may be in flight at once
        self._pool = ThreadPoolExecutor(max(1, 2 * len(self.shards)), thread_name_prefix="paramserver-client")
        return info

    def _route(self, address: str) -> str:
        """How this worker reaches the shard at ``address``: "direct" or "relay" (through the front door)."""
        if self.route != "auto":
            return self.route
        if address not in self._reachable:
            self._reachable[address] = reachable(address)
            if not self._reachable[address]:
                log.info("job %s: shard address %s does not accept connections from here: its calls go through the front door's relay",
                         self.job, address)
        return "direct" if self._reachable[address] else "relay"

    # -- the job ---------------------------------------------------------------------------------------------

    def create_job(self, config: pb.JobConfig) -> pb.JobInfo:
        return self._attach(self._call(self.coordinator.CreateJob, pb.CreateJobRequest(job=self.job, config=config)))

    def join_job(self, rank: int, timeout: float | None = None) -> pb.JobInfo:
        return self._attach(self._call(self.coordinator.JoinJob, pb.JoinJobRequest(job=self.job, rank=rank), timeout))

    def status(self) -> pb.StatusReply:
        return self._call(self.coordinator.GetStatus, pb.StatusRequest(job=self.job))

    def report_metric(self, worker: int, step: int, metric: float) -> None:
        self._call(self.coordinator.ReportMetrics, pb.ReportMetricsRequest(job=self.job, worker=worker, step=step, metrics={"metric": metric}))

    def service_info(self) -> pb.ServiceInfo:
        """Which service this is: its instance id (random per start of the service) and its shards' addresses."""
        return self._call(self.coordinator.GetServiceInfo, pb.ServiceInfoRequest())

    def stop(self, service_id: str | None = None) -> str:
        """Ask the process running the service to stop it (``paramserver stop``). A stop names the instance it
        stops: ``service_id`` (None: the id the service reports now, from ``service_info()``); a service with
        another id refuses (``WrongServiceError``). Returns the id of the service asked to stop."""
        if service_id is None:
            service_id = self.service_info().service_id
        self._call(self.coordinator.Stop, pb.StopRequest(service_id=service_id))
        return service_id

    def delete_job(self, job: str | None = None) -> None:
        """Delete a job (None: this client's): its state on every shard, its shared memory, its membership; its
        checkpoints stay. Its name is free for a new job at once. ``JobNotFoundError`` if there is none."""
        self._call(self.coordinator.DeleteJob, pb.DeleteJobRequest(job=self.job if job is None else job))

    def checkpoint(self, timeout: float | None = None) -> int:
        """Write a checkpoint of the job now (the service needs a ``checkpoint_dir``); returns its step once it
        is valid on disk."""
        return self._call(self.coordinator.Checkpoint, pb.CheckpointRequest(job=self.job), timeout).step

    def leave(self, worker: int) -> None:
        self._call(self.coordinator.LeaveJob, pb.LeaveJobRequest(job=self.job, worker=worker))

    @property
    def transport_in_use(self) -> str:
        """How this worker's bytes move now: "shared_memory" (every shard), "grpc" (none) or "mixed"."""
        shared = sum(s is not None for s in self.shared)
        return "shared_memory" if shared and shared == len(self.shared) else "mixed" if shared else "grpc"

    def attach_shared_memory(self, worker: int, shards: Sequence[int] | None = None) -> list[SharedShard | None]:
        """Ask each of ``shards`` (None: all) for shared memory (under transport "auto" or "shared_memory"):
        a shard on this host answers with segments, which count once they open here. Returns ``self.shared``
        (per shard, its buffers in shared memory or None). Pushes and pulls of an attached shard go through
        its segments from then on."""
        assert self.plan is not None
        for j in range(len(self.shards)) if shards is None else shards:
            self.shared[j] = None
            if self.transport == "grpc":
                continue
            why = "" if shared_memory_available() else "this host has no /dev/shm"
            if self.shards[j].relayed:
                why = "the shard is reached through the front door's relay"
            if not why:
                reply = self._call(self.shards[j].AttachSharedMemory, pb.AttachRequest(job=self.job, worker=worker, shard=j, host=host_identity()))
                sizes = [(layout.numel, layout.dtype) for layout in self.plan.buffers(j)]
                if not reply.grads_segment:
                    why = f"the shard is on host {reply.host or '(without shared memory)'}"
                else:
                    try:
                        self.shared[j] = open_attachment(reply, sizes)
                    except OSError as exc:
                        why = f"its segments do not open here ({exc})"
                        self.detach_shared_memory(worker, [j])
            if self.shared[j] is not None:
                log.info("job %s: worker %d moves shard %d's bytes through shared memory (%s weights)", self.job, worker, j,
                         "shared" if self.shared[j].weights_shared else "copied")  # type: ignore[union-attr]
            elif self.transport == "shared_memory":
                raise ConnectionError(f"job {self.job!r}: transport='shared_memory', but shard {j} cannot share memory with worker {worker}: {why}")
            else:
                log.info("job %s: worker %d moves shard %d's bytes over gRPC: %s", self.job, worker, j, why)
        return self.shared

    def detach_shared_memory(self, worker: int, shards: Sequence[int] | None = None) -> None:
        """Let the shards go of this worker's segments (best effort: a shard that is gone let go already)."""
        for j in range(len(self.shards)) if shards is None else shards:
            self.shared[j] = None
            try:
                self._call(self.shards[j].DetachSharedMemory, pb.DetachRequest(job=self.job, worker=worker, shard=j), timeout=5.0)
            except (ConnectionError, LookupError, TimeoutError, ValueError) as exc:
                log.debug("job %s: shard %d did not detach worker %d: %s", self.job, j, worker, exc)

    def renew_lease(self, worker: int, timeout: float | None = None) -> int:
        """Renew ``worker``'s lease on its membership (every call to the coordinator does; pushes and pulls go
        to the shards and do not); returns the job's membership epoch. A worker that is not a member (its lease
        expired, it left, it never joined) gets ``NotAMemberError``: it may join again."""
        request = pb.RenewLeaseRequest(job=self.job, worker=worker, transport=self.transport_in_use)
        return self._call(self.coordinator.RenewLease, request, timeout).epoch

    # -- data ------------------------------------------------------------------------------------------------

    def _stream(self, buffers: Sequence[torch.Tensor], worker: int, step: int, shard: int) -> Any:
        return codec.encode(buffers, self.chunk_bytes, job=self.job, worker=worker, step=step, shard=shard)

    def push_initial_weights(self, weights: Sequence[Sequence[torch.Tensor]]) -> None:
        """Rank 0's initial weights, one list of flat buffers per shard."""
        self._on_shards(lambda j: self._call(self.shards[j].PushParameters, self._stream(weights[j], 0, 0, j)))

    def push(
        self, worker: int, step: int, grads: Sequence[Sequence[torch.Tensor]], missing: Sequence[int] = (), generation: int | None = None
    ) -> list[pb.PushReply]:
        """``worker``'s gradients for ``step``, one list of flat buffers per shard, to all shards in parallel."""
        futures = [self.push_shard(worker, step, j, grads[j], missing, generation) for j in range(len(self.shards))]
        return [f.result() for f in futures]

    def push_shard(
        self, worker: int, step: int, shard: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = (), generation: int | None = None,
        pull_min_version: int | None = None,
    ) -> Future:
        """Start pushing one shard's gradients; the future holds its reply (or the error). ``missing``: the
        parameters this worker has no gradient for (their places hold zeros). ``generation``: the weights
        generation the gradients were computed on (from the pull that brought those weights); a shard in
        another generation (a state was loaded since) refuses the push with ``StateReloadedError``.
        ``pull_min_version``: where the shard is reached through shared memory, the same call then pulls
        (``pull``'s wait for that version): the reply carries the pull's answer (``pulled``)."""
        assert self._pool is not None
        extra = {} if generation is None else {"generation": generation}
        shared = self.shared[shard] if shard < len(self.shared) else None
        if shared is not None:
            _copy_unless_same(grads, shared.grads)
            if pull_min_version is not None:
                extra["pull_min_version"] = pull_min_version
            request = pb.SharedPush(job=self.job, worker=worker, step=step, shard=shard, missing_params=list(missing), **extra)
            return CallFuture(self.shards[shard].PushShared.future(request, timeout=self.timeout, metadata=self._metadata))
        stream = codec.encode(grads, self.chunk_bytes, job=self.job, worker=worker, step=step, shard=shard, missing_params=list(missing), **extra)
        return self._pool.submit(self._call, self.shards[shard].PushGradients, stream)

    def pull(
        self,
        worker: int,
        min_version: int,
        timeout: float | None = None,
        destinations: Sequence[Sequence[torch.Tensor]] | None = None,
        generation: int | None = None,
    ) -> list[tuple[int, list[torch.Tensor]]]:
        """Every shard's weights once it reaches ``min_version``: (version, flat buffers) per shard, written
        into ``destinations`` (one list of flat buffers per shard) when given. ``generation``: the weights
        generation this worker holds; a shard where a load started another one answers at once, with the
        loaded weights and version. The generation each shard reported is in ``self.generations``."""
        assert self.plan is not None
        request = {} if generation is None else {"generation": generation}
        generations: list[int | None] = [None] * len(self.shards)

        def one(j: int) -> tuple[int, list[torch.Tensor]]:
            shared = self.shared[j] if j < len(self.shared) else None
            if shared is not None:
                pulled = pb.PullRequest(job=self.job, shard=j, min_version=min_version, worker=worker, **request)
                reply = self._call(self.shards[j].PullShared, pulled, timeout)
                generations[j] = reply.generation
                return reply.version, _weights_into(shared.weights, None if destinations is None else destinations[j])
            layouts = self.plan.buffers(j)
            assembler = codec.Assembler(
                [layout.numel for layout in layouts], [layout.dtype for layout in layouts], None if destinations is None else destinations[j]
            )
            version = min_version
            try:
                for chunk in self.shards[j].PullParameters(
                    pb.PullRequest(job=self.job, shard=j, min_version=min_version, worker=worker, **request),
                    timeout=timeout or self.timeout,
                    metadata=self._metadata,
                ):
                    assembler.add(chunk)
                    version = chunk.header.step
                    if chunk.header.HasField("generation"):
                        generations[j] = chunk.header.generation
            except grpc.RpcError as exc:
                raise error_from_rpc(exc) from None
            return version, assembler.result()

        replies = self._on_shards(one)
        self._pulled_generations(generations)
        return replies

    def pulled(
        self, replies: Sequence[pb.PushReply], destinations: Sequence[Sequence[torch.Tensor]] | None = None
    ) -> list[tuple[int, list[torch.Tensor]]] | None:
        """``pull``'s answer from the replies of pushes that pulled too (``push_shard(pull_min_version=...)``),
        one per shard; None unless every shard's reply carries its pull (a shard not through shared memory)."""
        if len(replies) != len(self.shards) or not all(r.HasField("pulled") and s is not None for r, s in zip(replies, self.shared)):
            return None
        answers = [
            (reply.pulled.version, _weights_into(self.shared[j].weights, None if destinations is None else destinations[j]))  # type: ignore[union-attr]
            for j, reply in enumerate(replies)
        ]
        self._pulled_generations([r.pulled.generation for r in replies])
        return answers

    def _pulled_generations(self, generations: list[int | None]) -> None:
        self.generations = generations
        known = [g for g in generations if g is not None]
        self.generation = max(known) if known else None

    # -- state -----------------------------------------------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        try:
            chunks = self.coordinator.GetState(pb.StateRequest(job=self.job), timeout=self.timeout, metadata=self._metadata)
            _, skeleton, tensors = codec.decode_state(iter(chunks))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return json_values.from_wire(json.loads(skeleton), tensors)

    def load_state(self, state: dict[str, Any], step: int | None = None) -> None:
        """Load ``state`` into the job; it goes on from ``step`` (None: the step the state says, else where
        the job is). The load starts a new weights generation: every worker's next push is refused until it
        has pulled the loaded weights."""
        tensors: list[torch.Tensor] = []
        skeleton = json.dumps(json_values.to_wire(state, "state", tensors))
        chunks = codec.encode_state(skeleton, tensors, self.chunk_bytes, job=self.job)
        if step is not None:
            chunks = _with_step(chunks, step)
        self._call(self.coordinator.LoadState, chunks)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        for channel in self._channels:
            channel.close()


def _weights_into(weights: list[torch.Tensor], destinations: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """A shard's weights segment as a pull's answer: in ``destinations`` when given (copied unless they are it)."""
    if destinations is None:
        return weights
    _copy_unless_same(weights, destinations)
    return list(destinations)


def _copy_unless_same(sources: Sequence[torch.Tensor], destinations: Sequence[torch.Tensor]) -> None:
    """Copy each buffer that is not already its destination (a caller whose buffers are the segments' copies nothing)."""
    for src, dst in zip(sources, destinations):
        if src.data_ptr() != dst.data_ptr() or src.dtype != dst.dtype:
            dst.copy_(src)


def _with_step(chunks: Iterator[pb.StateChunk], step: int) -> Iterator[pb.StateChunk]:
    """The chunks of a state with ``step`` on the first."""
    for i, chunk in enumerate(chunks):
        if i == 0:
            chunk.step = step
        yield chunk
