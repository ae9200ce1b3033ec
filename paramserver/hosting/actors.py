"""Hosting on Ray: the shards and the coordinator as actors, each serving gRPC on its own node.

The classes here are plain Python; Ray wraps them at spawn time (``ray.remote(...)(ShardProcess)``), so
they are importable and readable without a cluster. Ray is the control plane (creating jobs on the shards,
the coordinator's reduce/apply calls; on one node the step's report and update calls take the faster control lane of
``lane.py``); gRPC is the data plane (workers' pushes and pulls).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import uuid
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from paramserver.checkpoint.writer import write_snapshot
from paramserver.core.config import ServerConfig
from paramserver.core.errors import StaleStepError
from paramserver.core.job import JobSpec
from paramserver.core.malloc import release_free_memory
from paramserver.core.shard import Shard, SnapshotWrite
from paramserver.dataplane import segments
from paramserver.hosting.lane import LaneAddress, LaneBook, LaneBrokenError, LaneServer, ray_lane_book
from paramserver.hosting.replicas import CONTROL_TIMEOUT_S, RayFleet
from paramserver.hosting.scalars import pack_scalars, unpack_scalars
from paramserver.service.checkpoints import ServiceCheckpoints
from paramserver.service.coordinator_host import RECOVER_TIMEOUT_S, CoordinatorHost
from paramserver.service.metrics import start_metrics_server
from paramserver.service.server import create_coordinator_server, create_shard_server, shard_port
from paramserver.service.shard_host import ShardHost
from paramserver.wire.jobconfig import build_job
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

# How often the coordinator actor checks that its shard actors are the processes the jobs' state is on (a
# primary that died is replaced by its standby, or, with none, comes back empty and the jobs roll back).
WATCH_S = 0.5
MAX_RESTARTS = -1  # Ray restarts a dead shard or coordinator actor (in its placement) whenever it dies

log = logging.getLogger("paramserver")


def _advertised(bind_host: str) -> str:
    """The address others reach this node's server at: the bind address, or the node's IP for 0.0.0.0."""
    if bind_host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return bind_host


class ShardProcess:
    """What runs inside a shard actor: a ``ShardHost`` for shard ``shard_id`` of every job and its gRPC server,
    bound to ``config.host``. Its role is "primary" (it serves the workers; with a standby it hands each
    step's mean to it) or "standby" (it applies the same updates and takes over when the primary dies)."""

    def __init__(
        self, shard_id: int, config: ServerConfig, device: str, role: str = "primary", replicated: bool = False,
        lane_key: bytes | None = None, standby_timeout: float = CONTROL_TIMEOUT_S,
    ) -> None:
        self.shard_id = shard_id
        # this process's incarnation: a shard actor that Ray restarted (its process died) has a new one
        self.incarnation = uuid.uuid4().hex
        self.num_shards = config.num_shards
        self.trusted_modules = config.trusted_modules
        self.device = device
        # with standbys, a restarted process comes back as one (empty: the coordinator rebuilds it from the primary)
        self.role = "standby" if replicated and not _first_start() else role
        self.standby: Any = None  # the primary's standby actor, which gets each step's mean
        self.standby_timeout = standby_timeout  # how long a hand-off to it may take (RayConfig.standby_timeout)
        # jobs whose standby did not take a mean: it gets no more until the coordinator rebuilds it (set_role)
        self._standby_left_out: set[str] = set()
        self.configs: dict[str, bytes] = {}  # each job's config: a coordinator that restarts reads them
        # checkpoint files this process writes, one after another: (job, path) -> the write, until reported
        self._snapshot_writer = ThreadPoolExecutor(1, thread_name_prefix="paramserver-shard-checkpoint")
        # Every update on one thread: Ray runs each call on any of the actor's threads, and each thread's glibc
        # arena kept the optimizer's freed temporaries of its own (on the benchmark's shard: about 20 MB more).
        self._updates = ThreadPoolExecutor(1, thread_name_prefix="paramserver-shard-update")
        self._snapshot_writes: dict[tuple[str, str], Future[dict[str, Any]]] = {}
        import ray

        bind_host = config.host
        segments.sweep()  # shared memory of shard processes killed before they could let go of it
        # torch loads torch._dynamo (and sympy) when the first optimizer is built: now, so that the first job does
        # not wait for it and the idle process's memory is what it runs with
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        self.host = ShardHost(shard_id, placement=f"node {ray.get_runtime_context().get_node_id()[:12]} ({_advertised('0.0.0.0')})")
        self.host.on_initial_weights = self._took_initial_weights
        self.host.on_reduced_ahead = self._hand_mean_to_standby
        # a fixed port by the role this actor started in: the same after Ray restarts it, whatever its role then
        self.server, port = create_shard_server(self.host, f"{bind_host}:{shard_port(config, shard_id, role == 'standby')}", config)
        self._address = f"{_advertised(bind_host)}:{port}"
        self.metrics_address = None
        if config.metrics_port is not None:
            self.metrics_address = f"{_advertised(bind_host)}:{start_metrics_server(0, bind_host)}"
        # the coordinator's update calls come in on this process's control lane; its reports go out on the coordinator's
        node_id = ray.get_runtime_context().get_node_id()
        self.lane = LaneServer(self, ("apply",), lane_key, node_id) if lane_key else None
        self.lanes = ray_lane_book(lane_key)

    def lane_address(self) -> LaneAddress | None:
        return None if self.lane is None else self.lane.address

    def address(self) -> str:
        return self._address

    def identity(self) -> tuple[str, str]:
        """(incarnation, address): the coordinator's health check (a restarted shard has new ones)."""
        return self.incarnation, self._address

    def _took_initial_weights(self, name: str, buffers: Sequence[torch.Tensor]) -> None:
        self._hand_initial_weights(name, buffers)
        release_free_memory()  # the chunks they came in, freed into the receiving threads' arenas

    def _hand_initial_weights(self, name: str, buffers: Sequence[torch.Tensor]) -> None:
        # before rank 0's call returns: the standby holds the same weights before any step closes
        if self.standby is None:
            return
        import ray

        try:
            ray.get(self.standby.load_weights.remote(name, list(buffers)), timeout=CONTROL_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - its first update then fails, and the coordinator rebuilds it
            log.warning("shard %d: the standby did not take job %s's initial weights: %s: %s", self.shard_id, name, type(exc).__name__, exc)

    def describe(self) -> dict[str, Any]:
        """What a coordinator that restarts needs: role, incarnation, address, and the jobs' configs."""
        return {"role": self.role, "incarnation": self.incarnation, "address": self._address, "jobs": dict(self.configs)}

    def set_role(self, role: str, standby: Any) -> None:
        self.role = role
        self.standby = standby
        self._standby_left_out.clear()

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "role": self.role, "shard": self.shard_id, "pid": os.getpid(), "node_id": ctx.get_node_id(),
            "address": self._address, "device": self.device, "metrics": self.metrics_address, "jobs": sorted(self.configs),
            "lane_calls": None if self.lane is None else self.lane.served,
        }

    def create_job(self, name: str, config: bytes) -> None:
        spec: JobSpec = build_job(pb.JobConfig.FromString(config), self.num_shards, self.trusted_modules)
        self.host.add_job(name, spec.make_shard(self.shard_id, self.device), coordinator=None)
        self.configs[name] = config

    def connect(self, name: str, coordinator: Any) -> None:
        self.host.set_coordinator(name, RemoteCoordinator(coordinator, name, self.lanes))

    def recreate_job(self, name: str, config: bytes, coordinator: Any) -> None:
        """Job ``name`` anew (empty, uninitialized) on this process, connected: a rollback fills it."""
        self.host.remove_job(name)
        self.create_job(name, config)
        self.connect(name, coordinator)

    def adopt_job(self, name: str, config: bytes, coordinator: Any, replica: dict[str, Any]) -> None:
        """Job ``name`` anew on this process (a standby), as a copy of the primary whose ``replica_state`` this is."""
        self.recreate_job(name, config, coordinator)
        self._shard(name).adopt(replica)

    def initialized(self, name: str) -> bool:
        return self._shard(name).initialized

    def replica_state(self, name: str) -> dict[str, Any]:
        return self._shard(name).replica_state()

    # -- the coordinator's calls on this shard's part of job ``name`` (``ShardControl``, through ``ActorShard``)

    def _shard(self, name: str) -> Shard:
        return self.host.shard(name)

    def ready(self, name: str) -> bool:
        return self._shard(name).ready

    def set_members(self, name: str, members: Collection[int]) -> None:
        self._shard(name).set_members(members)

    def reduce(
        self, name: str, step: int, norm_type: float, clip_value: float | None, contributors: Collection[int] | None
    ) -> list[torch.Tensor | None]:
        norms = self._shard(name).reduce(step, norm_type, clip_value, contributors)
        self._hand_mean_to_standby(name, step)
        return pack_scalars(norms)  # plain numbers over Ray (paramserver.hosting.scalars)

    def _hand_mean_to_standby(self, name: str, step: int) -> None:
        # the standby applies this very mean (taken now or ahead): the same update, bit for bit
        standby = self.standby
        if standby is None or name in self._standby_left_out:
            return
        import ray

        try:
            ray.get(standby.hold_reduced.remote(name, step, *self._shard(name).reduced(step)), timeout=self.standby_timeout)
        except Exception as exc:  # noqa: BLE001 - its apply then fails too, and the coordinator rebuilds it
            # (a push waits for this hand-off: a standby that hangs must not hold every step)
            self._standby_left_out.add(name)
            log.warning(
                "shard %d: the standby did not take job %s's step %d mean (%s: %s); it gets none until it is rebuilt",
                self.shard_id, name, step, type(exc).__name__, exc,
            )

    def hand_open_mean(self, name: str) -> None:
        """The open step's mean, if taken already, to the standby: one just rebuilt from this primary's state
        (which has no pushes) missed it if it was taken before."""
        shard = self._shard(name)
        if shard.mean_taken:  # (a push that hands it meanwhile hands the same mean: the standby holds it once)
            self._hand_mean_to_standby(name, shard.version)

    def hold_reduced(self, name: str, step: int, means: list[torch.Tensor], with_grad: list[int], contributors: tuple[int, ...]) -> None:
        self._shard(name).hold_reduced(step, means, with_grad, contributors)

    def apply(
        self, name: str, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]], record: dict[str, Any] | None = None
    ) -> None:
        shard = self._shard(name)
        self._updates.submit(shard.apply, step, *unpack_scalars((clip_coef, hyperparameters, record))).result()
        if step == 0:
            release_free_memory()  # the first step's one-off allocations (the optimizer's state made piece by piece)

    def skip(self, name: str, step: int, record: dict[str, Any] | None = None) -> None:
        self._shard(name).skip(step, record)

    def keep_record(self, name: str, record: dict[str, Any] | None) -> None:
        self._shard(name).keep_record(record)

    def last_record(self, name: str) -> dict[str, Any] | None:
        return self._shard(name).last_record()

    def weight_copies(self, name: str) -> list[torch.Tensor]:
        return self._shard(name).weight_copies()

    def load_weights(self, name: str, buffers: Sequence[torch.Tensor]) -> None:
        self._shard(name).load_weights(buffers)

    def optimizer_state(self, name: str) -> list[dict[str, Any]]:
        return self._shard(name).optimizer_state()

    def load_optimizer_state(self, name: str, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        self._shard(name).load_optimizer_state(slice_states, param_groups)

    def save_snapshot(self, name: str, path: str) -> SnapshotWrite:
        """Copy this shard's piece of a checkpoint (all the coordinator's step waits for) and write it to ``path``
        on this process's checkpoint thread: the tensors never leave this process."""
        write = self._shard(name).save_snapshot(path)
        self._snapshot_writes[(name, path)] = self._snapshot_writer.submit(write_snapshot, write)
        return dataclasses.replace(write, piece=None, release=None)

    def snapshot_written(self, name: str, path: str, timeout: float) -> dict[str, Any]:
        """The manifest entry (CRC-32, size) of the file ``save_snapshot`` began, once written and fsynced."""
        future = self._snapshot_writes.pop((name, path), None)
        if future is None:
            raise LookupError(f"shard {self.shard_id}: no write of {path} under way in this process (it restarted, or took over since)")
        return future.result(timeout)

    def restore_version(self, name: str, version: int) -> None:
        self._shard(name).restore_version(version)

    def start_generation(self, name: str, step: int, generation: int | None = None) -> None:
        self._shard(name).start_generation(step, generation)

    def status(self, name: str) -> dict[str, Any]:
        return self._shard(name).status()

    def wait_for_version(self, name: str, min_version: int, timeout: float) -> int:
        return self._shard(name).wait_for_version(min_version, timeout)

    def delete_job(self, name: str) -> None:
        self.host.remove_job(name)
        self.configs.pop(name, None)

    def stop(self) -> None:
        if self.lane is not None:
            self.lane.close()
        self.lanes.close()
        self.server.stop(1.0).wait(5.0)


def _first_start() -> bool:
    """Whether this actor process is the first of its actor (not one Ray restarted after a death)."""
    import warnings

    import ray

    with warnings.catch_warnings():  # the property reads a deprecated one inside Ray
        warnings.simplefilter("ignore", DeprecationWarning)
        return not ray.get_runtime_context().was_current_actor_reconstructed


class RemoteCoordinator:
    """The shard host's handle on a job's coordinator when that coordinator is an actor."""

    def __init__(self, actor: Any, name: str, lanes: LaneBook | None = None) -> None:
        self.actor = actor
        self.name = name
        self.lanes = lanes  # the shard process's lanes: the report goes over the coordinator's where it has one

    def shard_ready(
        self, shard: int, step: int, generation: int | None = None, holds: frozenset[int] | None = None,
        reduced: tuple[tuple[int, ...], list[torch.Tensor | None]] | None = None,
    ) -> None:
        """Report to the coordinator. While it restarts the report is made again (until the control deadline):
        the push that completed the shard is in, and the worker gets no error for it. A coordinator that
        restarted closes the step itself if every push is in, so the report may find it closed."""
        import ray

        packed = pack_scalars(reduced)
        lane_call = None if self.lanes is None else self.lanes.start(self.actor, "shard_ready", self.name, shard, step, generation, holds, packed)
        if lane_call is not None:
            try:
                lane_call.result(CONTROL_TIMEOUT_S)
            except StaleStepError:
                pass  # a coordinator that restarted closed the step already
            except LaneBrokenError:  # as Ray's actor error: it died during the call; its next process closes the step
                log.warning("shard %d: step %d's report did not reach the coordinator (its control lane broke)", shard, step)
            return
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        while True:
            try:
                ray.get(
                    self.actor.shard_ready.remote(self.name, shard, step, generation, holds, packed),
                    timeout=max(0.1, deadline - time.monotonic()),
                )
                return
            except StaleStepError:
                return  # a coordinator that restarted closed the step already
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)  # restarting: its jobs come back from the shards' records
            except ray.exceptions.RayActorError as exc:
                log.warning("shard %d: step %d's report did not reach the coordinator (%s)", shard, step, type(exc).__name__)
                return


