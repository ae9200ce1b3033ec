"""The two roles of a server, as plain classes: a shard's host and the coordinator's.

A ``ShardHost`` holds shard j of every job; a ``CoordinatorHost`` holds every job's ``Coordinator`` and
creates the jobs' shards on the shard hosts. gRPC servicers translate wire calls into calls on these; the
Ray hosting layer puts them in actors. Nothing here knows about gRPC or Ray.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from paramserver import metrics
from paramserver.engine import Coordinator, JobSpec, ShardGroup, StepResult
from paramserver.errors import JobExistsError, JobNotFoundError
from paramserver.jobconfig import build_job
from paramserver.proto.v1 import paramserver_pb2 as pb
from paramserver.shard import Shard

# No wait in the service is unbounded: a call without a deadline waits at most this long.
MAX_WAIT_S = 300.0


class ShardHost:
    def __init__(self, shard_id: int, placement: str = "this process") -> None:
        self.shard_id = shard_id
        self.placement = placement
        self._shards: dict[str, Shard] = {}
        self._coordinators: dict[str, Coordinator] = {}
        self._locks: dict[str, threading.Lock] = {}

    def add_job(self, job: str, shard: Shard, coordinator: Any) -> None:
        """Host ``shard`` of ``job``; ``coordinator`` (anything with ``shard_ready(shard, step)``) may come
        later through ``set_coordinator`` when it lives elsewhere."""
        assert shard.shard_id == self.shard_id
        shard.placement = self.placement
        self._locks[job] = threading.Lock()
        self._coordinators[job] = coordinator
        self._shards[job] = shard

    def set_coordinator(self, job: str, coordinator: Any) -> None:
        self.shard(job)
        self._coordinators[job] = coordinator

    def remove_job(self, job: str) -> None:
        self._shards.pop(job, None)
        self._coordinators.pop(job, None)
        self._locks.pop(job, None)

    def shard(self, job: str) -> Shard:
        try:
            return self._shards[job]
        except KeyError:
            raise JobNotFoundError(f"no job {job!r} on shard {self.shard_id}") from None

    def push(self, job: str, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = ()) -> tuple[bool, int]:
        """Add a worker's gradients; when this shard then holds all of them, tell the coordinator, whose
        call closes the step if this was the last shard. Returns (applied, version after)."""
        shard = self.shard(job)
        with self._locks[job]:
            applied = shard.push(worker, step, grads, missing)
            ready = applied and shard.ready
        if ready:
            self._coordinators[job].shard_ready(self.shard_id, step)
        return applied, shard.version

    def initial_weights(self, job: str, buffers: Sequence[torch.Tensor]) -> None:
        shard = self.shard(job)
        with self._locks[job]:
            if shard.version != 0 or shard.accumulator.received:
                raise ValueError(f"shard {self.shard_id}: job {job!r} has begun training; initial weights come before any gradient")
            shard.load_weights(buffers)

    def pull(self, job: str, min_version: int, timeout: float | None) -> tuple[int, list[torch.Tensor]]:
        """Wait for ``min_version``, then the flat weights. They are the live buffers, and safe to stream:
        the next update needs this worker's next push, which comes after this pull."""
        shard = self.shard(job)
        version = shard.wait_for_version(min_version, MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S))
        return version, shard.weight_buffers()


