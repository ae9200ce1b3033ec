"""The coordinator's host: every job's ``Coordinator``; it creates the jobs' shards through a fleet. No gRPC, no Ray.

A join waits for rank 0 (the job created, its initial weights in place). ``wait_joinable`` waits on an asyncio
event loop without holding a thread: a job listener hands "job created" to the loop, and the fleet waits for
the shards' version 0 its own way (in-process shards' version listeners; Ray futures for shard actors).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from paramserver.core.coordinator import Coordinator, StepResult
from paramserver.core.errors import JobExistsError, JobFailedError, JobFinishedError, JobNotFoundError
from paramserver.core.job import JobSpec
from paramserver.core.shard import Shard
from paramserver.core.shards import ShardCheck, ShardGroup
from paramserver.service import metrics
from paramserver.service.jobs import Job, config_difference
from paramserver.service.shard_host import MAX_WAIT_S, ShardHost
from paramserver.service.wakeup import LoopWakeup
from paramserver.wire.jobconfig import build_job
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

log = logging.getLogger("paramserver")

# How often the host looks for members whose lease ran out (a lease lasts a job's lease_timeout).
LEASE_CHECK_S = 0.25
# How long a check of the shards waits for one that died to come back (Ray restarts it) before it gives up.
RECOVER_TIMEOUT_S = 60.0
# How long a status waits for a step's close under way, so that it shows the step a worker's pull already saw.
STATUS_WAIT_S = 2.0


class LocalFleet:
    """Shard hosts in this process: a job's shards are plain objects the coordinator calls directly."""

    def __init__(self, hosts: Sequence[ShardHost]) -> None:
        self.hosts = list(hosts)
        self._initialized: dict[str, _Initialized] = {}

    def __len__(self) -> int:
        return len(self.hosts)

    def create_job(self, name: str, config: pb.JobConfig, spec: JobSpec) -> ShardGroup:
        return ShardGroup([spec.make_shard(j) for j in range(len(self.hosts))])

    def connect(self, name: str, group: ShardGroup, coordinator: Coordinator) -> None:
        shards = group.shards
        assert all(isinstance(shard, Shard) for shard in shards), "a local fleet's group holds the shards themselves"
        self._initialized[name] = _Initialized(shards)  # type: ignore[arg-type]
        for host, shard in zip(self.hosts, shards, strict=True):
            host.add_job(name, shard, coordinator)

    def delete_job(self, name: str) -> None:
        for host in self.hosts:
            host.remove_job(name)
        self._initialized.pop(name, None)

    def check(self, timeout: float) -> ShardCheck:
        """Shards in this process never die on their own."""
        return ShardCheck()

    def out_of_sync(self) -> list[tuple[int, str]]:
        return []  # no standbys

    async def wait_initialized_async(self, name: str, timeout: float) -> bool:
        """Wait on the running event loop, holding no thread, until every shard of job ``name`` has its
        initial weights; False if ``timeout`` seconds pass first."""
        try:
            initialized = self._initialized[name]
        except KeyError:
            raise JobNotFoundError(f"no job {name!r}") from None
        return await initialized.wait(timeout)


