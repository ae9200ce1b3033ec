"""The whole service in this process, without Ray: ``serve_local()``."""

from __future__ import annotations

from typing import Any

from paramserver.core.config import ServerConfig, split_options
from paramserver.service.checkpoints import ServiceCheckpoints
from paramserver.service.coordinator_host import CoordinatorHost, LocalFleet
from paramserver.service.server import Service, create_coordinator_server, create_shard_server, shard_port
from paramserver.service.shard_host import ShardHost


def serve_local(num_shards: int = 1, *, config: ServerConfig | None = None, **options: Any) -> Service:
    """Start the coordinator and ``num_shards`` shard servers in this process, without Ray.

    ``options`` are ``ServerConfig``'s fields (``host``, ``port``, ``auth_token``, ``tls``, ``grpc_threads``,
    ``chunk_bytes``, ...), or pass a whole ``config``.
    """
    (fields,) = split_options(options, ServerConfig)
    if config is not None and fields:
        raise TypeError("give the server's options either as a config or as keywords, not both")
    config = ServerConfig(num_shards=num_shards, **fields) if config is None else config
    host, port = config.host, config.port
    metrics = None
    if config.metrics_port is not None:
        from paramserver.service.metrics import start_metrics_server

        metrics = f"{host}:{start_metrics_server(config.metrics_port, host)}"
    shard_hosts = [ShardHost(j) for j in range(config.num_shards)]
    servers, addresses = [], []
    try:
        for shard_host in shard_hosts:
            server, bound = create_shard_server(shard_host, f"{host}:{shard_port(config, shard_host.shard_id)}", config)
            servers.append(server)
            addresses.append(f"{host}:{bound}")
        coordinator = CoordinatorHost(LocalFleet(shard_hosts), addresses, config.trusted_modules)
        if config.checkpoint_dir:
            ServiceCheckpoints(coordinator, config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep).restore_all()
        server, front_port = create_coordinator_server(coordinator, f"{host}:{port}", config)
        servers.append(server)
    except BaseException:
        for server in servers:
            server.stop(None)
        raise
    return Service(coordinator, servers, f"{host}:{front_port}", metrics)
