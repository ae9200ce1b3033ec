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

from paramserver.core.malloc import fix_mmap_threshold
from paramserver.service.auth import BearerTokenInterceptor
from paramserver.service.coordinator_host import CoordinatorHost
from paramserver.service.coordinator_servicer import CoordinatorServicer
from paramserver.service.shard_host import ShardHost
from paramserver.service.shard_servicer import ShardServicer, shard_handler
from paramserver.wire import codec
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire.protocol import (
    COORDINATOR_SERVICE,
    DEFAULT_MAX_MESSAGE_BYTES,
    SHARD_SERVICE,
)

if TYPE_CHECKING:
    pass

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
    return _start(address, options, lambda s: pb_grpc.add_CoordinatorServicer_to_server(servicer, s), [COORDINATOR_SERVICE])


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


def _check_num_shards(num_shards: int) -> None:
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise ValueError(f"num_shards must be an integer >= 1, got {num_shards!r}")