class _Initialized:
    """Whether every shard of a job has its initial weights, for asyncio waiters on any event loop.

    One version listener per shard, added before the shard is reachable (so it never races the shard
    servers' own listeners) and left there: once all are initialized it returns at once.
    """

    def __init__(self, shards: Sequence[Shard]) -> None:
        self._shards = list(shards)
        self._lock = threading.Lock()  # of done and the waiters; held for moments only
        self._done = False
        self._waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}
        for shard in self._shards:
            shard.add_version_listener(self._changed)

    def _all(self) -> bool:
        return all(s.initialized for s in self._shards)  # each shard sets its flag before it calls its listeners

    def _changed(self) -> None:
        # on the thread that changed a shard, its lock held: hand the news to the loops, nothing more
        if self._done or not self._all():
            return
        with self._lock:
            self._done = True
            waiters, self._waiters = self._waiters, {}
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for future, loop in waiters.items():
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError:
                pass  # the loop is closed: nobody waits on it any more

    async def wait(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:  # the check and the registration in one go: no wake-up falls between them
            if self._done or self._all():
                return True
            self._waiters[future] = loop
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._lock:
                self._waiters.pop(future, None)


def _resolve(futures: Sequence[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


class CoordinatorHost:
    """Every job's coordinator; ``fleet`` makes and reaches the jobs' shards (``LocalFleet`` or, on Ray,
    ``paramserver.hosting.replicas.RayFleet``): ``create_job``, ``connect``, ``delete_job``, ``check`` and
    ``wait_initialized_async`` (the asyncio wait for a job's initial weights)."""

    def __init__(self, fleet: Any, shard_addresses: Sequence[str], trusted_modules: Sequence[str] = (), service_id: str | None = None) -> None:
        assert len(fleet) == len(shard_addresses)
        # this service instance (GetServiceInfo; Stop must name it): random per start of the service, unless the
        # caller keeps one (on Ray a restarted coordinator actor gets the id of the service it belongs to)
        self.service_id = service_id or uuid.uuid4().hex
        self.fleet = fleet
        self.shard_addresses = list(shard_addresses)
        self.trusted_modules = tuple(trusted_modules)
        self._jobs: dict[str, Job] = {}
        self._changed = threading.Condition()
        self.stop_requested = threading.Event()  # set by a Stop call; whoever runs the service ends it
        # Called (no arguments) after a job is created, on the creating thread: they must not block.
        self._job_listeners: tuple[Callable[[], None], ...] = ()
        # the asyncio joins waiting for a job to be created: per event loop, one listener wakes them all
        self._watches: dict[asyncio.AbstractEventLoop, LoopWakeup] = {}
        self._waiting_joins: dict[str, int] = {}
        self._waiting_lock = threading.Lock()  # of the two above and the listeners; held for moments only
        # Called with (job name, result) after every closed step, the job's coordinator lock held (checkpoints).
        self.step_hook: Callable[[str, StepResult], None] | None = None
        self.checkpoints: Any = None  # a paramserver.service.checkpoints.ServiceCheckpoints when checkpointing
        self._recover_lock = threading.Lock()  # one check of the shards (and rollback) at a time
        # drops the members whose lease ran out; it ends with the host (it holds only a weak reference)
        threading.Thread(target=_watch_leases, args=(weakref.ref(self),), name="paramserver-leases", daemon=True).start()

    def has_job(self, name: str) -> bool:
        return name in self._jobs

    def job(self, name: str) -> Job:
        try:
            return self._jobs[name]
        except KeyError:
            names = sorted(self._jobs)
            has = f"its jobs: {', '.join(map(repr, names[:10]))}{', ...' if len(names) > 10 else ''}" if names else "it has no job"
            raise JobNotFoundError(f"no job {name!r} on this service ({has})") from None

    def _finished_error(self, job: Job) -> JobFinishedError:
        return JobFinishedError(
            f"job {job.name!r} finished at step {job.coordinator.step} (every worker left): delete it "
            f"(paramserver delete --job {job.name}) to train anew under this name, or join it as rank 0 to continue it"
        )

    def create_job(self, name: str, config: pb.JobConfig) -> Job:
        """Create a job (rank 0). Creating it again with the same config returns it (a retried call), unless it
        has finished (every worker left after it trained): then ``JobFinishedError`` (delete it, or join it as
        rank 0 to continue it). Another config is ``JobExistsError``, naming the fields that differ."""
        if not name:
            raise ValueError("a job needs a name")
        with self._changed:
            if name in self._jobs:
                existing = self._jobs[name]
                if existing.config != config:
                    what = "restored from a checkpoint" if existing.restored else "exists already"
                    raise JobExistsError(
                        f"job {name!r} {what} with another configuration (the job's -> this one's: {config_difference(existing.config, config)}): "
                        f"use another job name, or delete it (paramserver delete --job {name})"
                    )
                if existing.finished:
                    raise self._finished_error(existing)
                if existing.restored:
                    log.info("job %s was restored at step %d: rank 0's initial weights do not replace its state", name, existing.coordinator.step)
                self.add_member(existing, 0)
                return existing
            job = self._add_job(name, config)
            job.joined.add(0)
            return job

    def add_restored_job(self, name: str, config: pb.JobConfig) -> Job:
        """A job about to be restored from a checkpoint (``Coordinator.restore``): no member yet; joins wait
        until its shards hold the restored weights."""
        with self._changed:
            if name in self._jobs:
                raise JobExistsError(f"job {name!r} exists already")
            job = self._add_job(name, config)
            job.restored = True
            return job

    def _add_job(self, name: str, config: pb.JobConfig) -> Job:
        spec: JobSpec = build_job(config, len(self.fleet), self.trusted_modules)
        group = self.fleet.create_job(name, config, spec)
        coordinator = Coordinator(spec, group)
        coordinator.on_step = functools.partial(self._stepped, name)
        coordinator.on_membership = functools.partial(metrics.record_membership, name)
        self.fleet.connect(name, group, coordinator)
        job = self._jobs[name] = Job(name, config, coordinator)
        self._changed.notify_all()
        for listener in self._job_listeners:
            listener()
        return job

    def resume_job(self, name: str, config: pb.JobConfig) -> Job:
        """Take over job ``name`` as its shards hold it (this coordinator restarted): step, generation and
        schedule from their records, the open step closed if every push is in (``Coordinator.resume``)."""
        with self._changed:
            spec: JobSpec = build_job(config, len(self.fleet), self.trusted_modules)
            group = self.fleet.adopt_job(name, config)
            coordinator = Coordinator(spec, group)
            coordinator.on_step = functools.partial(self._stepped, name)
            coordinator.on_membership = functools.partial(metrics.record_membership, name)
            self.fleet.connect(name, group, coordinator)
            job = self._jobs[name] = Job(name, config, coordinator, restored=True)
            coordinator.resume()
            coordinator.bump_epoch()
            log.warning("job %s taken over from its shards at step %d (the coordinator restarted)", name, coordinator.step)
            self._changed.notify_all()
            for listener in self._job_listeners:
                listener()
            return job

    def recover_shards(self, timeout: float) -> list[int]:
        """Check that every shard process is the one the jobs' state is on. A primary that died is replaced by
        its standby (``replicas=1``): the shard map has the standby's address, the epoch moves on, and the open
        step closes once the workers pushed it again there; no step is lost. A primary without a standby comes
        back empty (Ray restarts it): every job rolls back to its newest checkpoint (re-created on that shard,
        every shard loads the checkpoint in a new weights generation, so every stale push and pull is refused);
        a job without a checkpoint fails (``JobFailedError``). So does a job whose standby copy was not current.
        Then standbys without a current copy are rebuilt from their primaries. Waits at most ``timeout`` seconds
        for a restarting primary. Returns the shards that were replaced or restarted."""
        with self._recover_lock:
            found = self.fleet.check(timeout)
            for j, address in {**found.taken_over, **found.lost}.items():
                self.shard_addresses[j] = address
            if found.taken_over:
                log.warning("shard(s) %s: the standby took over from a primary that died", sorted(found.taken_over))
            if found.lost:
                log.warning("shard(s) %s died and restarted empty: rolling back %d job(s)", sorted(found.lost), len(self._jobs))
            for job in list(self._jobs.values()):
                back = sorted({*found.lost, *found.stale.get(job.name, [])})
                if back:
                    stale = found.stale.get(job.name, [])
                    self._roll_back(job, back, "its standby had no current copy of the job yet" if stale else "")
                elif found.taken_over:
                    job.coordinator.bump_epoch()
                    job.coordinator.recheck()  # the reports the dead primary made are gone: ask the new one
                elif job.coordinator.interrupted:
                    job.coordinator.recheck()
            if found.lost:
                self.fleet.acknowledge(found)
            for j, name in self.fleet.out_of_sync():
                job = self._jobs.get(name)
                if job is not None and job.lost is None:
                    with job.coordinator._lock:  # no update runs during the copy: the job's steps wait meanwhile
                        started = time.monotonic()
                        if self.fleet.rebuild(j, name):
                            metrics.record_standby_rebuild(name, j, time.monotonic() - started)
            return sorted({*found.taken_over, *found.lost})

    def _roll_back(self, job: Job, shards: list[int], why: str = "") -> None:
        coordinator = job.coordinator
        died = f"shard{'s' if len(shards) > 1 else ''} {', '.join(map(str, shards))} of job {job.name!r} died"
        died += f" ({why})" if why else ""
        step = None
        if job.lost is None:
            self.fleet.recreate_job(job.name, job.config, shards)
            if self.checkpoints is not None:
                step = self.checkpoints.roll_back(job.name, coordinator)
        if step is None:
            where = "the service has no checkpoint_dir" if self.checkpoints is None else f"none in {self.checkpoints.directory}"
            job.lost = job.lost or f"{died} and no checkpoint exists to roll back to ({where}): the job has failed"
            with coordinator._lock:
                coordinator.failed = job.lost
            log.error("%s", job.lost)
        else:
            log.warning("%s: job rolled back to its checkpoint of step %d", died, step)
        coordinator.bump_epoch()

    def _stepped(self, name: str, result: StepResult) -> None:
        metrics.record_step(name, result)
        if self.step_hook is not None:
            self.step_hook(name, result)

    def add_job_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after every job creation, on the creating thread with the host's lock held: it
        must only hand the news on (``loop.call_soon_threadsafe``), never block or call back into the host."""
        with self._waiting_lock:  # not the host's lock: creating a job holds that one for a while
            self._job_listeners = (*self._job_listeners, callback)

    def remove_job_listener(self, callback: Callable[[], None]) -> None:
        with self._waiting_lock:
            self._job_listeners = tuple(c for c in self._job_listeners if c != callback)

    def join_job(self, name: str, rank: int, timeout: float | None) -> Job:
        """Wait (blocking this thread) until rank 0 has created the job and put its initial weights in place,
        then add ``rank`` to its members. Servers use ``wait_joinable`` and ``add_member``."""
        wait = MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S)
        with self._changed:
            if not self._changed.wait_for(lambda: name in self._jobs, wait):
                raise TimeoutError(f"job {name!r} was not created within {wait:.1f}s")
            job = self._jobs[name]
        job.coordinator.check_worker(rank)
        job.coordinator.shards.wait_initialized(wait)
        self.add_member(job, rank)
        return job

    async def wait_joinable(self, name: str, rank: int, timeout: float | None) -> Job:
        """``join_job``'s wait on the running event loop, holding no thread: until rank 0 has created job
        ``name`` and its shards have the initial weights. Raises ``TimeoutError`` when ``timeout`` (capped by
        ``MAX_WAIT_S``) passes first. The caller then adds the member (``add_member``, off the loop)."""
        wait = MAX_WAIT_S if timeout is None else min(timeout, MAX_WAIT_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        with self._waiting_lock:
            self._waiting_joins[name] = self._waiting_joins.get(name, 0) + 1
        try:
            job = await self._wait_created(name, rank, loop, deadline, wait)
            if job.lost is not None:
                raise JobFailedError(job.lost)
            job.coordinator.check_worker(rank)
            if not await self.fleet.wait_initialized_async(name, max(0.0, deadline - loop.time())):
                raise TimeoutError(f"job {name!r}: the shards had no initial weights from rank 0 within {wait:.1f}s")
            return job
        finally:
            with self._waiting_lock:
                self._waiting_joins[name] -= 1
                if not self._waiting_joins[name]:
                    del self._waiting_joins[name]

    async def _wait_created(self, name: str, rank: int, loop: asyncio.AbstractEventLoop, deadline: float, wait: float) -> Job:
        """Until job ``name`` exists, and for a rank other than 0 until it is not finished (rank 0 continues a
        finished job by joining it; the others wait for that, as they wait for rank 0's creation)."""
        watch = self._watches.get(loop)
        if watch is None:
            watch = self._watches[loop] = LoopWakeup(loop)
            self.add_job_listener(watch.changed)

        def joinable() -> bool:
            job = self._jobs.get(name)
            return job is not None and (rank == 0 or not job.finished)

        # a finished job is answered a little before the call's deadline, so that the caller learns why
        early = deadline - min(1.0, 0.1 * wait)
        if not await watch.wait_until(joinable, early):
            job = self._jobs.get(name)
            if job is not None and job.finished:
                raise self._finished_error(job)
            if not await watch.wait_until(joinable, deadline):
                raise TimeoutError(f"job {name!r} was not created within {wait:.1f}s")
        return self._jobs[name]

    def add_member(self, job: Job, rank: int) -> None:
        """Rank ``rank`` has joined ``job``: a member (again) from the open step on, its lease fresh (a retried join
        changes nothing else). Rank 0 joining a finished job continues it: the other ranks' joins that waited go on."""
        reopened = job.finished
        job.coordinator.join(rank)
        job.joined.add(rank)
        if reopened:
            log.info("job %s: continued at step %d (rank %d joined the finished job)", job.name, job.coordinator.step, rank)
            self._notify_job_listeners()

    def _notify_job_listeners(self) -> None:
        with self._waiting_lock:
            listeners = self._job_listeners
        for listener in listeners:
            listener()

    def waiting_joins(self, name: str | None = None) -> int:
        """How many asyncio joins (of job ``name``, or of any job) wait now for rank 0."""
        with self._waiting_lock:
            return sum(self._waiting_joins.values()) if name is None else self._waiting_joins.get(name, 0)

    def close_watches(self, loop: asyncio.AbstractEventLoop) -> None:
        """Unhook ``loop``'s job listener (its server stopped)."""
        watch = self._watches.pop(loop, None)
        if watch is not None:
            self.remove_job_listener(watch.changed)

    def leave_job(self, name: str, worker: int) -> None:
        """``worker`` leaves ``name`` at once: the open step no longer waits for it."""
        self.job(name).coordinator.leave(worker)

    def renew_lease(self, name: str, worker: int, transport: str = "") -> int:
        """A call of ``worker``: its lease starts over (``NotAMemberError`` if it is no member). Returns the epoch.
        ``transport``: how the worker moves its bytes, if it says (shown in status and metrics)."""
        job = self.job(name)
        job.coordinator.renew(worker)
        if transport and job.transports.get(worker) != transport:
            old = job.transports.get(worker)
            if old is not None:
                metrics.WORKER_TRANSPORT.labels(name, str(worker), old).set(0)
            job.transports[worker] = transport
            metrics.WORKER_TRANSPORT.labels(name, str(worker), transport).set(1)
        return job.epoch

    def expire_leases(self) -> None:
        """Drop, in every job, the members whose lease ran out (a thread of the host calls it every LEASE_CHECK_S)."""
        for job in list(self._jobs.values()):
            if job.lost is None:
                try:
                    job.coordinator.expire_leases()
                except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                    log.error("job %s: dropping expired members failed: %s: %s", job.name, type(exc).__name__, exc)

    def delete_job(self, name: str) -> None:
        """Delete job ``name``: its state on every shard (and standby), its shared memory, its membership; its
        checkpoints stay. ``JobNotFoundError`` if there is none. A call of the job that races the deletion fails
        (``JobFailedError`` on the coordinator, ``JobNotFoundError`` on the shards); its name is free at once."""
        with self._changed:
            job = self.job(name)
            del self._jobs[name]
            coordinator = job.coordinator
            with coordinator._lock:  # no step of the job runs while its shards go
                coordinator.failed = f"job {name!r} was deleted"
                job.lost = coordinator.failed
                self.fleet.delete_job(name)
            for worker in list(job.transports):
                metrics.WORKER_TRANSPORT.labels(name, str(worker), job.transports[worker]).set(0)
        log.info("job %s deleted at step %d", name, coordinator.step)

    def record_metric(self, name: str, worker: int, step: int, metric: float) -> None:
        self.job(name).coordinator.record_metric(worker, step, metric)

    def status(self, name: str) -> dict[str, Any]:
        job = self.job(name)
        # a close under way finishes first: a worker's pull returns once the shards moved, before the coordinator did
        locked = job.coordinator._lock.acquire(timeout=STATUS_WAIT_S)
        try:
            return self._status(job)
        finally:
            if locked:
                job.coordinator._lock.release()

    def _status(self, job: Job) -> dict[str, Any]:
        coordinator = job.coordinator
        shards = [{"shard": j, "address": self.shard_addresses[j], **s} for j, s in enumerate(coordinator.shards.statuses())]
        step = coordinator.step
        waiting = []
        for s in shards:
            missing = [w for w in sorted(coordinator.membership.live) if w not in s["pushed"]]
            if missing and s["version"] == step:  # a shard's version counts its closed steps
                waiting.append(f"shard {s['shard']} waits for workers {missing}")
        last: StepResult | None = coordinator.last_result
        return {
            "version": coordinator.version,
            "step": step,
            "epoch": job.epoch,
            "num_workers": coordinator.config.num_workers,
            "members": job.members,
            "changes": [{"rank": c.rank, "reason": c.reason, "step": c.step} for c in coordinator.membership.changes],
            "last_contributors": list(last.contributors) if last is not None else [],
            "shards": shards,
            "lrs": coordinator.get_last_lr(),
            "hyperparameters": coordinator.schedule.hyperparameters(),
            "skipped_steps": coordinator.skipped_steps,
            "last_total_norm": last.total_norm if last is not None else 0.0,
            "waiting_for": f"step {step}: " + "; ".join(waiting) if waiting else "",
            "transports": dict(job.transports),
            "state": job.state(),
        }


def _watch_leases(host_ref: weakref.ref[CoordinatorHost]) -> None:
    while True:
        time.sleep(LEASE_CHECK_S)
        host = host_ref()
        if host is None:
            return
        host.expire_leases()
        del host
