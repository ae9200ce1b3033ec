"""The whole service in this process, without Ray: ``serve_local()``."""

from __future__ import annotations

from collections.abc import Sequence

from paramserver.service.coordinator_host import CoordinatorHost, LocalFleet
from paramserver.service.server import (
    ServerOptions,
    Service,
    TLSConfig,
    _check_num_shards,
    create_coordinator_server,
    create_shard_server,
)
from paramserver.service.shard_host import ShardHost
from paramserver.wire import codec
from paramserver.wire.protocol import DEFAULT_MAX_MESSAGE_BYTES


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
        from paramserver.service.metrics import start_metrics_server

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
