"""Start the service: gRPC servers for the coordinator and the shards, and ``serve()`` that runs them all.

``create_*_server(host, address, config) -> (server, port)`` follow gRPC's examples: bind ``host:0`` in tests
and read the port back. Every server also answers gRPC health checks (without a token: probes send none) and
reflection, under both ``grpc.reflection.v1`` (grpcurl and current clients) and ``grpc.reflection.v1alpha``
(older ones). ``config`` is the service's ``ServerConfig`` (auth token, TLS, message and chunk sizes, the front
door's threads).

Every server is a ``grpc.aio`` server on its own event loop (``AioServer``): a call that waits holds no thread.
A shard's pull waits for its step on the loop, its CPU work runs on ``SHARD_COMPUTE_THREADS`` threads; the
coordinator's JoinJob waits on the loop for rank 0's job and initial weights, its blocking work (creating a
job, state, status) runs on ``ServerConfig.grpc_threads`` threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from paramserver.core.config import ServerConfig, TLSConfig
from paramserver.core.malloc import fix_mmap_threshold
from paramserver.service.aio_server import AioServer
from paramserver.service.auth import AsyncBearerTokenInterceptor
from paramserver.service.coordinator_host import CoordinatorHost
from paramserver.service.coordinator_servicer import CoordinatorServicer
from paramserver.service.relay import ShardRelay
from paramserver.service.shard_host import ShardHost
from paramserver.service.shard_servicer import ShardServicer, shard_handler
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire.protocol import COORDINATOR_SERVICE, SHARD_SERVICE

__all__ = ["SHARD_COMPUTE_THREADS", "Service", "TLSConfig", "create_coordinator_server", "create_shard_server", "grpc_options", "shard_port"]

# Threads of a shard server for CPU work only (folding pushes, the update); never for waiting.
SHARD_COMPUTE_THREADS = 4

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
REFLECTION_V1ALPHA = reflection.SERVICE_NAME  # "grpc.reflection.v1alpha.ServerReflection"
_DESCRIPTOR_LOCK = threading.Lock()


def reflection_v1_descriptor() -> Any:
    """The file descriptor of ``grpc/reflection/v1/reflection.proto`` in the default pool, so that reflection can
    describe its own v1 service too. grpcio-reflection (1.85) ships only v1alpha; v1 has the same messages,
    field for field, under another package, so it is made from v1alpha's descriptor (once per process)."""
    pool = descriptor_pool.Default()
    name = "grpc/reflection/v1/reflection.proto"
    with _DESCRIPTOR_LOCK:
        try:
            return pool.FindFileByName(name)
        except KeyError:
            return _add_reflection_v1(pool, name)


def _add_reflection_v1(pool: Any, name: str) -> Any:
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto.name, proto.package = name, "grpc.reflection.v1"
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = field.type_name.replace(old, new)
    for service in proto.service:
        service.ClearField("options")
        for method in service.method:
            method.input_type, method.output_type = method.input_type.replace(old, new), method.output_type.replace(old, new)
    try:
        pool.Add(proto)
    except TypeError:  # added meanwhile by another thread (else the KeyError below says what went wrong)
        pass
    return pool.FindFileByName(name)


def _enable_reflection(service_names: Sequence[str], server: grpc.aio.Server) -> None:
    """Reflection under v1alpha and v1: one servicer; v1's messages are byte for byte v1alpha's, so v1alpha's
    (de)serializers serve both names."""
    reflection_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer([*service_names, REFLECTION_V1, REFLECTION_V1ALPHA])
    handler = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for name in (REFLECTION_V1, REFLECTION_V1ALPHA):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handler),))


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The channel arguments every server of the service starts with (message limits, keepalive)."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _bind(server: grpc.aio.Server, address: str, tls: TLSConfig | None) -> int:
    try:
        return _add_port(server, address, tls)
    except RuntimeError as exc:  # grpc.aio's way of saying the port is taken
        raise OSError(f"cannot bind {address} (is the port in use?)") from exc


