"""``serve()``: the service on Ray, its shard actors spread by a placement group and the coordinator actor
as the front door."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from paramserver.hosting.actors import (
    CONTROL_TIMEOUT_S,
    CoordinatorProcess,
    ShardProcess,
)
from paramserver.service.server import ServerOptions, TLSConfig, _check_num_shards
from paramserver.wire import codec
from paramserver.wire.protocol import DEFAULT_MAX_MESSAGE_BYTES


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
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

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
) -> RayService:
    """Start the service on Ray: ``num_shards`` shard actors (``gpus_per_shard`` GPUs each, spread by a
    placement group) and the coordinator actor, whose gRPC front door is ``.address``.

    With ``ray_address=None`` it uses the Ray this process is connected to, else starts an embedded local
    Ray; ``"auto"`` or an address joins that cluster.
    """
    _check_num_shards(num_shards)
    options = ServerOptions(auth_token=auth_token, tls=tls, max_message_bytes=max_message_bytes, chunk_bytes=chunk_bytes, metrics_port=metrics_port)
    return start_on_ray(
        num_shards, host=host, port=port, trusted_modules=trusted_modules, options=options, gpus_per_shard=gpus_per_shard,
        cpus_per_shard=cpus_per_shard, ray_address=ray_address, placement=placement, placement_timeout=placement_timeout,
    )
