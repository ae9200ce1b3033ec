"""Start the service: gRPC servers for the coordinator and the shards, and ``serve()`` that runs them all.

``create_*_server(host, address, config) -> (server, port)`` follow gRPC's examples: bind ``host:0`` in tests
and read the port back. Every server also answers gRPC health checks and reflection. ``config`` is the
service's ``ServerConfig`` (auth token, TLS, message and chunk sizes, the front door's threads).

Every server is a ``grpc.aio`` server on its own event loop (``AioServer``): a call that waits holds no thread.
A shard's pull waits for its step on the loop, its CPU work runs on ``SHARD_COMPUTE_THREADS`` threads; the
coordinator's JoinJob waits on the loop for rank 0's job and initial weights, its blocking work (creating a
job, state, status) runs on ``ServerConfig.grpc_threads`` threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramserver.core.config import ServerConfig, TLSConfig
from paramserver.core.malloc import fix_mmap_threshold
from paramserver.service.aio_server import AioServer
from paramserver.service.auth import AsyncBearerTokenInterceptor
from paramserver.service.coordinator_host import CoordinatorHost
from paramserver.service.coordinator_servicer import CoordinatorServicer
from paramserver.service.shard_host import ShardHost
from paramserver.service.shard_servicer import ShardServicer, shard_handler
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire.protocol import COORDINATOR_SERVICE, SHARD_SERVICE

__all__ = ["SHARD_COMPUTE_THREADS", "Service", "TLSConfig", "create_coordinator_server", "create_shard_server", "grpc_options"]

# Threads of a shard server for CPU work only (folding pushes, the update); never for waiting.
SHARD_COMPUTE_THREADS = 4


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


def _start(address: str, config: ServerConfig, add: Callable[[grpc.aio.Server], None], service_names: Sequence[str], name: str) -> AioServer:
    """A ``grpc.aio`` server with ``add``'s services, health, reflection and the token check, built and run on
    its own event loop thread."""
    fix_mmap_threshold()

    async def build() -> tuple[grpc.aio.Server, int]:
        interceptors = [AsyncBearerTokenInterceptor(config.auth_token)] if config.auth_token else []
        server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
        add(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in [*service_names, ""]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port = _bind(server, address, config.tls)
        await server.start()
        return server, port

    return AioServer(build, name)


def create_shard_server(host: ShardHost, address: str, config: ServerConfig | None = None) -> tuple[AioServer, int]:
    """Shard ``host.shard_id``'s server (``config``: the service's, default ``ServerConfig()``). The returned
    server's ``stop(grace)`` returns an event to ``wait(timeout)`` on, as ``grpc.Server.stop`` does."""
    config = ServerConfig() if config is None else config
    compute = futures.ThreadPoolExecutor(SHARD_COMPUTE_THREADS, thread_name_prefix=f"shard{host.shard_id}-compute")
    servicer = ShardServicer(host, config.chunk_bytes, compute)
    try:
        server = _start(address, config, lambda s: s.add_generic_rpc_handlers((shard_handler(servicer),)), [SHARD_SERVICE],
                        f"shard{host.shard_id}-grpc")
    except BaseException:
        compute.shutdown(wait=False)
        raise
    server.on_stop(lambda: host.close_watches(server.loop))
    server.on_stop(host.close)  # its workers' shared memory goes with it
    server.on_stop(lambda: compute.shutdown(wait=False))
    return server, server.port


def create_coordinator_server(host: CoordinatorHost, address: str, config: ServerConfig | None = None) -> tuple[AioServer, int]:
    """The front door. A JoinJob that waits for rank 0 holds no thread; ``config.grpc_threads`` threads do the
    blocking work (creating jobs, state, status). ``stop(grace)`` as for a shard server."""
    config = ServerConfig() if config is None else config
    work = futures.ThreadPoolExecutor(config.grpc_threads, thread_name_prefix="coordinator-work")
    servicer = CoordinatorServicer(host, config.chunk_bytes, work)
    try:
        server = _start(address, config, lambda s: pb_grpc.add_CoordinatorServicer_to_server(servicer, s), [COORDINATOR_SERVICE],
                        "coordinator-grpc")
    except BaseException:
        work.shutdown(wait=False)
        raise
    server.on_stop(lambda: host.close_watches(server.loop))
    server.on_stop(lambda: work.shutdown(wait=False))
    return server, server.port


class Service:
    """A running service: ``address`` is the coordinator's front door; ``shutdown()`` stops every server."""

    def __init__(self, coordinator: CoordinatorHost, servers: list[AioServer], address: str, metrics: str | None = None) -> None:
        self.coordinator = coordinator
        self._servers = servers
        self.address = address
        self.metrics = metrics

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
