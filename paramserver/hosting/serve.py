"""``serve()``: the service on Ray, its shard actors spread by a placement group and the coordinator actor
as the front door."""

from __future__ import annotations

import os
import time
from typing import Any

from paramserver.core.config import RayConfig, ServerConfig, split_options
from paramserver.hosting.actors import (
    CONTROL_TIMEOUT_S,
    SHARD_MAX_RESTARTS,
    CoordinatorProcess,
    ShardProcess,
)


class RayService:
    """The service on Ray: ``address`` is the coordinator's front door; ``shutdown()`` ends all of it."""

    def __init__(self, coordinator: Any, shards: list[Any], placement_group: Any, started_ray: bool, address: str) -> None:
        self.coordinator_actor = coordinator
        self.shard_actors = shards
        self.placement_group = placement_group
        self.started_ray = started_ray
        self.address = address

    def placements(self) -> list[dict[str, Any]]:
        """Every process of the service, the coordinator first, then shard 0, 1, ...: each a dict with ``role``
        ("coordinator" or "primary"), ``shard`` (None for the coordinator), ``pid``, ``node_id`` (the Ray node),
        ``address`` (its gRPC server: the front door for the coordinator), ``device`` and ``metrics`` (the
        address of its metrics endpoint, or None)."""
        import ray

        actors = [self.coordinator_actor, *self.shard_actors]
        return ray.get([a.placement.remote() for a in actors], timeout=CONTROL_TIMEOUT_S)

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
            max_restarts=SHARD_MAX_RESTARTS,  # a shard that dies comes back empty; the coordinator rolls back
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=j),
        ).remote(j, config, device)
        for j in range(num_shards)
    ]
    # The front door lives on this (the driver's) node, where users and `ray up` expect it.
    coordinator = ray.remote(CoordinatorProcess).options(
        num_cpus=0,
        max_concurrency=64,
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False),
    ).remote(shards, config)
    deadline = time.monotonic() + placement_timeout
    address = ray.get(coordinator.address.remote(), timeout=max(1.0, deadline - time.monotonic()))
    return RayService(coordinator, shards, pg, started_ray, address)
