"""Hosting on Ray: the shards and the coordinator as actors, each serving gRPC on its own node.

The classes here are plain Python; Ray wraps them at spawn time (``ray.remote(...)(ShardProcess)``), so
they are importable and readable without a cluster. Ray is the control plane (creating jobs on the shards,
the coordinator's reduce/apply calls); gRPC is the data plane (workers' pushes and pulls).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from paramserver.core.coordinator import Coordinator
from paramserver.core.job import JobSpec
from paramserver.core.shards import ShardGroup
from paramserver.service.coordinator_host import CoordinatorHost
from paramserver.service.metrics import start_metrics_server
from paramserver.service.server import (
    ServerOptions,
    create_coordinator_server,
    create_shard_server,
)
from paramserver.service.shard_host import ShardHost
from paramserver.wire.jobconfig import build_job
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

# Every control-plane call has a deadline too.
CONTROL_TIMEOUT_S = 120.0


def _advertised(bind_host: str) -> str:
    """The address others reach this node's server at: the bind address, or the node's IP for 0.0.0.0."""
    if bind_host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return bind_host


class ShardProcess:
    """What runs inside shard actor j: a ``ShardHost`` and its gRPC server."""

    def __init__(self, shard_id: int, num_shards: int, bind_host: str, options: ServerOptions, trusted_modules: Sequence[str], device: str) -> None:
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.trusted_modules = tuple(trusted_modules)
        self.device = device
        import ray

        self.host = ShardHost(shard_id, placement=f"node {ray.get_runtime_context().get_node_id()[:12]} ({_advertised('0.0.0.0')})")
        self.server, port = create_shard_server(self.host, f"{bind_host}:0", options)
        self._address = f"{_advertised(bind_host)}:{port}"
        self.metrics_address = None
        if options.metrics_port is not None:
            self.metrics_address = f"{_advertised(bind_host)}:{start_metrics_server(0, bind_host)}"

    def address(self) -> str:
        return self._address

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "shard": self.shard_id, "node_id": ctx.get_node_id(), "address": self._address, "device": self.device,
            "pid": os.getpid(), "metrics": self.metrics_address,
        }

    def create_job(self, name: str, config: bytes) -> None:
        spec: JobSpec = build_job(pb.JobConfig.FromString(config), self.num_shards, self.trusted_modules)
        self.host.add_job(name, spec.make_shard(self.shard_id, self.device), coordinator=None)

    def connect(self, name: str, coordinator: Any) -> None:
        self.host.set_coordinator(name, RemoteCoordinator(coordinator, name))

    def call(self, name: str, method: str, *args: Any) -> Any:
        """A coordinator's call on this shard's part of job ``name`` (reduce, apply, status, ...)."""
        return getattr(self.host.shard(name), method)(*args)

    def delete_job(self, name: str) -> None:
        self.host.remove_job(name)

    def stop(self) -> None:
        self.server.stop(1.0).wait(5.0)


class RemoteCoordinator:
    """The shard host's handle on a job's coordinator when that coordinator is an actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name

    def shard_ready(self, shard: int, step: int) -> None:
        import ray

        ray.get(self.actor.shard_ready.remote(self.name, shard, step), timeout=CONTROL_TIMEOUT_S)


class RayShardGroup(ShardGroup):
    """A job's shards as actors: every call goes to all of them in parallel."""

    def __init__(self, actors: Sequence[Any], name: str) -> None:
        super().__init__([])
        self.actors = list(actors)
        self.name = name

    def _all(self, method: str, *args: Any) -> list[Any]:
        import ray

        return ray.get([a.call.remote(self.name, method, *args) for a in self.actors], timeout=CONTROL_TIMEOUT_S)

    def _each(self, method: str, args_per_shard: Sequence[tuple[Any, ...]]) -> list[Any]:
        import ray

        calls = [a.call.remote(self.name, method, *args) for a, args in zip(self.actors, args_per_shard, strict=True)]
        return ray.get(calls, timeout=CONTROL_TIMEOUT_S)


class RayFleet:
    """Shard actors: a job is created on each (each builds the same plan from the same config)."""

    def __init__(self, actors: Sequence[Any]) -> None:
        self.actors = list(actors)

    def __len__(self) -> int:
        return len(self.actors)

    def create_job(self, name: str, config: pb.JobConfig, spec: JobSpec) -> RayShardGroup:
        import ray

        ray.get([a.create_job.remote(name, config.SerializeToString()) for a in self.actors], timeout=CONTROL_TIMEOUT_S)
        return RayShardGroup(self.actors, name)

    def connect(self, name: str, group: ShardGroup, coordinator: Coordinator) -> None:
        import ray

        me = ray.get_runtime_context().current_actor
        ray.get([a.connect.remote(name, me) for a in self.actors], timeout=CONTROL_TIMEOUT_S)

    def delete_job(self, name: str) -> None:
        import ray

        ray.get([a.delete_job.remote(name) for a in self.actors], timeout=CONTROL_TIMEOUT_S)


class CoordinatorProcess:
    """What runs inside the coordinator actor: every job's coordinator and the front-door gRPC server."""

    def __init__(self, shard_actors: Sequence[Any], bind_host: str, port: int, options: ServerOptions, trusted_modules: Sequence[str]) -> None:
        import ray

        addresses = ray.get([a.address.remote() for a in shard_actors], timeout=CONTROL_TIMEOUT_S)
        self.host = CoordinatorHost(RayFleet(shard_actors), addresses, trusted_modules, options.max_workers)
        self.server, bound = create_coordinator_server(self.host, f"{bind_host}:{port}", options)
        self._address = f"{_advertised(bind_host)}:{bound}"
        if options.metrics_port is not None:
            start_metrics_server(options.metrics_port, bind_host)

    def address(self) -> str:
        return self._address

    def shard_ready(self, name: str, shard: int, step: int) -> None:
        self.host.job(name).coordinator.shard_ready(shard, step)

    def stop_requested(self) -> bool:
        return self.host.stop_requested.is_set()

    def stop(self) -> None:
        self.server.stop(1.0).wait(5.0)
