"""The coordinator of a job's steps: the one place where the order of a step's stages is written.

    push (shards accumulate) -> the step policy decides the step closes, over which workers
    -> aggregate (mean over them, per-tensor norms) -> clip (total norm, coefficient)
    -> update (each shard's optimizer) -> schedule (the global scheduler) -> broadcast (weights, version t+1)

Three counters, with separate names: ``step`` (the open training step: how many have closed), ``version``
(of the weights: what a pull waits for) and ``epoch`` (of the job's membership and shard map: workers
re-resolve shards when it changes). Under synchronous steps every closed step, skipped or not, publishes a
version, so ``version == step``; other policies may part them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from paramserver.core import clipping
from paramserver.core.coordinator_state import CoordinatorState
from paramserver.core.errors import (
    FutureStepError,
    JobFailedError,
    ShardLostError,
    StaleStepError,
)
from paramserver.core.job import JobSpec
from paramserver.core.membership import Membership, MembershipChange
from paramserver.core.policy import CloseStep, StepPolicy, policy_for
from paramserver.core.sharding import unpack
from paramserver.core.shards import ShardGroup

log = logging.getLogger("paramserver")

APPLIED_KEPT = 1024  # closed steps whose contributors are kept, to read a shard's older report against


@dataclass(frozen=True)
class StepResult:
    """What became of one closed step."""

    step: int
    total_norm: float
    clip_coef: float | None
    skipped: bool
    lrs: list[float]
    error: str | None = None  # set when the step was refused (non-finite norm with error_if_nonfinite)
    # time spent in each stage the coordinator runs, and "queued": how long the report that closed the step waited for
    # the job's lock (held by another call: another report, a checkpoint's copy, a membership change)
    seconds: dict[str, float] = field(default_factory=dict)
    contributors: tuple[int, ...] = ()  # the workers whose gradients the step averaged
    based_on: int | None = None  # the (oldest) version of the weights those gradients were computed on
    staleness: int | None = None  # the version the update was applied at minus ``based_on``


class StageTimer:
    """Adds up the wall time of named stages: ``with timer("clip"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class Coordinator(CoordinatorState):
    """Coordinates one job's steps over its shards.

    Shards receive the pushes; each tells the coordinator when it holds the gradients it waits for in the
    open step (``shard_ready``). The step policy (the one the job's config names unless given: ``policy_for``)
    decides which report closes the step and over which workers it averages; that call runs the rest of it.
    """

    def __init__(self, job: JobSpec, shards: ShardGroup, policy: StepPolicy | None = None) -> None:
        if len(shards) != job.plan.num_shards:
            raise ValueError(f"the job's plan has {job.plan.num_shards} shards, the group {len(shards)}")
        self.job = job
        self.config = job.config
        self.plan = job.plan
        self.schedule = job.schedule
        self.shards = shards
        self.policy: StepPolicy = policy if policy is not None else policy_for(job.config, job.plan.num_shards)
        self.membership = Membership(range(job.config.num_workers), job.config.workers_limit, job.config.lease_timeout)
        self.step = 0  # the open training step: every step before it has closed (updated or skipped)
        self.version = 0  # of the weights: pulls wait for it (min_version)
        self.epoch = 0  # of the membership and shard map; bump_epoch() when either changes
        self.generation = 0  # of the weights: every load starts a new one on every shard (they move together)
        self.skipped_steps = 0
        self.last_result: StepResult | None = None
        self._metrics: dict[int, dict[int, float]] = {}  # step -> worker -> metric
        self.on_step: Callable[[StepResult], None] | None = None  # told of every closed step (metrics, logs)
        # told of every membership change (metrics, logs), the lock held
        self.on_membership: Callable[[MembershipChange, int], None] | None = None
        self.failed: str | None = None  # set when an update failed part-way; cleared by load_state_dict
        self.interrupted = False  # a step's close stopped at a shard that died: ``recheck`` closes it later
        self._based_on: dict[int, int] = {}  # worker -> the version its reported push was computed on
        self._applied: dict[int, tuple[int, ...]] = {}  # step -> its contributors (the last APPLIED_KEPT steps)
        # shard -> (generation, step, workers, norms) of the mean it took ahead and reported (``shard_ready``)
        self._reduced_ahead: dict[int, tuple[int, int, tuple[int, ...], list[torch.Tensor | None]]] = {}
        self._lock = threading.RLock()

    def check_worker(self, worker: int) -> None:
        self.membership.check_rank(worker)

    # -- membership -------------------------------------------------------------------------------------------

    def join(self, worker: int) -> bool:
        """``worker`` is a member (again): the open step waits for its push too. True if it was not one."""
        with self._lock:
            if not self.membership.join(worker, self.step):
                return False
            self._members_changed()
            return True

    def leave(self, worker: int) -> bool:
        """``worker`` left: the open step no longer waits for it. True if it was a member."""
        with self._lock:
            if not self.membership.leave(worker, self.step):
                return False
            self._members_changed()
            return True

    def renew(self, worker: int) -> None:
        """A call of ``worker`` renews its lease (``NotAMemberError`` if it is not a member)."""
        with self._lock:
            self.membership.renew(worker)

    def expire_leases(self) -> list[int]:
        """Drop the members whose lease ran out; the open step closes if the others all pushed."""
        with self._lock:
            gone = self.membership.expire(self.step)
            if gone:
                log.warning("workers %s: lease expired at step %d; the steps go on without them", gone, self.step)
                self._members_changed(len(gone))
            return gone

    def _members_changed(self, changes: int = 1) -> None:
        if self.on_membership is not None:
            for change in list(self.membership.changes)[-changes:]:
                self.on_membership(change, len(self.membership.live))
        self.shards.set_members(self.membership.live)
        self.bump_epoch()
        self.recheck()

    def check_step(self, step: int) -> None:
        if self.failed is not None:
            raise JobFailedError(self.failed)
        # the errors carry the step to go on from (the wire calls it the current version)
        if step < self.step:
            raise StaleStepError(f"step {step} has already closed (now at {self.step})", self.step)
        if step > self.step:
            raise FutureStepError(f"step {step} is not open yet (now at {self.step})", self.step)

    def bump_epoch(self) -> int:
        """The membership or the shard map changed; returns the new epoch."""
        with self._lock:
            self.epoch += 1
            return self.epoch

    def record_metric(self, worker: int, step: int, metric: float) -> None:
        """A worker's metric for ``step`` (ReduceLROnPlateau steps on the workers' mean)."""
        if isinstance(metric, bool) or not isinstance(metric, (int, float)):
            raise ValueError(f"metric must be a number, got {type(metric).__name__}")
        with self._lock:
            self.check_worker(worker)
            self.check_step(step)
            self._metrics.setdefault(step, {})[worker] = float(metric)

    def shard_ready(
        self,
        shard: int,
        step: int,
        generation: int | None = None,
        holds: Mapping[int, int] | None = None,
        reduced: tuple[tuple[int, ...], list[torch.Tensor | None]] | None = None,
    ) -> StepResult | None:
        """Shard ``shard``, at version ``step``, holds the pushes of ``holds`` (worker -> the version its push was
        computed on; None: every member's, of this step); if the policy then closes the step, this call runs it
        (and any that the reports already complete) and returns the last result. ``generation``: the weights
        generation the report is of; a report from before a load (whose pushes the load dropped) is ignored.
        ``reduced``: the mean the shard took ahead (``Shard.reduce_ahead``: its workers and norms); a close over
        those workers uses its norms instead of asking the shard."""
        arrived = time.perf_counter()
        with self._lock:
            queued = time.perf_counter() - arrived  # behind another report, a checkpoint's copy, a membership change
            if generation is not None and generation != self.generation:
                log.debug("shard %d reported step %d of generation %d, now %d: ignored", shard, step, generation, self.generation)
                return None
            if self.failed is not None:
                raise JobFailedError(self.failed)
            members = self.membership.live
            held = dict.fromkeys(members, step) if holds is None else dict(holds)
            if step < self.step and self.policy.asynchronous:
                # an older report: the pushes applied since were consumed on every shard
                for version in range(step, self.step):
                    for worker in self._applied.get(version, ()):
                        held.pop(worker, None)
            else:
                self.check_step(step)
            self._based_on.update(held)
            if reduced is not None and step == self.step:
                self._reduced_ahead[shard] = (self.generation, step, tuple(reduced[0]), list(reduced[1]))
            return self._run(self.policy.on_shard_ready(shard, self.step, frozenset(held), members), queued)

    def _run(self, close: CloseStep | None, queued: float = 0.0) -> StepResult | None:
        """Close the steps the policy decided, one after another; the last one's result. ``queued``: how long the
        call that closes them waited for the lock (the first step's ``queued`` stage)."""
        result = None
        while close is not None:
            if close.step != self.step:
                raise ValueError(f"the step policy closed step {close.step}, but step {self.step} is open")
            closed = self._close_step(close, queued)
            if closed is None:
                break
            result, queued = closed, 0.0
            close = self.policy.after_close(self.step)
        return result

    def recheck(self) -> StepResult | None:
        """Ask every shard what it holds for the open step, as if each reported again, and close the step if the
        policy then says so. After a standby took over a shard (its reports went to a process that died), a
        coordinator restarted (reports sent while it was down are lost) or the membership changed; returns the
        last closed step."""
        with self._lock:
            if self.failed is not None:
                return None
            self.policy.reset()
            close = None
            members = self.membership.live
            for j, status in enumerate(self.shards.statuses()):
                if status["version"] == self.step:
                    held = frozenset(status["pushed"])
                    # what each push was computed on: a step this closes may hold pushes whose reports are still on
                    # their way (else its based_on, staleness and staleness_lr would take the open step)
                    self._based_on.update(status["holds"])
                    close = self.policy.on_shard_ready(j, self.step, held, members) or close
            return self._run(close)

    # -- the order of the stages ------------------------------------------------------------------------------

    def _close_step(self, close: CloseStep, queued: float = 0.0) -> StepResult | None:
        step, contributors = close.step, close.contributors
        clip = self.config.clip
        timer = StageTimer()
        timer.seconds["queued"] = queued  # the step was ready and waited for the job's lock: what a checkpoint's copy stalls
        # the norms of the shards that took this very mean ahead (their reports carried them); the others are asked
        known = {
            j: norms for j, (generation, at, who, norms) in self._reduced_ahead.items()
            if (generation, at, who) == (self.generation, step, tuple(contributors))
        }
        self._reduced_ahead.clear()
        with timer("aggregate"):
            try:
                norms = self.shards.reduce(step, clip.norm_type, clip.clip_value, contributors, known=known)
            except ShardLostError as exc:
                # Nothing was updated: the step stays open, and closes once the shard's standby has taken over
                # and holds the step's pushes again (``recheck``). A reduce that ran already runs again unchanged.
                log.warning("step %d did not close: %s; it closes once the shard is back", step, exc)
                self.interrupted = True
                return None
        self.interrupted = False
        based_on = min(self._based_on.pop(w, step) for w in contributors)
        seen = {"contributors": contributors, "based_on": based_on, "staleness": step - based_on}
        with timer("clip"):
            total = self._total_norm(norms)
        metrics = self._metrics.pop(step, {})
        metric = sum(metrics[w] for w in sorted(metrics)) / len(metrics) if metrics else None
        if not clipping.is_finite(total):
            error = None
            if clip.error_if_nonfinite:
                error = (
                    f"The total norm of order {clip.norm_type} for gradients is non-finite, so it cannot be clipped; "
                    "the step was skipped"
                )
            with timer("update"):
                self.shards.skip(step, self._record(step, None, None, applied=False, skipped=1))
            self.skipped_steps += 1
            return self._closed(StepResult(step, float(total), None, True, self.schedule.lrs(), error, timer.seconds, **seen))
        with timer("clip"):
            coef = clipping.clip_coefficient(total, clip.max_norm) if clip.max_norm is not None else None
        with timer("update"):
            try:
                hyperparameters = self._hyperparameters(step - based_on)
                self.shards.apply(step, coef, hyperparameters, self._record(step, coef, metric, applied=True, hyperparameters=hyperparameters))
            except Exception as exc:
                # Some shards may have updated and others not: no step can follow from that state.
                self.failed = f"the update of step {step} failed ({type(exc).__name__}: {exc}); load a saved state to go on"
                log.error("%s", self.failed)
                raise
        error = None
        with timer("schedule"):
            try:
                self.schedule.after_update(metric)
            except Exception as exc:  # the update happened: the step closes, the scheduler's error is reported
                error = f"the scheduler did not step after step {step}: {type(exc).__name__}: {exc}"
                log.error("%s", error)
        return self._closed(
            StepResult(
                step, float(total), None if coef is None else float(coef), False, self.schedule.lrs(), error, timer.seconds, **seen
            )
        )

    def _hyperparameters(self, staleness: int) -> list[dict[str, Any]]:
        """The groups' hyperparameters for an update; with ``staleness_lr``, learning rates divided by its staleness."""
        hyperparameters = self.schedule.hyperparameters()
        if self.config.staleness_lr and staleness > 1:
            hyperparameters = [{**group, "lr": group["lr"] / staleness} for group in hyperparameters]
        return hyperparameters

    def _record(
        self, step: int | None, coef: torch.Tensor | None, metric: float | None, *, applied: bool, skipped: int = 0,
        hyperparameters: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """What the shards keep with a step (or a load, ``step`` None) so that a coordinator that restarts goes
        on where this one was (``resume``): the job's version and generation after it, the schedule as it was
        for the step's update, the metric it then steps on (``applied``), and the update itself (to finish it
        on a shard it did not reach)."""
        return {
            "version": self.step + 1 if step is not None else self.step,
            "generation": self.generation,
            "schedule": self.schedule.snapshot(),
            "metric": metric,
            "applied": applied,
            "skipped_steps": self.skipped_steps + skipped,
            "update": None if step is None else {
                "step": step, "clip_coef": coef, "skipped": not applied, "hyperparameters": hyperparameters or self.schedule.hyperparameters(),
            },
        }

    def _closed(self, result: StepResult) -> StepResult:
        self._applied[result.step] = result.contributors  # an older report of a shard is read against these
        self._applied.pop(result.step - APPLIED_KEPT, None)
        self.step += 1
        self.version += 1  # broadcast: the shards published version t+1 (a skipped step's too), pulls may be served
        self.last_result = result
        if self.on_step is not None:
            self.on_step(result)
        return result

    def _total_norm(self, norms_per_shard: list[list[torch.Tensor | None]]) -> torch.Tensor:
        """The total norm over the parameters that have a gradient (a shard reports None for the others)."""
        pieces: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for shard, norms in zip(self.plan.shards, norms_per_shard, strict=True):
            for s, n in zip(shard, norms, strict=True):
                if n is not None:
                    pieces.setdefault(s.param, []).append((s.start, n))
        norm_type = self.config.clip.norm_type
        present = [p for p in self.plan.params if p.index in pieces]
        per_param = [clipping.combine_piece_norms([n for _, n in sorted(pieces[p.index], key=lambda x: x[0])], norm_type) for p in present]
        return clipping.total_norm(per_param, [p.dtype for p in present], norm_type)

    # -- broadcast --------------------------------------------------------------------------------------------

    def parameters(self) -> list[torch.Tensor]:
        """The current weights, one new tensor per parameter, in index order."""
        out = [torch.empty(p.shape, dtype=p.dtype) for p in self.plan.params]
        for j, buffers in enumerate(self.shards.weights()):
            unpack(self.plan, j, buffers, out)
        return out

    def get_last_lr(self) -> list[float]:
        return self.schedule.lrs()

    # -- a coordinator that is new to a running job ----------------------------------------------------------

    def resume(self) -> StepResult | None:
        """Go on with a job whose shards trained under a coordinator that is gone (this one is new, at step 0):
        take the step, generation and schedule from the newest record the shards kept, finish the last update
        on any shard it did not reach (the coordinator died while sending it), then close the open step if
        every push is in. Returns the step that closed, if one did."""
        with self._lock:
            statuses, records = self.shards.statuses(), self.shards.records()
            kept = [r for r in records if r is not None]
            newest = max(kept, key=lambda r: (r["generation"], r["version"])) if kept else None
            if newest is None:  # no step closed and nothing loaded: a new job
                self.step = self.version = max(s["version"] for s in statuses)
                return self.recheck()
            update = newest["update"]
            for j, status in enumerate(statuses):
                if status["generation"] != newest["generation"] or status["version"] == newest["version"]:
                    continue
                if update is None or status["version"] != update["step"] or not status["reduced"]:
                    self.failed = (
                        f"shard {j} is at version {status['version']} and the job at {newest['version']}; it cannot "
                        f"catch up (the coordinator died during a load or before the update reached it): load a saved state"
                    )
                    log.error("%s", self.failed)
                    return None
                shard = self.shards.shards[j]
                if update["skipped"]:
                    shard.skip(update["step"], newest)
                else:
                    shard.apply(update["step"], update["clip_coef"], update["hyperparameters"], newest)
                log.warning("shard %d had not received the update of step %d: applied it now", j, update["step"])
            self.step = self.version = newest["version"]
            self.generation = newest["generation"]
            self.skipped_steps = newest["skipped_steps"]
            self.schedule.resume(newest["schedule"])
            if newest["applied"]:
                try:
                    self.schedule.after_update(newest["metric"])
                except Exception as exc:  # noqa: BLE001 - as when the step closed: reported, the step stands
                    log.error("the scheduler did not step after step %d: %s: %s", self.step - 1, type(exc).__name__, exc)
            return self.recheck()