def _add_port(server: grpc.aio.Server, address: str, tls: TLSConfig | None) -> int:
    if tls is not None:
        creds = grpc.ssl_server_credentials(
            [(tls.private_key, tls.certificate_chain)],
            root_certificates=tls.client_ca,
            require_client_auth=tls.client_ca is not None,
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port


def _start(address: str, config: ServerConfig, add: Callable[[grpc.aio.Server], None], service_names: Sequence[str], name: str,
           exclusive: bool = False) -> AioServer:
    """A ``grpc.aio`` server with ``add``'s services, health, reflection and the token check, built and run on
    its own event loop thread. ``exclusive``: no SO_REUSEPORT (a fixed port another server holds fails to bind
    instead of sharing its connections)."""
    fix_mmap_threshold()

    async def build() -> tuple[grpc.aio.Server, int]:
        interceptors = [AsyncBearerTokenInterceptor(config.auth_token)] if config.auth_token else []
        options = [*grpc_options(config), *([("grpc.so_reuseport", 0)] if exclusive else [])]
        server = grpc.aio.server(interceptors=interceptors, options=options)
        add(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in [*service_names, ""]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        _enable_reflection([*service_names, health.SERVICE_NAME], server)
        port = _bind(server, address, config.tls)
        await server.start()
        return server, port

    return AioServer(build, name)


def shard_port(config: ServerConfig, shard: int, standby: bool = False) -> int:
    """The port shard ``shard``'s server binds: ``config.shard_port_base + shard`` (its standby's: after all
    primaries', ``+ num_shards``), or 0 (any free one) without a base."""
    if config.shard_port_base is None:
        return 0
    return config.shard_port_base + shard + (config.num_shards if standby else 0)


def create_shard_server(host: ShardHost, address: str, config: ServerConfig | None = None) -> tuple[AioServer, int]:
    """Shard ``host.shard_id``'s server (``config``: the service's, default ``ServerConfig()``). The returned
    server's ``stop(grace)`` returns an event to ``wait(timeout)`` on, as ``grpc.Server.stop`` does."""
    config = ServerConfig() if config is None else config
    compute = futures.ThreadPoolExecutor(SHARD_COMPUTE_THREADS, thread_name_prefix=f"shard{host.shard_id}-compute")
    servicer = ShardServicer(host, config.chunk_bytes, compute)
    try:
        server = _start(address, config, lambda s: s.add_generic_rpc_handlers((shard_handler(servicer),)), [SHARD_SERVICE],
                        f"shard{host.shard_id}-grpc", exclusive=not address.endswith(":0"))
    except BaseException:
        compute.shutdown(wait=False)
        raise
    server.on_stop(lambda: host.close_watches(server.loop))
    server.on_stop(host.close)  # its workers' shared memory goes with it
    server.on_stop(lambda: compute.shutdown(wait=False))
    return server, server.port


def create_coordinator_server(host: CoordinatorHost, address: str, config: ServerConfig | None = None) -> tuple[AioServer, int]:
    """The front door. A JoinJob that waits for rank 0 holds no thread; ``config.grpc_threads`` threads do the
    blocking work (creating jobs, state, status). It also relays the Shard service (``relay.ShardRelay``) for
    workers that can reach only this port. ``stop(grace)`` as for a shard server."""
    config = ServerConfig() if config is None else config
    work = futures.ThreadPoolExecutor(config.grpc_threads, thread_name_prefix="coordinator-work")
    servicer = CoordinatorServicer(host, config.chunk_bytes, work)
    # the Shard service relayed to the shards, for workers that reach only the front door (read at every call:
    # a takeover moves a shard)
    relay = ShardRelay(lambda: host.shard_addresses, grpc_options(config), config.tls)

    def add(server: grpc.aio.Server) -> None:
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
        server.add_generic_rpc_handlers((relay.handler(),))

    try:
        server = _start(address, config, add, [COORDINATOR_SERVICE, SHARD_SERVICE], "coordinator-grpc")
    except BaseException:
        work.shutdown(wait=False)
        raise
    server.on_stop(lambda: host.close_watches(server.loop))
    server.on_stop(lambda: work.shutdown(wait=False))
    server.on_stop(lambda: server.loop.create_task(relay.close()))
    return server, server.port


class Service:
    """A running service: ``address`` is the coordinator's front door; ``shutdown()`` stops every server."""

    def __init__(self, coordinator: CoordinatorHost, servers: list[AioServer], address: str, metrics: str | None = None) -> None:
        self.coordinator = coordinator
        self._servers = servers
        self.address = address
        self.metrics = metrics

    @property
    def service_id(self) -> str:
        """This service instance's id (random per start): ``GetServiceInfo`` reports it, ``Stop`` must name it."""
        return self.coordinator.service_id

    def placements(self) -> list[dict[str, Any]]:
        """Every part of the service, as ``RayService.placements()`` gives them: the coordinator first (role
        "coordinator", shard None, ``address`` the front door), then shard 0, 1, ... (role "primary", ``address``
        its gRPC server). All run in this process: one ``pid``; ``node_id`` is None (no Ray node)."""
        common = {"pid": os.getpid(), "node_id": None, "device": "cpu", "metrics": self.metrics}
        return [
            {"role": "coordinator", "shard": None, "address": self.address, **common},
            *({"role": "primary", "shard": j, "address": a, **common} for j, a in enumerate(self.coordinator.shard_addresses)),
        ]

    def stop_requested(self) -> bool:
        return self.coordinator.stop_requested.is_set()

    def shutdown(self, grace: float = 1.0) -> None:
        for server in self._servers:
            server.stop(grace).wait(timeout=grace + 5)
        if self.coordinator.checkpoints is not None:
            self.coordinator.checkpoints.close()  # the writes already begun finish

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
