"""The coordinator's control plane over shard actors: each shard is a primary process and, with ``replicas=1``,
a standby process that applies the same updates (``RayFleet``); a job's shards as ``ShardControl``s
(``ActorShard``) and as a group (``RayShardGroup``).

A call that changes a shard's state (apply, skip, loads) goes to the primary and to its standby; a call that
reads goes to the primary alone (its ``reduce`` hands the mean to the standby itself). A process that died
is a ``ray.exceptions.RayActorError`` (or a control lane that broke during the call): a write still counts
when the other replica took it, a read or a write that no replica took raises ``ShardLostError``. A standby
that does not answer a write within ``standby_timeout`` of its primary falls out of sync. The health check
(``RayFleet.check``, every fraction of a second) promotes the standby of a dead primary, notes shards that came
back empty, and lists the standbys to rebuild from their primary (``rebuild``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from paramserver.core.errors import ShardLostError
from paramserver.core.shard import SnapshotWrite
from paramserver.core.shards import ShardCheck, ShardControl, ShardGroup
from paramserver.hosting.lane import LaneBook, LaneBrokenError, LaneCall
from paramserver.hosting.scalars import pack_scalars, unpack_scalars

# Every control-plane call has a deadline too.
CONTROL_TIMEOUT_S = 120.0
# A join waiting for the shard actors' initial weights asks them again every this many seconds (a shard
# actor's thread waits meanwhile: one per shard and job, however many workers wait).
INIT_POLL_S = 5.0
# How long the health check waits for a live process to say who it is before asking the next round.
IDENTITY_TIMEOUT_S = 5.0
# How long a live process takes at most to answer at once; one that does not is probed (``_port_closed``).
QUICK_ANSWER_S = 0.2

T = TypeVar("T")
log = logging.getLogger("paramserver")


def _ray() -> Any:
    import ray

    return ray


def _get(call: Any, timeout: float) -> Any:
    """The result of a call under way: on a control lane, or a Ray call."""
    return call.result(timeout) if isinstance(call, LaneCall) else _ray().get(call, timeout=timeout)


@dataclass
class _Pending:
    """One shard's call under way: the primary's result, and the standby's for a write."""

    shard: int
    primary: Any
    standby: Any = None
    standby_actor: Any = None


