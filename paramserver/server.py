"""Start the service: gRPC servers for the coordinator and the shards, and ``serve()`` that runs them all.

``create_*_server(address, ...) -> (server, port)`` follow gRPC's examples: bind ``host:0`` in tests and
read the port back. Every server also answers gRPC health checks and reflection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramserver import codec
from paramserver.hosts import CoordinatorHost, LocalFleet, ShardHost
from paramserver.malloc import fix_mmap_threshold
from paramserver.proto.v1 import paramserver_pb2 as pb
from paramserver.proto.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.services import SHARD_SERVICE, BearerTokenInterceptor, CoordinatorServicer, ShardServicer, shard_handler

if TYPE_CHECKING:
    from paramserver.hosting import RayService

DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class TLSConfig:
    """PEM bytes. With ``client_ca`` the server also demands a client certificate signed by it (mTLS)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None


@dataclass(frozen=True)
class ServerOptions:
    auth_token: str | None = None
    tls: TLSConfig | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES
    # gRPC threads per server. A worker's pull holds one on each shard server until its step closes, so a
    # job of W workers needs about 2 W of them (pushes and pulls): jobs that need more are refused.
    max_workers: int = 64
    # Expose Prometheus metrics over HTTP on this port (None: do not); shard actors use any free port.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_bytes + 4096 > self.max_message_bytes:
            raise ValueError(f"chunk_bytes {self.chunk_bytes} must fit in max_message_bytes {self.max_message_bytes}")

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]


def _start(address: str, options: ServerOptions, add: Callable[[grpc.Server], None], service_names: Sequence[str]) -> tuple[grpc.Server, int]:
    fix_mmap_threshold()
    interceptors = [BearerTokenInterceptor(options.auth_token)] if options.auth_token else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=options.max_workers), interceptors=interceptors, options=options.grpc_options())
    add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*service_names, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if options.tls is not None:
        creds = grpc.ssl_server_credentials(
            [(options.tls.private_key, options.tls.certificate_chain)],
            root_certificates=options.tls.client_ca,
            require_client_auth=options.tls.client_ca is not None,
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    server.start()
    return server, port


def create_shard_server(host: ShardHost, address: str, options: ServerOptions = ServerOptions()) -> tuple[grpc.Server, int]:
    servicer = ShardServicer(host, options.chunk_bytes)
    return _start(address, options, lambda s: s.add_generic_rpc_handlers((shard_handler(servicer),)), [SHARD_SERVICE])


def create_coordinator_server(host: CoordinatorHost, address: str, options: ServerOptions = ServerOptions()) -> tuple[grpc.Server, int]:
    servicer = CoordinatorServicer(host, options.chunk_bytes)
    name = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name
    return _start(address, options, lambda s: pb_grpc.add_CoordinatorServicer_to_server(servicer, s), [name])


class Service:
    """A running service: ``address`` is the coordinator's front door; ``shutdown()`` stops every server."""

    def __init__(self, coordinator: CoordinatorHost, servers: list[grpc.Server], address: str) -> None:
        self.coordinator = coordinator
        self._servers = servers
        self.address = address

    def stop_requested(self) -> bool:
        return self.coordinator.stop_requested.is_set()

    def shutdown(self, grace: float = 1.0) -> None:
        for server in self._servers:
            server.stop(grace).wait(timeout=grace + 5)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve(
    num_shards: int = 1,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    trusted_modules: Sequence[str] = (),
    auth_token: str | None = None,
    tls: TLSConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
    gpus_per_shard: float = 0.0,
    cpus_per_shard: float = 0.5,
    ray_address: str | None = None,
    placement: str = "SPREAD",
    placement_timeout: float = 60.0,
    metrics_port: int | None = None,
) -> "RayService":
    """Start the service on Ray: ``num_shards`` shard actors (``gpus_per_shard`` GPUs each, spread by a
    placement group) and the coordinator actor, whose gRPC front door is ``.address``.

    With ``ray_address=None`` it uses the Ray this process is connected to, else starts an embedded local
    Ray; ``"auto"`` or an address joins that cluster.
    """
    from paramserver.hosting import start_on_ray

    _check_num_shards(num_shards)
    options = ServerOptions(auth_token=auth_token, tls=tls, max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes, metrics_port=metrics_port)
    return start_on_ray(
        num_shards, host=host, port=port, trusted_modules=trusted_modules, options=options, gpus_per_shard=gpus_per_shard,
        cpus_per_shard=cpus_per_shard, ray_address=ray_address, placement=placement, placement_timeout=placement_timeout,
    )


def _check_num_shards(num_shards: int) -> None:
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")


def serve_local(
    num_shards: int = 1,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    trusted_modules: Sequence[str] = (),
    auth_token: str | None = None,
    tls: TLSConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES,
    metrics_port: int | None = None,
) -> Service:
    """Start the coordinator and ``num_shards`` shard servers in this process, without Ray."""
    _check_num_shards(num_shards)
    options = ServerOptions(auth_token=auth_token, tls=tls, max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes, metrics_port=metrics_port)
    if metrics_port is not None:
        from paramserver.metrics import start_metrics_server

        start_metrics_server(metrics_port, host)
    shard_hosts = [ShardHost(j) for j in range(num_shards)]
    servers, addresses = [], []
    try:
        for shard_host in shard_hosts:
            server, shard_port = create_shard_server(shard_host, f"{host}:0", options)
            servers.append(server)
            addresses.append(f"{host}:{shard_port}")
        coordinator = CoordinatorHost(LocalFleet(shard_hosts), addresses, trusted_modules, options.max_workers)
        server, front_port = create_coordinator_server(coordinator, f"{host}:{port}", options)
        servers.append(server)
    except BaseException:
        for server in servers:
            server.stop(None)
        raise
    return Service(coordinator, servers, f"{host}:{front_port}")
