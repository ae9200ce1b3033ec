"""Start the service: gRPC servers for the coordinator and the shards, and ``serve()`` that runs them all.

``create_*_server(address, ...) -> (server, port)`` follow gRPC's examples: bind ``host:0`` in tests and
read the port back. Every server also answers gRPC health checks and reflection.

A shard server is a ``grpc.aio`` server on its own event loop (``AioServer``): a pull waiting for its step
holds no thread, so one shard serves any number of workers; its CPU work runs on ``SHARD_COMPUTE_THREADS``
threads. The coordinator's server is a thread-pool server of ``ServerOptions.max_workers`` threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramserver.core.malloc import fix_mmap_threshold
from paramserver.service.aio_server import AioServer
from paramserver.service.auth import AsyncBearerTokenInterceptor, BearerTokenInterceptor
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
    # gRPC threads of the coordinator's server (shard servers are asyncio servers: a waiting pull holds no
    # thread there).
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


# Threads of a shard server for CPU work only (folding pushes, the update); never for waiting.
SHARD_COMPUTE_THREADS = 4

# Either kind of server: both have ``stop(grace) -> threading.Event``.
AnyServer = grpc.Server | AioServer


def _bind(server: grpc.Server | grpc.aio.Server, address: str, options: ServerOptions) -> int:
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
    return port


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
    port = _bind(server, address, options)
    server.start()
    return server, port


def _start_aio(address: str, options: ServerOptions, add: Callable[[grpc.aio.Server], None], service_names: Sequence[str],
               name: str) -> AioServer:
    """``_start`` for a ``grpc.aio`` server, built and run on its own event loop thread."""
    fix_mmap_threshold()

    async def build() -> tuple[grpc.aio.Server, int]:
        interceptors = [AsyncBearerTokenInterceptor(options.auth_token)] if options.auth_token else []
        server = grpc.aio.server(interceptors=interceptors, options=options.grpc_options())
        add(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in [*service_names, ""]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = _bind(server, address, options)
        await server.start()
        return server, port

    return AioServer(build, name)


def create_shard_server(host: ShardHost, address: str, options: ServerOptions = ServerOptions()) -> tuple[AioServer, int]:
    """Shard ``host.shard_id``'s server (asyncio). The returned server's ``stop(grace)`` returns an event to
    ``wait(timeout)`` on, as ``grpc.Server.stop`` does."""
    compute = futures.ThreadPoolExecutor(SHARD_COMPUTE_THREADS, thread_name_prefix=f"shard{host.shard_id}-compute")
    servicer = ShardServicer(host, options.chunk_bytes, compute)
    try:
        server = _start_aio(address, options, lambda s: s.add_generic_rpc_handlers((shard_handler(servicer),)), [SHARD_SERVICE],
                            f"shard{host.shard_id}-grpc")
    except BaseException:
        compute.shutdown(wait=False)
        raise
    server.on_stop(lambda: host.close_watches(server.loop))
    server.on_stop(lambda: compute.shutdown(wait=False))
    return server, server.port


def create_coordinator_server(host: CoordinatorHost, address: str, options: ServerOptions = ServerOptions()) -> tuple[grpc.Server, int]:
    servicer = CoordinatorServicer(host, options.chunk_bytes)
    return _start(address, options, lambda s: pb_grpc.add_CoordinatorServicer_to_server(servicer, s), [COORDINATOR_SERVICE])


class Service:
    """A running service: ``address`` is the coordinator's front door; ``shutdown()`` stops every server."""

    def __init__(self, coordinator: CoordinatorHost, servers: list[AnyServer], address: str) -> None:
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
