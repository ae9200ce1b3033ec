"""``serve()``: the service on Ray, its shard actors spread by a placement group and the coordinator actor
as the front door."""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from typing import Any

from paramserver.core.config import RayConfig, ServerConfig, split_options
from paramserver.hosting.actors import MAX_RESTARTS, CoordinatorProcess, ShardProcess
from paramserver.hosting.lane import new_key
from paramserver.hosting.replicas import CONTROL_TIMEOUT_S
from paramserver.service.ports import free_port_base


class RayService:
    """The service on Ray: ``address`` is the coordinator's front door; ``shutdown()`` ends all of it."""

    def __init__(self, coordinator: Any, shards: list[Any], placement_groups: list[Any], started_ray: bool, address: str,
                 service_id: str = "") -> None:
        # this service instance's id (GetServiceInfo reports it, Stop must name it); a restarted coordinator keeps it
        self.service_id = service_id
        self.coordinator_actor = coordinator
        self.shard_actors = shards
        self.placement_groups = placement_groups
        self.started_ray = started_ray
        self.address = address

    def placements(self) -> list[dict[str, Any]]:
        """Every process of the service, the coordinator first, then each shard's processes: each a dict with
        ``role`` ("coordinator", "primary" or "standby": the roles are current, a standby that took over is the
        primary), ``shard`` (None for the coordinator), ``pid``, ``node_id`` (the Ray node), ``address`` (its gRPC
        server: the front door for the coordinator), ``device``, ``metrics`` (its metrics endpoint or None) and,
        for a shard process, ``jobs``: the jobs a primary holds, and those of which a standby holds a copy that
        the coordinator counts as current (it can take over with no step lost). A process that Ray is restarting
        (the coordinator included) is left out until it answers."""
        import ray

        actors = [self.coordinator_actor, *self.shard_actors]
        refs = [a.placement.remote() for a in actors]
        current_ref = self.coordinator_actor.current_copies.remote()
        ready, _ = ray.wait([*refs, current_ref], num_returns=len(refs) + 1, timeout=CONTROL_TIMEOUT_S)
        try:
            current = {tuple(pair) for pair in ray.get(current_ref)} if current_ref in ready else set()
        except ray.exceptions.RayActorError:
            current = set()
        found = []
        for ref in refs:
            if ref in ready:
                try:
                    found.append(ray.get(ref))
                except ray.exceptions.RayActorError:
                    continue
        for p in found:
            if p["role"] == "standby":
                p["jobs"] = [name for name in p["jobs"] if (p["shard"], name) in current]
        order = {"coordinator": 0, "primary": 1, "standby": 2}
        return sorted(found, key=lambda p: (-1 if p["shard"] is None else p["shard"], order[p["role"]]))

    def stop_requested(self) -> bool:
        import ray

        return ray.get(self.coordinator_actor.stop_requested.remote(), timeout=CONTROL_TIMEOUT_S)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        actors = [self.coordinator_actor, *self.shard_actors]
        try:
            # each server stops gracefully where it can; a process that is dead or restarting is killed below
            ray.wait([a.stop.remote() for a in actors], num_returns=len(actors), timeout=30)
        finally:
            for a in actors:
                ray.kill(a)
            for pg in self.placement_groups:
                remove_placement_group(pg)
            if self.started_ray:
                ray.shutdown()

    def __enter__(self) -> RayService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def serve(num_shards: int = 1, *, config: ServerConfig | None = None, ray_config: RayConfig | None = None, **options: Any) -> RayService:
    """Start the service on Ray: ``num_shards`` shard actors (``gpus_per_shard`` GPUs each, spread by a
    placement group) and the coordinator actor, whose gRPC front door is ``.address``.

    ``options`` are the fields of ``ServerConfig`` (``host``, ``port``, ``auth_token``, ``tls``, ``grpc_threads``,
    ...) and of ``RayConfig`` (``gpus_per_shard``, ``cpus_per_shard``, ``ray_address``, ``placement``,
    ``placement_timeout``), or pass whole configs. With ``ray_address=None`` it uses the Ray this process is
    connected to, else starts an embedded local Ray; ``"auto"`` or an address joins that cluster.
    """
    server_fields, ray_fields = split_options(options, ServerConfig, RayConfig)
    if (config is not None and server_fields) or (ray_config is not None and ray_fields):
        raise TypeError("give the options either as configs or as keywords, not both")
    config = ServerConfig(num_shards=num_shards, **server_fields) if config is None else config
    ray_config = RayConfig(**ray_fields) if ray_config is None else ray_config
    num_shards = config.num_shards
    placement, placement_timeout = ray_config.placement, ray_config.placement_timeout
    gpus_per_shard, cpus_per_shard, ray_address = ray_config.gpus_per_shard, ray_config.cpus_per_shard, ray_config.ray_address
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    started_ray = False
    if not ray.is_initialized():
        if ray_address is None:
            # An embedded local Ray: keep every Ray process on loopback.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # "local" starts a new Ray even when another one runs on this machine (None would join that one)
        ray.init(address=ray_address or "local", include_dashboard=False, log_to_driver=False)
        started_ray = True

    bundle = {"CPU": cpus_per_shard, **({"GPU": gpus_per_shard} if gpus_per_shard else {})}
    replicas = ray_config.replicas
    if replicas:
        # each shard's primary and standby in a group of their own: on two nodes wherever the cluster has two
        apart = "STRICT_SPREAD" if len([n for n in ray.nodes() if n["Alive"]]) > 1 else "PACK"
        groups = [placement_group([dict(bundle), dict(bundle)], strategy=apart) for _ in range(num_shards)]
    else:
        groups = [placement_group([dict(bundle) for _ in range(num_shards)], strategy=placement)]
    try:
        ray.get([pg.ready() for pg in groups], timeout=placement_timeout)
    except ray.exceptions.GetTimeoutError:
        for pg in groups:
            remove_placement_group(pg)
        if started_ray:
            ray.shutdown()
        raise TimeoutError(
            f"cannot place {num_shards} shards (x{1 + replicas} with standbys) of {bundle} with strategy "
            f"{apart if replicas else placement} within {placement_timeout:.0f}s; the cluster has "
            f"{ray.cluster_resources() if ray.is_initialized() else 'no resources'}"
        ) from None

    device = "cuda" if gpus_per_shard else "cpu"
    # the key of the service's control lanes (hosting/lane.py); Ray restarts an actor with the same arguments
    lane_key = new_key() if ray_config.control_lane else None
    shard_cls = ray.remote(ShardProcess)

    def spawn(j: int, pg: Any, bundle_index: int, role: str) -> Any:
        return shard_cls.options(
            num_cpus=cpus_per_shard,
            num_gpus=gpus_per_shard,
            max_concurrency=32,
            max_restarts=MAX_RESTARTS,  # a shard that dies comes back empty: its standby took over, or the jobs roll back
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index),
        ).remote(j, config, device, role, bool(replicas), lane_key=lane_key, standby_timeout=ray_config.standby_timeout)

    if replicas:
        shards = [spawn(j, pg, 0, "primary") for j, pg in enumerate(groups)]
        standbys = [spawn(j, pg, 1, "standby") for j, pg in enumerate(groups)]
    else:
        shards = [spawn(j, groups[0], j, "primary") for j in range(num_shards)]
        standbys = []
    if config.port == 0:
        # a coordinator that Ray restarts serves on the same address: fix the port now
        config = dataclasses.replace(config, port=free_port_base(config.host))
    service_id = uuid.uuid4().hex  # this start of the service; the coordinator actor keeps it across its restarts
    # The front door lives on this (the driver's) node, where users and `ray up` expect it.
    coordinator = ray.remote(CoordinatorProcess).options(
        num_cpus=0,
        max_concurrency=64,
        max_restarts=MAX_RESTARTS,  # it comes back on the same address and takes the jobs over from the shards
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(shards, standbys or None, config, service_id, lane_key=lane_key, standby_timeout=ray_config.standby_timeout)
    deadline = time.monotonic() + placement_timeout
    address = ray.get(coordinator.address.remote(), timeout=max(1.0, deadline - time.monotonic()))
    return RayService(coordinator, [*shards, *standbys], groups, started_ray, address, service_id)