class CoordinatorProcess:
    """What runs inside the coordinator actor: every job's coordinator and the front-door gRPC server, on
    ``config.host:config.port``. Ray restarts it when it dies; the new process takes every job over from the
    shards (``CoordinatorHost.resume_job``), else from the checkpoints, and serves on the same address."""

    def __init__(
        self, primaries: Sequence[Any], standbys: Sequence[Any] | None, config: ServerConfig, service_id: str | None = None,
        lane_key: bytes | None = None, standby_timeout: float = CONTROL_TIMEOUT_S,
    ) -> None:
        import ray

        bind_host = config.host
        # the shards' reports come in on this process's control lane; its update calls go out on the shards'
        self.lane = LaneServer(self, ("shard_ready",), lane_key, ray.get_runtime_context().get_node_id()) if lane_key else None
        actors = [*primaries, *(standbys or [])]
        described = ray.get([a.describe.remote() for a in actors], timeout=CONTROL_TIMEOUT_S)
        by_actor = dict(zip(actors, described))
        if standbys:  # the roles are the processes' own: a standby may have taken over before a restart
            pairs = [(p, s) if by_actor[p]["role"] == "primary" or by_actor[s]["role"] != "primary" else (s, p) for p, s in zip(primaries, standbys)]
            primaries, standbys = [p for p, _ in pairs], [s for _, s in pairs]
        fleet = RayFleet(primaries, standbys, {a: d["incarnation"] for a, d in by_actor.items()}, ray_lane_book(lane_key), standby_timeout)
        fleet.assign_roles()
        # service_id: made once by serve(); Ray restarts this actor with the same arguments, so it keeps the id
        self.host = CoordinatorHost(fleet, [by_actor[p]["address"] for p in primaries], config.trusted_modules, service_id)
        checkpoints = None
        if config.checkpoint_dir:
            checkpoints = ServiceCheckpoints(self.host, config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep)
        for name, job_config in by_actor[primaries[0]]["jobs"].items():
            self.host.resume_job(name, pb.JobConfig.FromString(job_config))
        if checkpoints is not None:
            checkpoints.restore_all()  # the jobs the shards do not hold
        self.server, bound = create_coordinator_server(self.host, f"{bind_host}:{config.port}", config)
        self._address = f"{_advertised(bind_host)}:{bound}"
        self.metrics_address = None
        if config.metrics_port is not None:
            self.metrics_address = f"{_advertised(bind_host)}:{start_metrics_server(config.metrics_port, bind_host)}"
        # A primary that died is noticed within WATCH_S: its standby takes over, or the jobs roll back to their
        # newest checkpoint (workers that see a shard unavailable have it checked at once too).
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="paramserver-shard-watch", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            try:
                self.host.recover_shards(RECOVER_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                if not self._stopping.is_set():
                    log.error("checking the shard actors failed: %s: %s", type(exc).__name__, exc)

    def address(self) -> str:
        return self._address

    def lane_address(self) -> LaneAddress | None:
        return None if self.lane is None else self.lane.address

    def service_id(self) -> str:
        return self.host.service_id

    def placement(self) -> dict[str, Any]:
        """This process in ``RayService.placements()``: the coordinator (shard None), its front door's address."""
        import ray

        return {
            "role": "coordinator", "shard": None, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
            "address": self._address, "device": "cpu", "metrics": self.metrics_address,
            "lane_calls": None if self.lane is None else self.lane.served,
        }

    def current_copies(self) -> list[tuple[int, str]]:
        """(shard, job) whose standby holds a current copy of the job: it can take over with no step lost."""
        return sorted(self.host.fleet.in_sync)

    def shard_ready(
        self, name: str, shard: int, step: int, generation: int | None = None, holds: frozenset[int] | None = None,
        reduced: tuple[tuple[int, ...], list[torch.Tensor | None]] | None = None,
    ) -> None:
        self.host.job(name).coordinator.shard_ready(shard, step, generation, holds, unpack_scalars(reduced))

    def stop_requested(self) -> bool:
        return self.host.stop_requested.is_set()

    def stop(self) -> None:
        self._stopping.set()
        if self.lane is not None:
            self.lane.close()
        self.host.fleet.close()
        self.server.stop(1.0).wait(5.0)
        if self.host.checkpoints is not None:
            self.host.checkpoints.close()
