"""Hosting on Ray: the shards and the coordinator as actors, each serving gRPC on its own node.

The classes here are plain Python; Ray wraps them at spawn time (``ray.remote(...)(ShardProcess)``), so
they are importable and readable without a cluster. Ray is the control plane (creating jobs on the shards,
the coordinator's reduce/apply calls); gRPC is the data plane (workers' pushes and pulls).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar

import torch

from paramserver.core.config import ServerConfig
from paramserver.core.coordinator import Coordinator
from paramserver.core.job import JobSpec
from paramserver.core.shard import Shard
from paramserver.core.shards import ShardControl, ShardGroup
from paramserver.service.checkpoints import ServiceCheckpoints
from paramserver.service.coordinator_host import RECOVER_TIMEOUT_S, CoordinatorHost
from paramserver.service.metrics import start_metrics_server
from paramserver.service.server import create_coordinator_server, create_shard_server
from paramserver.service.shard_host import ShardHost
from paramserver.wire.jobconfig import build_job
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

# Every control-plane call has a deadline too.
CONTROL_TIMEOUT_S = 120.0
# A join waiting for the shard actors' initial weights asks them again every this many seconds (a shard
# actor's thread waits meanwhile: one per shard and job, however many workers wait).
INIT_POLL_S = 5.0
# How often the coordinator actor checks that its shard actors are the processes the jobs' state is on (a
# shard whose process died comes back empty through Ray's max_restarts, and every job rolls back).
WATCH_S = 0.5
SHARD_MAX_RESTARTS = -1  # Ray restarts a dead shard actor (in its placement group bundle) whenever it dies

T = TypeVar("T")
log = logging.getLogger("paramserver")


def _advertised(bind_host: str) -> str:
    """The address others reach this node's server at: the bind address, or the node's IP for 0.0.0.0."""
    if bind_host in ("0.0.0.0", "::", ""):
        import ray

        return ray.util.get_node_ip_address()
    return bind_host


class ShardProcess:
    """What runs inside shard actor j: a ``ShardHost`` and its gRPC server, bound to ``config.host``."""

    def __init__(self, shard_id: int, config: ServerConfig, device: str) -> None:
        self.shard_id = shard_id
        # this process's incarnation: a shard actor that Ray restarted (its process died) has a new one
        self.incarnation = uuid.uuid4().hex
        self.num_shards = config.num_shards
        self.trusted_modules = config.trusted_modules
        self.device = device
        import ray

        bind_host = config.host
        self.host = ShardHost(shard_id, placement=f"node {ray.get_runtime_context().get_node_id()[:12]} ({_advertised('0.0.0.0')})")
        self.server, port = create_shard_server(self.host, f"{bind_host}:0", config)
        self._address = f"{_advertised(bind_host)}:{port}"
        self.metrics_address = None
        if config.metrics_port is not None:
            self.metrics_address = f"{_advertised(bind_host)}:{start_metrics_server(0, bind_host)}"

    def address(self) -> str:
        return self._address

    def identity(self) -> tuple[str, str]:
        """(incarnation, address): the coordinator's health check (a restarted shard has new ones)."""
        return self.incarnation, self._address

    def placement(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {
            "role": "primary", "shard": self.shard_id, "pid": os.getpid(), "node_id": ctx.get_node_id(),
            "address": self._address, "device": self.device, "metrics": self.metrics_address,
        }

    def create_job(self, name: str, config: bytes) -> None:
        spec: JobSpec = build_job(pb.JobConfig.FromString(config), self.num_shards, self.trusted_modules)
        self.host.add_job(name, spec.make_shard(self.shard_id, self.device), coordinator=None)

    def connect(self, name: str, coordinator: Any) -> None:
        self.host.set_coordinator(name, RemoteCoordinator(coordinator, name))

    def recreate_job(self, name: str, config: bytes, coordinator: Any) -> None:
        """Job ``name`` anew (empty, uninitialized) on this process, connected: a rollback fills it."""
        self.host.remove_job(name)
        self.create_job(name, config)
        self.connect(name, coordinator)

    # -- the coordinator's calls on this shard's part of job ``name`` (``ShardControl``, through ``ActorShard``)

    def _shard(self, name: str) -> Shard:
        return self.host.shard(name)

    def ready(self, name: str) -> bool:
        return self._shard(name).ready

    def reduce(
        self, name: str, step: int, norm_type: float, clip_value: float | None, contributors: Collection[int] | None
    ) -> list[torch.Tensor | None]:
        return self._shard(name).reduce(step, norm_type, clip_value, contributors)

    def apply(self, name: str, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]]) -> None:
        self._shard(name).apply(step, clip_coef, hyperparameters)

    def skip(self, name: str, step: int) -> None:
        self._shard(name).skip(step)

    def weight_copies(self, name: str) -> list[torch.Tensor]:
        return self._shard(name).weight_copies()

    def load_weights(self, name: str, buffers: Sequence[torch.Tensor]) -> None:
        self._shard(name).load_weights(buffers)

    def optimizer_state(self, name: str) -> list[dict[str, Any]]:
        return self._shard(name).optimizer_state()

    def load_optimizer_state(self, name: str, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        self._shard(name).load_optimizer_state(slice_states, param_groups)

    def snapshot(self, name: str) -> dict[str, Any]:
        return self._shard(name).snapshot()  # copies: Ray serializes them to the coordinator

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

    def stop(self) -> None:
        self.server.stop(1.0).wait(5.0)


class RemoteCoordinator:
    """The shard host's handle on a job's coordinator when that coordinator is an actor."""

    def __init__(self, actor: Any, name: str) -> None:
        self.actor = actor
        self.name = name

    def shard_ready(self, shard: int, step: int, generation: int | None = None) -> None:
        import ray

        ray.get(self.actor.shard_ready.remote(self.name, shard, step, generation), timeout=CONTROL_TIMEOUT_S)


class ActorShard:
    """Job ``name``'s shard in a ``ShardProcess`` actor, as a ``ShardControl``: each call is the actor's typed
    method of the same name, awaited with the control deadline.

    ``deferred()`` is the same shard with calls that return the Ray ``ObjectRef`` at once instead of the result,
    so that a group can start every shard's call before it waits for any (``RayShardGroup._each``).
    """

    def __init__(self, actor: Any, name: str, *, wait: bool = True) -> None:
        self.actor = actor
        self.name = name
        self._wait = wait

    def deferred(self) -> ActorShard:
        return ActorShard(self.actor, self.name, wait=False)

    def _done(self, ref: Any, wait_s: float = 0.0) -> Any:
        if not self._wait:
            return ref
        import ray

        return ray.get(ref, timeout=CONTROL_TIMEOUT_S + wait_s)

    @property
    def ready(self) -> bool:
        return self._done(self.actor.ready.remote(self.name))

    def reduce(
        self, step: int, norm_type: float, clip_value: float | None = None, contributors: Collection[int] | None = None
    ) -> list[torch.Tensor | None]:
        who = None if contributors is None else tuple(contributors)
        return self._done(self.actor.reduce.remote(self.name, step, norm_type, clip_value, who))

    def apply(self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]]) -> None:
        return self._done(self.actor.apply.remote(self.name, step, clip_coef, hyperparameters))

    def skip(self, step: int) -> None:
        return self._done(self.actor.skip.remote(self.name, step))

    def weight_copies(self) -> list[torch.Tensor]:
        return self._done(self.actor.weight_copies.remote(self.name))

    def load_weights(self, buffers: Sequence[torch.Tensor]) -> None:
        return self._done(self.actor.load_weights.remote(self.name, buffers))

    def optimizer_state(self) -> list[dict[str, Any]]:
        return self._done(self.actor.optimizer_state.remote(self.name))

    def load_optimizer_state(self, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        return self._done(self.actor.load_optimizer_state.remote(self.name, slice_states, param_groups))

    def snapshot(self) -> dict[str, Any]:
        return self._done(self.actor.snapshot.remote(self.name))

    def restore_version(self, version: int) -> None:
        return self._done(self.actor.restore_version.remote(self.name, version))

    def start_generation(self, step: int, generation: int | None = None) -> None:
        return self._done(self.actor.start_generation.remote(self.name, step, generation))

    def status(self) -> dict[str, Any]:
        return self._done(self.actor.status.remote(self.name))

    def wait_for_version(self, min_version: int, timeout: float) -> int:
        return self._done(self.actor.wait_for_version.remote(self.name, min_version, timeout), wait_s=timeout)


class RayShardGroup(ShardGroup):
    """A job's shards as actors: a group call starts on all of them, then waits for all (one deadline)."""

    def __init__(self, actors: Sequence[Any], name: str) -> None:
        self.actor_shards = [ActorShard(a, name) for a in actors]
        super().__init__(self.actor_shards)
        self.actors = list(actors)
        self.name = name

    def _each(self, call: Callable[[int, ShardControl], T], wait_s: float = 0.0) -> list[T]:
        import ray

        # deferred shards make ``call`` return an ObjectRef, not T: the results are T once ray.get has them
        refs = [call(j, s.deferred()) for j, s in enumerate(self.actor_shards)]
        return ray.get(refs, timeout=CONTROL_TIMEOUT_S + wait_s)


class RayFleet:
    """Shard actors: a job is created on each (each builds the same plan from the same config)."""

    def __init__(self, actors: Sequence[Any], incarnations: Sequence[str] | None = None) -> None:
        self.actors = list(actors)
        # the incarnation of each shard actor the jobs' state is on (``restarted`` compares)
        self.incarnations: list[str | None] = list(incarnations) if incarnations is not None else [None] * len(self.actors)
        self._initialized: set[str] = set()  # jobs whose shards all have their initial weights
        # per job and event loop, the one round of wait_for_version calls the waiting joins share
        self._init_polls: dict[tuple[str, asyncio.AbstractEventLoop], asyncio.Task[None]] = {}

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

        self._initialized.discard(name)
        for key in list(self._init_polls):  # (a copy: the loop may add one meanwhile)
            if key[0] == name:
                self._init_polls.pop(key, None)
        ray.get([a.delete_job.remote(name) for a in self.actors], timeout=CONTROL_TIMEOUT_S)

    def restarted(self, timeout: float) -> dict[int, tuple[str, str]]:
        """The shard actors whose process is not the one the jobs' state is on (Ray restarted it after it
        died): shard -> (incarnation, address). A shard that does not answer (dead, restarting) is asked
        again until ``timeout`` seconds have passed, then ``TimeoutError``."""
        import ray

        deadline = time.monotonic() + timeout
        refs = [a.identity.remote() for a in self.actors]
        changed: dict[int, tuple[str, str]] = {}
        for j, actor in enumerate(self.actors):
            while True:
                try:
                    incarnation, address = ray.get(refs[j], timeout=max(0.1, deadline - time.monotonic()))
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"shard {j} did not answer within {timeout:.0f}s ({type(exc).__name__})") from None
                    time.sleep(0.1)
                    refs[j] = actor.identity.remote()
            if self.incarnations[j] is None:
                self.incarnations[j] = incarnation
            elif incarnation != self.incarnations[j]:
                changed[j] = (incarnation, address)
        return changed

    def acknowledge(self, changed: dict[int, tuple[str, str]]) -> None:
        """The jobs are back on these restarted shards (``restarted``'s answer)."""
        for j, (incarnation, _) in changed.items():
            self.incarnations[j] = incarnation

    def recreate_job(self, name: str, config: pb.JobConfig, shards: Sequence[int]) -> None:
        """Job ``name`` anew, empty, on the restarted shard actors ``shards`` (a rollback then fills it)."""
        import ray

        me = ray.get_runtime_context().current_actor
        self._initialized.discard(name)
        data = config.SerializeToString()
        ray.get([self.actors[j].recreate_job.remote(name, data, me) for j in shards], timeout=CONTROL_TIMEOUT_S)

    async def wait_initialized_async(self, name: str, timeout: float) -> bool:
        """Wait on the running event loop, holding no thread, until every shard actor of job ``name`` has its
        initial weights; False if ``timeout`` seconds pass first. However many joins wait, one round of
        ``wait_for_version(0, INIT_POLL_S)`` calls at a time asks the actors (their results awaited as
        futures), round after round while anyone waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while name not in self._initialized:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            key = (name, loop)
            poll = self._init_polls.get(key)
            if poll is None or poll.done():
                poll = self._init_polls[key] = loop.create_task(self._poll_initialized(name))
                poll.add_done_callback(_retrieve)
            await asyncio.wait({poll}, timeout=remaining)  # neither cancels the shared round nor raises
            if poll.done() and not poll.cancelled() and poll.exception() is not None:
                raise poll.exception()  # type: ignore[misc]
        self._init_polls.pop((name, loop), None)
        return True

    async def _poll_initialized(self, name: str) -> None:
        refs = [a.wait_for_version.remote(name, 0, INIT_POLL_S) for a in self.actors]
        try:
            await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(r.future()) for r in refs)), INIT_POLL_S + CONTROL_TIMEOUT_S)
        except TimeoutError:  # a shard has no initial weights yet (a RayTaskError is an instance of its cause)
            return
        self._initialized.add(name)


class CoordinatorProcess:
    """What runs inside the coordinator actor: every job's coordinator and the front-door gRPC server, on
    ``config.host:config.port``."""

    def __init__(self, shard_actors: Sequence[Any], config: ServerConfig) -> None:
        import ray

        bind_host = config.host
        identities = ray.get([a.identity.remote() for a in shard_actors], timeout=CONTROL_TIMEOUT_S)
        fleet = RayFleet(shard_actors, [incarnation for incarnation, _ in identities])
        self.host = CoordinatorHost(fleet, [address for _, address in identities], config.trusted_modules)
        if config.checkpoint_dir:
            ServiceCheckpoints(self.host, config.checkpoint_dir, config.checkpoint_every, config.checkpoint_keep).restore_all()
        self.server, bound = create_coordinator_server(self.host, f"{bind_host}:{config.port}", config)
        self._address = f"{_advertised(bind_host)}:{bound}"
        self.metrics_address = None
        if config.metrics_port is not None:
            self.metrics_address = f"{_advertised(bind_host)}:{start_metrics_server(config.metrics_port, bind_host)}"
        # A shard actor that died comes back empty (Ray restarts it): a watcher notices within WATCH_S and rolls
        # every job back to its newest checkpoint (workers that see the shard unavailable check at once too).
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

    def placement(self) -> dict[str, Any]:
        """This process in ``RayService.placements()``: the coordinator (shard None), its front door's address."""
        import ray

        return {
            "role": "coordinator", "shard": None, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
            "address": self._address, "device": "cpu", "metrics": self.metrics_address,
        }

    def shard_ready(self, name: str, shard: int, step: int, generation: int | None = None) -> None:
        self.host.job(name).coordinator.shard_ready(shard, step, generation)

    def stop_requested(self) -> bool:
        return self.host.stop_requested.is_set()

    def stop(self) -> None:
        self._stopping.set()
        self.server.stop(1.0).wait(5.0)
        if self.host.checkpoints is not None:
            self.host.checkpoints.close()


def _retrieve(task: asyncio.Task[Any]) -> None:
    # a round's error reaches the joins that wait on it; with none left, it is not "never retrieved"
    if not task.cancelled():
        task.exception()
