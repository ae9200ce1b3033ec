"""``RemoteOptimizer``: a drop-in for a ``torch.optim`` optimizer whose state lives in the service.

    opt = RemoteOptimizer(model.named_parameters(), torch.optim.Adam, lr=1e-3, address=server.address,
                          job="demo", num_workers=2, rank=rank, clip_grad_norm=1.0)
    for x, y in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()          # push the gradients, wait for the step, write the new weights into the model

Rank 0 creates the job with the model's initial weights; other ranks join it and start from the server's
weights, as DDP starts from rank 0's.

Membership: from its join until ``leave()`` (or ``close()``) a daemon thread renews this worker's lease every
``lease_timeout / 3`` seconds, so a long forward/backward never lets it expire. A worker the job dropped (its
lease ran out, it left) gets ``NotAMemberError`` from ``step()``; ``rejoin()`` joins again with the same rank,
pulls the current weights into the model and sets ``step_count``. ``last_step`` says what the last closed step
averaged.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, wait
from typing import Any

import torch

from paramserver.core.config import SchedulerSpec, default_of, job_config_from_kwargs
from paramserver.core.errors import (
    JobNotFoundError,
    NonFiniteGradientError,
    NotAMemberError,
    RolledBackError,
    StaleStepError,
    StateReloadedError,
    StepMismatchError,
)
from paramserver.core.malloc import fix_mmap_threshold
from paramserver.core.params import normalize_params
from paramserver.wire import jobconfig, json_values
from workers.buffers import ShardBuffers
from workers.client import ServiceClient
from workers.lease import LeaseRenewer
from workers.membership import WorkerMembership

log = logging.getLogger("paramserver")

_RESYNC_TRIES = 10
_MAX_RECOVERIES = 5  # shard losses one step() gets over (a shard may die again while it recovers)


class NonFiniteNormError(RuntimeError):
    """The step's total gradient norm was not finite under ``error_if_nonfinite=True``: as
    ``clip_grad_norm_`` raises, ``step()`` raises; the service skipped the step (weights, state and
    scheduler unchanged) and ``step_count`` has moved past it."""


class RemoteOptimizer(WorkerMembership):
    def __init__(
        self,
        params: Any,
        optimizer: Any,
        *,
        address: str,
        job: str = "default",
        rank: int = 0,
        # The job's options, torch-style: each is a field of paramserver.core.config.JobConfig, with its default
        # from there (REMOTE_OPTIMIZER_KWARGS says which; tests/workers keep the two in step).
        num_workers: int = default_of("num_workers"),
        max_workers: int | None = default_of("max_workers"),
        min_workers: int = default_of("min_workers"),
        lease_timeout: float = default_of("lease_timeout"),
        close_after: int | None = default_of("close_after"),
        mode: str = default_of("mode"),
        max_staleness: int | None = default_of("max_staleness"),
        staleness_lr: bool = default_of("staleness_lr"),
        clip_grad_norm: float | None = default_of("clip.max_norm"),
        norm_type: float = default_of("clip.norm_type"),
        error_if_nonfinite: bool = default_of("clip.error_if_nonfinite"),
        clip_grad_value: float | None = default_of("clip.clip_value"),
        scheduler: Any = None,
        scheduler_kwargs: dict[str, Any] | None = None,
        scheduler_interval: int = 1,
        nonfinite: str = default_of("nonfinite"),
        deterministic: bool = default_of("deterministic"),
        split_threshold_bytes: int | None = default_of("split_threshold_bytes"),
        grad_dtype: torch.dtype | None = default_of("grad_dtype"),
        # How this worker talks to the service.
        push_during_backward: bool = False,
        transport: str = "auto",
        route: str = "auto",
        auth_token: str | None = None,
        root_certificates: bytes | None = None,
        client_certificate: tuple[bytes, bytes] | None = None,
        timeout: float = 60.0,
        join_timeout: float = 120.0,
        **optimizer_kwargs: Any,
    ) -> None:
        spec = SchedulerSpec(scheduler, dict(scheduler_kwargs or {}), scheduler_interval) if scheduler is not None else None
        config = job_config_from_kwargs(
            optimizer, optimizer_kwargs, spec, num_workers=num_workers, max_workers=max_workers, min_workers=min_workers,
            lease_timeout=lease_timeout, close_after=close_after, mode=mode, max_staleness=max_staleness,
            staleness_lr=staleness_lr, clip_grad_norm=clip_grad_norm, norm_type=norm_type,
            error_if_nonfinite=error_if_nonfinite, clip_grad_value=clip_grad_value, nonfinite=nonfinite,
            deterministic=deterministic, split_threshold_bytes=split_threshold_bytes, grad_dtype=grad_dtype,
        )
        # ranks from num_workers up to max_workers join a running job
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < config.workers_limit:
            raise ValueError(f"rank must be in [0, {'max_workers' if max_workers is not None else 'num_workers'}={config.workers_limit}), got {rank!r}")
        self._groups = normalize_params(params)
        self._params = self._groups.params
        self._tensors = self._groups.tensors  # the model's parameters: new weights are written into them
        if push_during_backward and rank == 0 and nonfinite == "error":
            raise ValueError('push_during_backward needs nonfinite="skip": under "error" all gradients are checked before any is pushed')
        self.rank = rank
        self.timeout = timeout
        self.join_timeout = join_timeout
        self.grad_dtype = grad_dtype
        self._wire_buffers: dict[int, list[torch.Tensor]] = {}  # per shard, the gradients in grad_dtype (``_wire``)
        self.client = ServiceClient(
            address, job, auth_token=auth_token, root_certificates=root_certificates, client_certificate=client_certificate, timeout=timeout,
            transport=transport, route=route,
        )
        # Membership: the lease renewals' thread and its stop event, whether this worker left, and a refusal
        # (NotAMemberError) the renewals met, raised by the next step()
        self._renewal: LeaseRenewer | None = None
        self._left = False
        self._not_a_member: NotAMemberError | None = None
        self._membership_lock = threading.Lock()
        try:
            if rank == 0:
                info = self.client.create_job(jobconfig.to_proto(config, self._groups))
                self.buffers = ShardBuffers(self.plan, self._tensors)
                if not info.ready:
                    self.client.push_initial_weights(self.buffers.weights)
            else:
                info = self.client.join_job(rank, timeout=join_timeout)
                self._check_same_params()
                self.buffers = ShardBuffers(self.plan, self._tensors)
            self._attach_shared_memory()
            # Every worker remembers the generation of its weights (a load starts a new one; a push computed
            # on another generation's weights is refused): rank 0 that just gave a new job its weights holds
            # the first one; every other worker starts from the server's weights and their generation.
            self.generation: int | None = 0
            if rank == 0 and not info.ready:
                self.step_count = info.version
            else:
                self.step_count = self._resync(info.version)
            # Under nonfinite="error" every shard must refuse the same push, so the check is made here,
            # before anything leaves: a gradient pushed during backward could not be taken back.
            self._refuse_nonfinite = info.config.nonfinite == "error"
            # backup workers: a step may close without this worker's push (then it pulls and goes on)
            self._backup_workers = info.config.HasField("close_after")
            # As clip_grad_norm_(error_if_nonfinite=True): a step whose total norm is not finite raises here.
            self._error_if_nonfinite = info.config.clip.error_if_nonfinite
            if push_during_backward and self._refuse_nonfinite:
                raise ValueError('push_during_backward needs nonfinite="skip": under "error" all gradients are checked before any is pushed')
            self.push_during_backward = push_during_backward
            self._in_flight: dict[int, Future] = {}
            # the step last pushed, and per shard the parameters it had no gradient for (a push again resends them)
            self._sent_step: int | None = None
            self._sent_missing: dict[int, list[int]] = {}
            # The parameters backward has reached since their gradients were last set to None: one it has not
            # reached has no gradient (torch.optim would skip it), although its place in the buffers holds zeros.
            self._touched: set[int] = set()
            self._arm_hooks()
            self._start_renewal(info)
        except BaseException:
            self._stop_renewal()
            self.client.close()
            raise

    @property
    def plan(self):  # noqa: ANN201 - the job's ShardingPlan
        assert self.client.plan is not None
        return self.client.plan

    def _check_same_params(self) -> None:
        theirs = [(p.name, p.shape, p.dtype) for p in self.plan.params]
        mine = [(p.name, p.shape, p.dtype) for p in self._params]
        if theirs != mine:
            raise ValueError(f"this worker's parameters do not match job {self.client.job!r}: {mine} vs the server's {theirs}")

    # -- the torch.optim surface -----------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The groups as torch shows them: this worker's parameters with each group's hyperparameters for
        the next step, as the service's scheduler has set them."""
        hyperparameters = [json_values.loads(text) for text in self.client.status().param_groups_json]
        groups = []
        for g, values in enumerate(hyperparameters):
            groups.append({**values, "params": [self._tensors[p.index] for p in self._params if p.group == g]})
        return groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Where they are views into the buffers the push sends from, they stay views
        (the next backward writes where the push reads). As in torch, a parameter backward has not reached
        since its gradient was last set to None has no gradient, and the service skips it."""
        self.buffers.zero_grads(set_to_none)
        if set_to_none:
            self._touched.clear()

    def step(self, closure: Callable[[], Any] | None = None, *, metric: float | None = None) -> Any:
        """Push this worker's gradients, wait for the step to close, write the new weights in place.

        If a state was loaded since this worker's weights were pulled (by another worker, or while this one
        waited), the gradients are not applied: the loaded weights are pulled into the model, ``step_count``
        becomes the loaded step and ``StateReloadedError`` is raised, whose ``.step`` is that step. Catch it
        and go on from ``err.step`` (recompute the gradients on the new weights).

        If a shard died, this worker joins again (the coordinator checks its shards) and reconnects to the
        shards' new addresses. With ``replicas=1`` a standby took over with no step lost (the job's weights
        generation is unchanged): the step's pushes are made again to the new primaries and the pull retried,
        and ``step()`` returns as usual; a takeover is invisible to the training loop (up to
        ``_MAX_RECOVERIES`` of them in one step, then the error is raised). With ``replicas=0`` the job rolled
        back to its newest checkpoint: this worker pulls the checkpoint's weights into the model, sets
        ``step_count`` to its step and raises ``RolledBackError`` (a ``StateReloadedError``) with that
        ``.step``. Without a checkpoint the job has failed: ``JobFailedError``.

        Under backup workers (``close_after``), a step may close on the other workers' pushes before this one's
        arrived: its gradients are not applied, the model gets the new weights, ``step_count`` moves to the
        job's step and ``step()`` returns as usual (``last_step`` shows who contributed)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._raise_if_not_a_member()
        step = self.step_count
        if metric is not None:
            if self.push_during_backward:
                raise ValueError("step(metric=...) needs push_during_backward=False: the step may close before the metric arrives")
            try:
                self.client.report_metric(self.rank, step, float(metric))
            except StepMismatchError as exc:  # the job is at another step: a load (or rollback) since this worker's weights
                self._reloaded(exc.version)
        if self._refuse_nonfinite:
            grads = self.buffers.gather_grads()
            if not all(bool(torch.isfinite(b).all()) for shard in grads for b in shard):
                raise NonFiniteGradientError(f"worker {self.rank}: gradients of step {step} hold inf or nan; nothing was pushed")
        try:  # shards whose gradients were not pushed during backward go now
            for j in range(self.plan.num_shards):
                if j not in self._in_flight:
                    self._in_flight[j] = self._push_shard(step, j)
        finally:
            pushes, self._in_flight = self._in_flight, {}
            self._waiting = [len(m) for m in self.buffers.members]
        generation = self.generation
        recoveries = 0
        while True:
            failures, given_up = self._await_pushes(pushes)
            lost = next((exc for exc in failures.values() if _shard_lost(exc)), None)
            if lost is None:
                late = self._closed_without_me(failures)
                if late is not None:  # backup workers: the step closed on the others' pushes; go on from the next
                    self.step_count = self._resync(late)
                    return loss
                self._raise_refusal(failures, after_takeover=recoveries > 0)
                replies = self._pulled_with(pushes)
                if replies is not None:
                    break
                try:
                    replies = self.client.pull(self.rank, step + 1, destinations=self.buffers.weights, generation=generation)
                    break
                except (ConnectionError, JobNotFoundError) as exc:
                    lost = exc
            if recoveries == _MAX_RECOVERIES:
                raise lost
            moved = self._recover(lost)  # raises unless a standby took over
            recoveries += 1
            # The new primaries lost the open step's pushes; the gradient buffers are intact (a pull writes only
            # the weights). Pushes are idempotent: one whose step closed already answers "applied".
            pushes = {j: self._push_shard(step, j) for j in sorted({*failures, *moved, *given_up})}
        if any(g != generation for g in self.client.generations):
            self._reloaded(min(version for version, _ in replies))  # a load happened while this worker waited
        versions = {version for version, _ in replies}
        if len(versions) > 1:
            # asynchronous steps: another worker's update landed on some shards during the pull; take it everywhere
            self.step_count = self._resync(max(versions))
        else:
            self.buffers.scatter_weights()
            self.step_count = versions.pop()  # step + 1 under synchronous steps; the newest version under async
        if self._error_if_nonfinite:
            self._raise_if_refused(step)
        return loss

    def _await_pushes(self, pushes: dict[int, Future]) -> tuple[dict[int, BaseException], list[int]]:
        """Wait for the pushes until every one ended or one failed: (the error of each that failed, by shard; the
        shards whose push was given up, still under way). A push that pulls too answers only once the step
        closes, which a failed push elsewhere may keep from happening: such pushes are cancelled, and go again
        with the failed one if the step goes on (a push is idempotent)."""
        done, under_way = wait(pushes.values(), timeout=self.timeout + 5, return_when=FIRST_EXCEPTION)
        failures: dict[int, BaseException] = {}
        given_up: list[int] = []
        errors = {f: _error(f) for f in done}
        for j, future in pushes.items():
            if future in done:
                if errors[future] is not None:
                    failures[j] = errors[future]  # type: ignore[assignment]
            elif any(e is not None for e in errors.values()):
                future.cancel()
                given_up.append(j)
            else:
                failures[j] = TimeoutError(f"worker {self.rank}: the push to shard {j} did not answer within {self.timeout + 5:.0f} s")
        return failures, given_up

    def _pulled_with(self, pushes: dict[int, Future]) -> list[tuple[int, list[torch.Tensor]]] | None:
        """The pull's answer where the pushes of every shard pulled too (all through shared memory: one call per
        shard a step, ``_push_shard``); None where the step still needs its pull."""
        if sorted(pushes) != list(range(self.plan.num_shards)):
            return None  # a round of pushes again after a takeover: the shards not in it pulled already, or not
        return self.client.pulled([pushes[j].result() for j in range(self.plan.num_shards)], destinations=self.buffers.weights)

    def _closed_without_me(self, failures: dict[int, BaseException]) -> int | None:
        """Under backup workers, the version to go on from when the step closed before this worker's pushes all
        arrived (every refusal is a stale step); None otherwise."""
        if not self._backup_workers or not failures or not all(isinstance(e, StaleStepError) for e in failures.values()):
            return None
        return max(e.version for e in failures.values())  # type: ignore[attr-defined]

    def _raise_refusal(self, failures: dict[int, BaseException], after_takeover: bool) -> None:
        """Raise what the shards answered to pushes that failed with their shard alive: a load since this
        worker's weights first (after a takeover the job's generation did not change, so a shard of another
        one means the job rolled back after all), then any other error."""
        for exc in failures.values():
            if isinstance(exc, StateReloadedError):
                if after_takeover:
                    self._rolled_back(exc)
                self._reloaded(exc.version)
        for exc in failures.values():
            if isinstance(exc, NotAMemberError):  # dropped (lease expired, left): no retry; rejoin() to go on
                self._stop_renewal()
                self._not_a_member = exc
                raise exc
        if failures:
            raise next(iter(failures.values()))

    def _raise_if_refused(self, step: int) -> None:
        # Under synchronous steps no later step closes before this worker pushes again, so the last
        # step the service reports is this one.
        last = self.client.status().last_step
        if last.step == step and last.skipped and last.error:
            raise NonFiniteNormError(f"worker {self.rank}: {last.error}")

    # -- pushing during backward -------------------------------------------------------------------------------

    def _arm_hooks(self) -> None:
        """Note each parameter backward reaches; with push_during_backward, push shard j's gradients as soon
        as backward has accumulated every parameter it holds."""
        self._waiting = [len(m) for m in self.buffers.members]
        shards_of: dict[int, list[int]] = {}
        for j, members in enumerate(self.buffers.members):
            for index in members:
                shards_of.setdefault(index, []).append(j)
        for index, param in enumerate(self._tensors):
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, index, shards_of.get(index, [])))

    def _grad_ready(self, index: int, shards: list[int], param: torch.Tensor) -> None:
        self._touched.add(index)
        if not self.push_during_backward:
            return
        for j in shards:
            if j in self._in_flight:
                raise RuntimeError(
                    "push_during_backward sends each shard's gradients once per step, at the end of backward; "
                    "a second backward before step() (gradient accumulation) needs push_during_backward=False"
                )
            self._waiting[j] -= 1
            if self._waiting[j] == 0:
                self._in_flight[j] = self._push_shard(self.step_count, j)

    def _push_shard(self, step: int, shard: int) -> Future:
        if self._sent_step != step:
            self._sent_step, self._sent_missing = step, {}
        missing = self._sent_missing.get(shard)
        if missing is None:
            # before gather: parameters without a gradient are skipped, as in torch
            missing = self._sent_missing[shard] = self.buffers.missing(shard, self._touched)
            grads = self.buffers.gather_grads(shard)[shard]
        else:
            # the same step again (a standby took over): the same gradients, still in their buffers, and the same
            # list of parameters without one (gather pointed every .grad at its buffer, so it cannot be read again)
            grads = self.buffers.grads[shard]
        # through shared memory on every shard, the push is the step's pull too: it answers once step + 1 is there
        pull = step + 1 if self.client.transport_in_use == "shared_memory" else None
        return self.client.push_shard(self.rank, step, shard, self._wire(shard, grads), missing, self.generation, pull_min_version=pull)

    def _wire(self, shard: int, buffers: list[torch.Tensor]) -> list[torch.Tensor]:
        """Gradients in the dtype they travel in (the shard accumulates them in the parameters' dtype), in buffers
        kept from step to step. Through shared memory nothing travels: the gradients are rounded to that dtype in
        place, so that the job trains the same on either transport."""
        if self.grad_dtype is None:
            return buffers
        scratch = self._wire_buffers.get(shard)
        if scratch is None:
            scratch = self._wire_buffers[shard] = [torch.empty(b.shape, dtype=self.grad_dtype if b.is_floating_point() else b.dtype) for b in buffers]
        for out, b in zip(scratch, buffers):
            out.copy_(b)
        if self.client.shared[shard] is None:
            return scratch
        for b, rounded in zip(buffers, scratch):
            b.copy_(rounded)
        return buffers

    def _attach_shared_memory(self, shards: list[int] | None = None) -> None:
        """Move the buffers of ``shards`` (None: all) into the shared memory of those on this host, back into
        memory of their own for the others (``transport`` decides; see ``ServiceClient.attach_shared_memory``).
        Under synchronous steps the model's parameters then are the job's weights on this host: an in-place write
        to them (``model.load_state_dict``) changes them for every worker here, as in one process."""
        targets = range(self.plan.num_shards) if shards is None else shards
        shared = self.client.attach_shared_memory(self.rank, list(targets))
        for j in targets:
            s = shared[j]
            if s is not None:
                self.buffers.place(j, s.grads, s.weights, weights_hold_values=s.weights_shared)
            elif j in self.buffers.elsewhere:
                self.buffers.place(j)  # was in shared memory: memory of its own again
        self.transport = self.client.transport_in_use  # "shared_memory", "grpc" or "mixed"
        if self.transport != "shared_memory":
            # the wire's megabyte buffers go back to the OS when freed (see paramserver.core.malloc); not under
            # shared memory alone, where there are none and the fixed threshold would make every large
            # temporary of backward a fresh mapping (on the benchmark's MLP: 25 -> 38 ms a backward)
            fix_mmap_threshold()
        try:  # status shows it from now (every lease renewal names it)
            self.client.renew_lease(self.rank)
        except (ConnectionError, LookupError, TimeoutError, NotAMemberError) as exc:
            log.debug("worker %d: lease renewal after attaching: %s", self.rank, exc)

    def _resync(self, min_version: int) -> int:
        """Each shard's weights once at ``min_version``, straight into the model (the buffers its parameters
        are views of), all shards in parallel, and their generation; returns their version. Pulls again
        while the shards disagree (a load under way)."""
        for _ in range(_RESYNC_TRIES):
            replies = self.client.pull(self.rank, min_version, destinations=self.buffers.weights)
            generations, versions = set(self.client.generations), {version for version, _ in replies}
            if len(generations) == 1 and len(versions) == 1:
                self.buffers.scatter_weights()
                self.generation = generations.pop()
                return versions.pop()
            min_version = max(versions)
        raise RuntimeError(
            f"worker {self.rank}: the shards of job {self.client.job!r} kept disagreeing on their weights "
            f"(versions {sorted(versions)}, generations {sorted(generations, key=str)}) over {_RESYNC_TRIES} pulls"
        )

    def _recover(self, error: BaseException) -> list[int]:
        """A shard was unreachable: join again, which has the coordinator check its shards (a standby takes
        over a dead primary under ``replicas=1``; the job rolls back to a checkpoint under ``replicas=0``).
        Returns the shards whose address changed while the job's weights generation stayed this worker's: a
        standby took over with no step lost. Raises ``error`` if no shard moved; if the generation changed the
        job rolled back: takes the rolled-back weights and raises ``RolledBackError``. A job that could not roll
        back raises its ``JobFailedError``."""
        info = self.client.join_job(self.rank, timeout=self.join_timeout)
        if not self.client.moved:
            raise error
        self._attach_shared_memory(self.client.moved)  # the gradients go along: the open step is pushed again
        if info.generation != self.generation:
            self._rolled_back(error)
        self._check_same_params()
        return list(self.client.moved)

    def _rolled_back(self, error: BaseException) -> None:
        """The job rolled back to its newest checkpoint: take its weights and raise ``RolledBackError``."""
        self._check_same_params()
        self.step_count = self._resync(0)
        raise RolledBackError(
            f"worker {self.rank}: shard(s) {self.client.moved} of job {self.client.job!r} died and the job rolled back "
            f"to its newest checkpoint; this step's gradients were not applied. The model now holds the weights of "
            f"step {self.step_count}: go on from there",
            self.step_count,
        ) from error

    def _reloaded(self, min_version: int) -> None:
        """A state was loaded since this worker's weights: take the loaded ones and raise, with the step to go on from."""
        try:
            self.step_count = self._resync(min_version)
        except (ConnectionError, JobNotFoundError) as exc:
            self._recover(exc)  # raises unless a standby took over: then pull from it
            self.step_count = self._resync(min_version)
        raise StateReloadedError(
            f"worker {self.rank}: a state was loaded into job {self.client.job!r} since this worker's weights; its gradients "
            f"were not applied. The model now holds the loaded weights: go on from step {self.step_count}",
            self.step_count,
        )

    def get_last_lr(self) -> list[float]:
        return list(self.client.status().lrs)

    def state_dict(self) -> dict[str, Any]:
        return self.client.get_state()

    def load_state_dict(self, state_dict: dict[str, Any], step: int | None = None) -> None:
        """Load a state in torch's formats into the job, for every worker. The job goes on from ``step``
        (None: the step the state says, its optimizer's per-parameter "step" or its scheduler's last_epoch,
        else the step it is at). This worker then holds the loaded weights and ``step_count`` says the loaded
        step; every other worker's next ``step()`` raises ``StateReloadedError`` once it holds them too."""
        self.client.load_state(state_dict, step)
        self.step_count = self._resync(0)

    def close(self) -> None:
        try:
            self.leave()
        except (ConnectionError, LookupError, TimeoutError, ValueError, RuntimeError):
            pass  # the server may be gone already; closing must not fail
        finally:
            self._stop_renewal()
            self.client.close()

    def __enter__(self) -> RemoteOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(future: Future) -> BaseException | None:
    """The error of a finished push (a cancelled one: ``CancelledError``), None where it succeeded."""
    return CancelledError("the push was cancelled") if future.cancelled() else future.exception()


def _shard_lost(error: BaseException) -> bool:
    """A push's error that says its shard is gone (unreachable, or a restarted one without the job)."""
    return isinstance(error, (ConnectionError, JobNotFoundError))