class LocalFleet:
    """Shard hosts in this process: a job's shards are plain objects the coordinator calls directly."""

    def __init__(self, hosts: Sequence[ShardHost]) -> None:
        self.hosts = list(hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def create_job(self, name: str, config: pb.JobConfig, spec: JobSpec) -> ShardGroup:
        return ShardGroup([spec.make_shard(j) for j in range(len(self.hosts))])

    def connect(self, name: str, group: ShardGroup, coordinator: Coordinator) -> None:
        for host, shard in zip(self.hosts, group.shards):
            host.add_job(name, shard, coordinator)

    def delete_job(self, name: str) -> None:
        for host in self.hosts:
            host.remove_job(name)


@dataclass
class Job:
    name: str
    config: pb.JobConfig
    coordinator: Coordinator
    members: set[int]

    @property
    def ready(self) -> bool:
        return all(s["initialized"] for s in self.coordinator.shards.statuses())


class CoordinatorHost:
    """Every job's coordinator; ``fleet`` makes and reaches the jobs' shards (``LocalFleet`` or, on Ray,
    ``paramserver.hosting.RayFleet``)."""

    def __init__(self, fleet: Any, shard_addresses: Sequence[str], trusted_modules: Sequence[str] = (), shard_threads: int | None = None) -> None:
        assert len(fleet) == len(shard_addresses)
        self.shard_threads = shard_threads
        self.fleet = fleet
        self.shard_addresses = list(shard_addresses)
        self.trusted_modules = tuple(trusted_modules)
        self._jobs: dict[str, Job] = {}
        self._changed = threading.Condition()
        self.stop_requested = threading.Event()  # set by a Stop call; whoever runs the service ends it

    def job(self, name: str) -> Job:
        try:
            return self._jobs[name]
        except KeyError:
            raise JobNotFoundError(f"no job {name!r}") from None

    def create_job(self, name: str, config: pb.JobConfig) -> Job:
        """Create a job (rank 0). Creating it again with the same config returns it (a retried call)."""
        if not name:
            raise ValueError("a job needs a name")
        with self._changed:
            if name in self._jobs:
                existing = self._jobs[name]
                if existing.config != config:
                    raise JobExistsError(f"job {name!r} exists already with another configuration")
                return existing
            if self.shard_threads is not None and 2 * config.num_workers + 2 > self.shard_threads:
                raise ValueError(
                    f"num_workers={config.num_workers} needs {2 * config.num_workers + 2} gRPC threads per shard server "
                    f"(a push and a waiting pull per worker); this service has {self.shard_threads} (ServerOptions.max_workers)"
                )
            spec: JobSpec = build_job(config, len(self.fleet), self.trusted_modules)
            group = self.fleet.create_job(name, config, spec)
            coordinator = Coordinator(spec, group)
            coordinator.on_step = functools.partial(metrics.record_step, name)
            self.fleet.connect(name, group, coordinator)
            job = self._jobs[name] = Job(name, config, coordinator, {0})
            self._changed.notify_all()
            return job

    def join_job(self, name: str, rank: int, timeout: float | None) -> Job:
        """Wait until rank 0 has created the job and put its initial weights in place."""
        wait = MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S)
        with self._changed:
            if not self._changed.wait_for(lambda: name in self._jobs, wait):
                raise TimeoutError(f"job {name!r} was not created within {wait:.1f}s")
            job = self._jobs[name]
        job.coordinator.check_worker(rank)
        job.coordinator.shards.wait_initialized(wait)
        job.members.add(rank)
        return job

    def leave_job(self, name: str, worker: int) -> None:
        job = self.job(name)
        job.coordinator.check_worker(worker)
        job.members.discard(worker)

    def delete_job(self, name: str) -> None:
        with self._changed:
            self._jobs.pop(name, None)
            self.fleet.delete_job(name)

    def record_metric(self, name: str, worker: int, step: int, metric: float) -> None:
        self.job(name).coordinator.record_metric(worker, step, metric)

    def status(self, name: str) -> dict[str, Any]:
        job = self.job(name)
        coordinator = job.coordinator
        shards = [{"shard": j, "address": self.shard_addresses[j], **s} for j, s in enumerate(coordinator.shards.statuses())]
        version = coordinator.version
        waiting = []
        for s in shards:
            missing = [w for w in range(coordinator.config.num_workers) if w not in s["pushed"]]
            if missing and s["version"] == version:
                waiting.append(f"shard {s['shard']} waits for workers {missing}")
        last: StepResult | None = coordinator.last_result
        return {
            "version": version,
            "num_workers": coordinator.config.num_workers,
            "members": sorted(job.members),
            "shards": shards,
            "lrs": coordinator.get_last_lr(),
            "hyperparameters": coordinator.schedule.hyperparameters(),
            "skipped_steps": coordinator.skipped_steps,
            "last_total_norm": last.total_norm if last is not None else 0.0,
            "waiting_for": f"step {version}: " + "; ".join(waiting) if waiting else "",
        }