class ActorShard:
    """Job ``name``'s shard ``index`` on the fleet's actors, as a ``ShardControl``: each call is the actor's typed
    method of the same name (with the job's name first), awaited with the control deadline.

    ``deferred()`` is the same shard with calls that return the call under way instead of the result, so that a
    group starts every shard's call before it waits for any (``RayShardGroup._each``).
    """

    def __init__(self, fleet: RayFleet, index: int, name: str, *, wait: bool = True) -> None:
        self.fleet = fleet
        self.index = index
        self.name = name
        self._wait = wait

    def deferred(self) -> ActorShard:
        return ActorShard(self.fleet, self.index, self.name, wait=False)

    def _read(self, call: Callable[[Any], Any], wait_s: float = 0.0) -> Any:
        """``call(actor)`` (which starts the actor's method) on the primary alone."""
        pending = _Pending(self.index, call(self.fleet.primaries[self.index]))
        return pending if not self._wait else self.fleet.resolve([pending], CONTROL_TIMEOUT_S + wait_s)[0]

    def _write(self, call: Callable[[Any], Any], lane: tuple[str, tuple[Any, ...]] | None = None) -> Any:
        """``call(actor)`` on the primary and on its standby (if it holds a current copy of the job); ``lane``:
        the same call as (method, args), made on a process's control lane where it has one."""
        standby = self.fleet.standby(self.index, self.name)
        primary = self.fleet.start(self.fleet.primaries[self.index], call, lane)
        pending = _Pending(self.index, primary, None if standby is None else self.fleet.start(standby, call, lane), standby)
        return pending if not self._wait else self.fleet.resolve([pending], CONTROL_TIMEOUT_S)[0]

    @property
    def ready(self) -> bool:
        return self._read(lambda a: a.ready.remote(self.name))

    def reduce(
        self, step: int, norm_type: float, clip_value: float | None = None, contributors: Collection[int] | None = None
    ) -> list[torch.Tensor | None]:
        return self._read(lambda a: a.reduce.remote(self.name, step, norm_type, clip_value, None if contributors is None else tuple(contributors)))

    def apply(self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]], record: dict[str, Any] | None = None) -> None:
        packed = pack_scalars((clip_coef, hyperparameters, record))
        return self._write(lambda a: a.apply.remote(self.name, step, *packed), lane=("apply", (self.name, step, *packed)))

    def set_members(self, members: Collection[int]) -> None:
        return self._write(lambda a: a.set_members.remote(self.name, tuple(members)))

    def skip(self, step: int, record: dict[str, Any] | None = None) -> None:
        return self._write(lambda a: a.skip.remote(self.name, step, record))

    def keep_record(self, record: dict[str, Any] | None) -> None:
        return self._write(lambda a: a.keep_record.remote(self.name, record))

    def last_record(self) -> dict[str, Any] | None:
        return self._read(lambda a: a.last_record.remote(self.name))

    def weight_copies(self) -> list[torch.Tensor]:
        return self._read(lambda a: a.weight_copies.remote(self.name))

    def load_weights(self, buffers: Sequence[torch.Tensor]) -> None:
        return self._write(lambda a: a.load_weights.remote(self.name, buffers))

    def optimizer_state(self) -> list[dict[str, Any]]:
        return self._read(lambda a: a.optimizer_state.remote(self.name))

    def load_optimizer_state(self, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        return self._write(lambda a: a.load_optimizer_state.remote(self.name, slice_states, param_groups))

    def save_snapshot(self, path: str) -> SnapshotWrite:
        return self._read(lambda a: a.save_snapshot.remote(self.name, path))

    def snapshot_written(self, path: str, timeout: float) -> dict[str, Any]:
        return self._read(lambda a: a.snapshot_written.remote(self.name, path, timeout), wait_s=timeout)

    def restore_version(self, version: int) -> None:
        return self._write(lambda a: a.restore_version.remote(self.name, version))

    def start_generation(self, step: int, generation: int | None = None) -> None:
        return self._write(lambda a: a.start_generation.remote(self.name, step, generation))

    def status(self) -> dict[str, Any]:
        return self._read(lambda a: a.status.remote(self.name))

    def wait_for_version(self, min_version: int, timeout: float) -> int:
        return self._read(lambda a: a.wait_for_version.remote(self.name, min_version, timeout), wait_s=timeout)


class RayShardGroup(ShardGroup):
    """A job's shards on the fleet: a group call starts on all of them, then waits for all (one deadline)."""

    def __init__(self, fleet: RayFleet, name: str) -> None:
        self.fleet = fleet
        self.name = name
        self.actor_shards = [ActorShard(fleet, j, name) for j in range(len(fleet))]
        super().__init__(self.actor_shards)

    def _each(self, call: Callable[[int, ShardControl], T], wait_s: float = 0.0, only: Sequence[int] | None = None) -> list[T]:
        # deferred shards make ``call`` return the call under way, not T: the results are T once resolved
        pending = [call(j, s.deferred()) for j, s in enumerate(self.actor_shards) if only is None or j in only]
        return self.fleet.resolve(pending, CONTROL_TIMEOUT_S + wait_s)  # type: ignore[arg-type]

    def reduce(self, *args: Any, **kwargs: Any) -> list[list[torch.Tensor | None]]:
        return [unpack_scalars(norms) for norms in super().reduce(*args, **kwargs)]  # packed by ShardProcess.reduce


class RayFleet:
    """The shard processes: ``primaries[j]`` serves shard j, ``standbys[j]`` (with ``replicas=1``) follows it.

    The fleet knows each process's incarnation (a process Ray restarted after it died has a new one and none of
    the jobs) and which standbys hold a current copy of which job (``in_sync``): a job's writes reach a standby
    only once it was rebuilt from its primary, and only a current standby takes over.
    """

    def __init__(
        self, primaries: Sequence[Any], standbys: Sequence[Any] | None = None, incarnations: dict[Any, str] | None = None,
        lanes: LaneBook | None = None, standby_timeout: float = CONTROL_TIMEOUT_S,
    ) -> None:
        self.primaries = list(primaries)
        self.standby_timeout = standby_timeout  # how long a write waits for a standby once its primary answered
        self.lanes = lanes  # the control lanes to the shard processes on this node (None: every call over Ray)
        self.standbys: list[Any] = list(standbys) if standbys is not None else [None] * len(self.primaries)
        assert len(self.standbys) == len(self.primaries)
        # actor -> the incarnation (process) the jobs' state is on
        self.incarnations: dict[Any, str] = dict(incarnations or {})
        self._answers: dict[Any, tuple[str, str] | None] = {}  # each process's answer to the last check
        self._addresses: dict[Any, str] = {}  # each process's gRPC address when it last answered
        self.in_sync: set[tuple[int, str]] = set()  # (shard, job): the standby holds a current copy
        self.jobs: dict[str, bytes] = {}  # every job's config (serialized), to re-create it on a new process
        self._initialized: set[str] = set()  # jobs whose shards all have their initial weights
        # per job and event loop, the one round of wait_for_version calls the waiting joins share
        self._init_polls: dict[tuple[str, asyncio.AbstractEventLoop], asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self.primaries)

    def assign_roles(self) -> None:
        """Tell every process its role, and each primary its standby (which gets its means and initial weights)."""
        calls = [p.set_role.remote("primary", s) for p, s in zip(self.primaries, self.standbys)]
        calls += [s.set_role.remote("standby", None) for s in self.standbys if s is not None]
        _ray().get(calls, timeout=CONTROL_TIMEOUT_S)

    @property
    def replicated(self) -> bool:
        return any(s is not None for s in self.standbys)

    def standby(self, j: int, name: str) -> Any:
        """Shard j's standby if it holds a current copy of job ``name`` (else writes skip it)."""
        return self.standbys[j] if (j, name) in self.in_sync else None

    def addresses(self) -> list[str]:
        return _ray().get([a.address.remote() for a in self.primaries], timeout=CONTROL_TIMEOUT_S)

    def start(self, actor: Any, call: Callable[[Any], Any], lane: tuple[str, tuple[Any, ...]] | None = None) -> Any:
        """Start ``call(actor)`` (a Ray call) or, given ``lane`` (method, args) and a lane to ``actor``, the same
        call on the lane: what ``resolve`` waits for."""
        if lane is not None and self.lanes is not None:
            on_lane = self.lanes.start(actor, lane[0], *lane[1])
            if on_lane is not None:
                return on_lane
        return call(actor)

    def close(self) -> None:
        if self.lanes is not None:
            self.lanes.close()

    def resolve(self, pending: Sequence[_Pending], timeout: float) -> list[Any]:
        """The results of calls under way, in order. A standby that failed a write falls out of sync (it is
        rebuilt); a primary that died is replaced by its standby's result for a write, else ``ShardLostError``."""
        ray = _ray()
        deadline = time.monotonic() + timeout
        results = []
        for p in pending:
            try:
                result, died = _get(p.primary, max(0.1, deadline - time.monotonic())), None
            except (ray.exceptions.RayActorError, LaneBrokenError) as exc:
                result, died = None, exc
            except BaseException:
                self._settle_standby(p, deadline)
                raise
            standby_result = self._settle_standby(p, deadline, primary_died=died is not None)
            if died is not None:
                if p.standby is None:
                    raise ShardLostError(f"shard {p.shard}'s process died ({type(died).__name__})", p.shard) from None
                log.warning("shard %d's primary died during a call its standby completed; the standby takes over", p.shard)
                result = standby_result
            results.append(result)
        return results

    def _settle_standby(self, p: _Pending, deadline: float, primary_died: bool = False) -> Any:
        """The standby's result of a write; a standby that failed it, or (its primary alive) did not answer within
        ``standby_timeout``, falls out of sync (``p.standby`` None) and is rebuilt: a hung standby holds no step."""
        if p.standby is None:
            return None
        wait = deadline - time.monotonic() if primary_died else min(self.standby_timeout, deadline - time.monotonic())
        try:
            return _get(p.standby, max(0.1, wait))
        except Exception as exc:  # noqa: BLE001 - any failure puts the copy out of sync
            self._out_of_sync(p.shard, p.standby_actor, exc)
            p.standby = None
            return None

    def _out_of_sync(self, j: int, actor: Any, exc: BaseException) -> None:
        if self.standbys[j] is not actor:
            return  # promoted meanwhile
        dropped = sorted(name for shard, name in self.in_sync if shard == j)
        self.in_sync -= {(j, name) for name in dropped}
        log.warning("shard %d's standby failed a call (%s: %s); it is rebuilt from the primary", j, type(exc).__name__, exc)

    # -- jobs -------------------------------------------------------------------------------------------------

    def create_job(self, name: str, config: Any, spec: Any) -> RayShardGroup:
        data = config.SerializeToString()
        _ray().get([a.create_job.remote(name, data) for a in self._all()], timeout=CONTROL_TIMEOUT_S)
        self.jobs[name] = data
        # empty on both sides, and the primary hands its standby the initial weights: in sync from the start
        self.in_sync |= {(j, name) for j, standby in enumerate(self.standbys) if standby is not None}
        return RayShardGroup(self, name)

    def adopt_job(self, name: str, config: Any) -> RayShardGroup:
        """Job ``name`` as it is on the primaries already (a coordinator that restarted)."""
        self.jobs[name] = config.SerializeToString()
        return RayShardGroup(self, name)

    def connect(self, name: str, group: ShardGroup, coordinator: Any) -> None:
        ray = _ray()
        me = ray.get_runtime_context().current_actor
        ray.get([a.connect.remote(name, me) for a in self._all()], timeout=CONTROL_TIMEOUT_S)

    def delete_job(self, name: str) -> None:
        self._initialized.discard(name)
        for key in list(self._init_polls):  # (a copy: the loop may add one meanwhile)
            if key[0] == name:
                self._init_polls.pop(key, None)
        self.jobs.pop(name, None)
        self.in_sync = {(j, n) for j, n in self.in_sync if n != name}
        _ray().get([a.delete_job.remote(name) for a in self._all()], timeout=CONTROL_TIMEOUT_S)

    def recreate_job(self, name: str, config: Any, shards: Sequence[int]) -> None:
        """Job ``name`` anew, empty, on the primaries of ``shards`` (a rollback then fills it); their standbys
        fall out of sync until rebuilt."""
        ray = _ray()
        me = ray.get_runtime_context().current_actor
        self._initialized.discard(name)
        self.in_sync -= {(j, name) for j in shards}
        data = config.SerializeToString()
        ray.get([self.primaries[j].recreate_job.remote(name, data, me) for j in shards], timeout=CONTROL_TIMEOUT_S)

    def _all(self) -> list[Any]:
        return [a for a in (*self.primaries, *self.standbys) if a is not None]

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
        refs = [a.wait_for_version.remote(name, 0, INIT_POLL_S) for a in self.primaries]
        try:
            await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(r.future()) for r in refs)), INIT_POLL_S + CONTROL_TIMEOUT_S)
        except TimeoutError:  # a shard has no initial weights yet (a RayTaskError is an instance of its cause)
            return
        self._initialized.add(name)

    # -- health -----------------------------------------------------------------------------------------------

    def _identities(self, timeout: float) -> dict[Any, tuple[str, str] | None]:
        """Each process's (incarnation, address), or None if it is dead or restarting. A process that does not
        answer at once and whose gRPC port refuses connections is dead (Ray answers for it only once it has
        restarted, a second or more later); one that is only slow gets ``timeout`` seconds."""
        ray = _ray()
        refs = {a: a.identity.remote() for a in self._all()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=QUICK_ANSWER_S)
        deadline = time.monotonic() + timeout
        answers: dict[Any, tuple[str, str] | None] = {}
        for a, ref in refs.items():
            if ref not in ready and self._port_closed(a):
                answers[a] = None
                continue
            try:
                answers[a] = tuple(ray.get(ref, timeout=max(0.05, deadline - time.monotonic())))  # type: ignore[assignment]
                self._addresses[a] = answers[a][1]  # type: ignore[index]
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                answers[a] = None
        return answers

    def _port_closed(self, actor: Any) -> bool:
        """Whether the gRPC server of ``actor``'s last known process refuses connections (the process is gone)."""
        known = self._addresses.get(actor)
        if known is None:
            return False
        host, _, port = known.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=QUICK_ANSWER_S):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False  # unreachable or slow is not proof of death

    def _healthy(self, actor: Any, answer: tuple[str, str] | None) -> bool:
        if answer is None:
            return False
        known = self.incarnations.setdefault(actor, answer[0])
        return known == answer[0]

    def check(self, timeout: float) -> ShardCheck:
        """Find dead primaries and promote their standbys (those with a current copy of every job: a job whose
        copy was not current is listed in ``stale`` and rolls back). A primary with no standby to take over is
        waited for (Ray restarts it) up to ``timeout`` seconds and listed in ``lost``; ``TimeoutError`` if it
        is not back by then."""
        ray = _ray()
        found = ShardCheck()
        answers = self._answers = self._identities(IDENTITY_TIMEOUT_S)
        for j, primary in enumerate(self.primaries):
            if self._healthy(primary, answers[primary]):
                standby = self.standbys[j]
                if standby is not None and not self._healthy(standby, answers[standby]):
                    self.in_sync = {(s, n) for s, n in self.in_sync if s != j}  # rebuilt when it answers again
                continue
            standby = self.standbys[j]
            if standby is not None and self._healthy(standby, answers[standby]):
                self.primaries[j], self.standbys[j] = standby, primary
                stale = [name for name in self.jobs if (j, name) not in self.in_sync]
                self.in_sync = {(s, n) for s, n in self.in_sync if s != j}
                for name in stale:
                    found.stale.setdefault(name, []).append(j)
                found.taken_over[j] = answers[standby][1]  # type: ignore[index]
                ray.get(standby.set_role.remote("primary", None), timeout=CONTROL_TIMEOUT_S)
                continue
            found.lost[j] = self._wait_restarted(j, timeout)
        return found

    def _wait_restarted(self, j: int, timeout: float) -> str:
        ray = _ray()
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, address = ray.get(self.primaries[j].identity.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return address
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"shard {j} did not answer within {timeout:.0f}s ({type(exc).__name__})") from None
                time.sleep(0.1)

    def acknowledge(self, found: ShardCheck) -> None:
        """The jobs are back on the restarted primaries of ``found.lost``: their new incarnations are the ones."""
        ray = _ray()
        for j in found.lost:
            incarnation, _ = ray.get(self.primaries[j].identity.remote(), timeout=CONTROL_TIMEOUT_S)
            self.incarnations[self.primaries[j]] = incarnation

    def out_of_sync(self) -> list[tuple[int, str]]:
        """(shard, job) whose standby should be rebuilt now: it answered the last check and has no current copy."""
        return [
            (j, name) for j, standby in enumerate(self.standbys)
            if standby is not None and self._answers.get(standby) is not None for name in self.jobs if (j, name) not in self.in_sync
        ]

    def rebuild(self, j: int, name: str) -> bool:
        """Make shard j's standby a current copy of job ``name`` (the caller holds the job's coordinator lock, so
        no update runs meanwhile): the job re-created there, the primary's whole state copied over (straight
        from process to process), the primary told its standby. False when the primary has no initial weights
        yet or a process does not answer (a later check tries again)."""
        ray = _ray()
        primary, standby = self.primaries[j], self.standbys[j]
        answer = self._answers.get(standby)
        if answer is None:
            return False
        try:
            if not ray.get(primary.initialized.remote(name), timeout=CONTROL_TIMEOUT_S):
                return False
            me = ray.get_runtime_context().current_actor
            ray.get(standby.adopt_job.remote(name, self.jobs[name], me, primary.replica_state.remote(name)), timeout=CONTROL_TIMEOUT_S)
            ray.get([primary.set_role.remote("primary", standby), standby.set_role.remote("standby", None)], timeout=CONTROL_TIMEOUT_S)
            ray.get(primary.hand_open_mean.remote(name), timeout=CONTROL_TIMEOUT_S)  # a mean taken ahead before the copy
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            log.warning("shard %d's standby for job %s not rebuilt yet: %s", j, name, type(exc).__name__)
            return False
        self.incarnations[standby] = answer[0]
        self.in_sync.add((j, name))
        log.warning("shard %d's standby holds a current copy of job %s", j, name)
        return True


def _retrieve(task: asyncio.Task[Any]) -> None:
    # a round's error reaches the joins that wait on it; with none left, it is not "never retrieved"
    if not task.cancelled():
        task.exception()
