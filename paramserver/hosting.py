"""Hosting on Ray: the shards and the coordinator as actors, each serving gRPC on its own node.

The classes here are plain Python; Ray wraps them at spawn time (``ray.remote(...)(ShardProcess)``), so
they are importable and readable without a cluster. Ray is the control plane (creating jobs on the shards,
the coordinator's reduce/apply calls); gRPC is the data plane (workers' pushes and pulls).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from paramserver.engine import Coordinator, JobSpec, ShardGroup
from paramserver.hosts import CoordinatorHost, ShardHost
from paramserver.jobconfig import build_job
from paramserver.metrics import start_metrics_server
from paramserver.proto.v1 import paramserver_pb2 as pb
from paramserver.server import ServerOptions, create_coordinator_server, create_shard_server

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


class RayService:
    """The service on Ray: ``address`` is the coordinator's front door; ``shutdown()`` ends all of it."""

    def __init__(self, coordinator: Any, shards: list[Any], placement_group: Any, started_ray: bool, address: str) -> None:
        self.coordinator_actor = coordinator
        self.shard_actors = shards
        self.placement_group = placement_group
        self.started_ray = started_ray
        self.address = address

    def placements(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([a.placement.remote() for a in self.shard_actors], timeout=CONTROL_TIMEOUT_S)

    def stop_requested(self) -> bool:
        import ray

        return ray.get(self.coordinator_actor.stop_requested.remote(), timeout=CONTROL_TIMEOUT_S)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        actors = [self.coordinator_actor, *self.shard_actors]
        try:
            ray.get([a.stop.remote() for a in actors], timeout=30)
        finally:
            for a in actors:
                ray.kill(a)
            remove_placement_group(self.placement_group)
            if self.started_ray:
                ray.shutdown()

    def __enter__(self) -> RayService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def start_on_ray(
    num_shards: int,
    *,
    host: str,
    port: int,
    trusted_modules: Sequence[str],
    options: ServerOptions,
    gpus_per_shard: float = 0.0,
    cpus_per_shard: float = 0.5,
    ray_address: str | None = None,
    placement: str = "SPREAD",
    placement_timeout: float = 60.0,
) -> RayService:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

    if placement not in ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK"):
        raise ValueError(f"placement must be SPREAD, STRICT_SPREAD, PACK or STRICT_PACK, got {placement!r}")
    if gpus_per_shard < 0 or cpus_per_shard < 0:
        raise ValueError("gpus_per_shard and cpus_per_shard must be >= 0")
    started_ray = False
    if not ray.is_initialized():
        if ray_address is None:
            # An embedded local Ray: keep every Ray process on loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # "local" starts a new Ray even when another one runs on this machine (None would join that one)
        ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=False)
        started_ray = True

    bundle = {"CPU": cpus_per_shard, **({"GPU": gpus_per_shard} if gpus_per_shard else {})}
    pg = placement_group([dict(bundle) for _ in range(num_shards)], strategy=placement)
    try:
        ray.get(pg.ready(), timeout=placement_timeout)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
        raise TimeoutError(
            f"cannot place {num_shards} shards of {bundle} with strategy {placement} within {placement_timeout:.0f}s; "
            f"the cluster has {ray.cluster_resources() if ray.is_initialized() else 'no resources'}"
        ) from None

    device = "cuda" if gpus_per_shard else "cpu"
    shard_cls = ray.remote(ShardProcess)
    shards = [
        shard_cls.options(
            num_cpus=cpus_per_shard,
            num_gpus=gpus_per_shard,
            max_concurrency=32,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=j),
        ).remote(j, num_shards, host, options, trusted_modules, device)
        for j in range(num_shards)
    ]
    # The front door lives on this (the driver's) node, where users and `ray up` expect it.
    coordinator = ray.remote(CoordinatorProcess).options(
        num_cpus=0,
        max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(shards, host, port, options, trusted_modules)
    deadline = time.monotonic() + placement_timeout
    address = ray.get(coordinator.address.remote(), timeout=max(1.0, deadline - time.monotonic()))
    return RayService(coordinator, shards, pg, started_ray, address)
