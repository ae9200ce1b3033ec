"""The coordinator's host: every job's ``Coordinator``; it creates the jobs' shards through a fleet. No gRPC, no Ray."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from paramserver.core.coordinator import Coordinator, StepResult
from paramserver.core.errors import JobExistsError, JobNotFoundError
from paramserver.core.job import JobSpec
from paramserver.core.shard import Shard
from paramserver.core.shards import ShardGroup
from paramserver.service import metrics
from paramserver.service.shard_host import MAX_WAIT_S, ShardHost
from paramserver.wire.jobconfig import build_job
from paramserver.wire.proto.v1 import paramserver_pb2 as pb


class LocalFleet:
    """Shard hosts in this process: a job's shards are plain objects the coordinator calls directly."""

    def __init__(self, hosts: Sequence[ShardHost]) -> None:
        self.hosts = list(hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def create_job(self, name: str, config: pb.JobConfig, spec: JobSpec) -> ShardGroup:
        return ShardGroup([spec.make_shard(j) for j in range(len(self.hosts))])

    def connect(self, name: str, group: ShardGroup, coordinator: Coordinator) -> None:
        for host, shard in zip(self.hosts, group.shards, strict=True):
            assert isinstance(shard, Shard), "a local fleet's group holds the shards themselves"
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

    @property
    def epoch(self) -> int:
        """Of the membership and the shard map (kept by the coordinator, which owns the shard group)."""
        return self.coordinator.epoch


class CoordinatorHost:
    """Every job's coordinator; ``fleet`` makes and reaches the jobs' shards (``LocalFleet`` or, on Ray,
    ``paramserver.hosting.actors.RayFleet``)."""

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
        with self._changed:
            if rank not in job.members:  # a retried join changes nothing
                job.members.add(rank)
                job.coordinator.bump_epoch()
        return job

    def leave_job(self, name: str, worker: int) -> None:
        job = self.job(name)
        job.coordinator.check_worker(worker)
        with self._changed:
            if worker in job.members:
                job.members.discard(worker)
                job.coordinator.bump_epoch()

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
        step = coordinator.step
        waiting = []
        for s in shards:
            missing = [w for w in range(coordinator.config.num_workers) if w not in s["pushed"]]
            if missing and s["version"] == step:  # a shard's version counts its closed steps
                waiting.append(f"shard {s['shard']} waits for workers {missing}")
        last: StepResult | None = coordinator.last_result
        return {
            "version": coordinator.version,
            "step": step,
            "epoch": job.epoch,
            "num_workers": coordinator.config.num_workers,
            "members": sorted(job.members),
            "shards": shards,
            "lrs": coordinator.get_last_lr(),
            "hyperparameters": coordinator.schedule.hyperparameters(),
            "skipped_steps": coordinator.skipped_steps,
            "last_total_norm": last.total_norm if last is not None else 0.0,
            "waiting_for": f"step {step}: " + "; ".join(waiting) if waiting else "",
        }
