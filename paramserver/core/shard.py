"""A shard: its slice of the parameters, a real ``torch.optim`` optimizer over that slice, one step's gradients.

Plain Python and torch: no Ray, no gRPC. The hosting layer wraps it in an actor, the wire layer feeds it.
Weights and gradients live in flat buffers (one per dtype); the optimizer's parameters are views into the
weight buffers and their ``.grad`` are views into the gradient sums, so the update runs in place.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from paramserver.core.aggregation import GradientAccumulator
from paramserver.core.blocked import BlockedStep, leaf_over
from paramserver.core.errors import (
    FutureStepError,
    JobFailedError,
    NonFiniteGradientError,
    NotAMemberError,
    NotReadyError,
    StaleStepError,
    StateReloadedError,
)
from paramserver.core.kernels import keep_kernel, kernel_choice
from paramserver.core.scheduling import build_optimizer, set_hyperparameters
from paramserver.core.shard_copies import ShardCopies, SnapshotWrite, _after_copy, _locked
from paramserver.core.shard_mean import HeldMean, ShardMean
from paramserver.core.sharding import ShardingPlan, Slice
from paramserver.core.staleness import AsyncLedger

__all__ = ["Shard", "SnapshotWrite"]  # SnapshotWrite: where callers have always imported it from


class Shard(ShardCopies, ShardMean):
    def __init__(
        self,
        shard_id: int,
        plan: ShardingPlan,
        weights: Sequence[torch.Tensor],
        optimizer_cls: type,
        group_options: Sequence[dict[str, Any]],
        optimizer_kwargs: dict[str, Any],
        *,
        num_workers: int,
        members: Collection[int] | None = None,
        quorum: int | None = None,
        mode: str = "sync",
        max_staleness: int | None = None,
        deterministic: bool = True,
        reject_nonfinite: bool = False,
        device: str | torch.device = "cpu",
        initialized: bool = True,
        grad_dtype: torch.dtype | None = None,
        clip: tuple[float, float | None] | None = None,
    ) -> None:
        self.shard_id = shard_id
        self.plan = plan
        self.layouts = plan.buffers(shard_id)
        self.device = torch.device(device)
        self.num_workers = num_workers  # ranks are in [0, num_workers)
        # the job's members: the ranks whose pushes the open step waits for (None: all of them)
        self.members = frozenset(range(num_workers) if members is None else members)
        self.quorum = quorum  # how many members' pushes make the step ready (None: all of them)
        # asynchronous steps: each worker's push is its own update (None: synchronous steps)
        self.ledger = AsyncLedger(max_staleness) if mode == "async" else None
        self.reject_nonfinite = reject_nonfinite
        # the job's clipping (norm_type, clip_value): what a mean taken ahead uses (None: never reduce ahead)
        self.ahead_clip = clip
        self._ahead_clip: tuple[float, float | None] | None = None  # what the last mean taken ahead used
        # the dtype gradients travel in (the job's grad_dtype; None: the parameters'); they are summed in the latter
        self.grad_dtype = grad_dtype
        if len(weights) != len(self.layouts):
            raise ValueError(f"shard {shard_id}: expected {len(self.layouts)} weight buffers, got {len(weights)}")
        self.weights = [w.detach().to(self.device, copy=True) for w in weights]
        self._check_buffers(self.weights, "initial weights", exact_dtype=True)
        # False until the creator's initial weights are in (a shard made from a job description alone).
        self.initialized = initialized
        # One lock for the shard's state: pushes (gRPC threads) and the coordinator's calls (reduce, apply,
        # load) never interleave; waiting for a version releases it.
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Called (no arguments) after every version change, the lock held: they must not block (see add_version_listener).
        self._version_listeners: tuple[Callable[[], None], ...] = ()
        # Its own lock, not the shard's: adding a listener (an event loop's thread) never waits for an update.
        self._listeners_lock = threading.Lock()
        sums = [torch.zeros(layout.numel, dtype=layout.dtype, device=self.device) for layout in self.layouts]
        self.accumulator = GradientAccumulator(sums, num_workers, deterministic, carry_over=self.ledger is not None)

        # One optimizer parameter per slice: whole tensors keep their shape, pieces of a split tensor are 1-D.
        self.slices: list[Slice] = []
        self.tensors: list[torch.Tensor] = []
        self._weight_views: list[torch.Tensor] = []
        self._grad_views: list[torch.Tensor] = []
        for layout, flat, grad_flat in zip(self.layouts, self.weights, sums):
            for s, off in zip(layout.slices, layout.offsets):
                shape = plan.params[s.param].shape if plan.is_whole(s) else (s.numel,)
                self._weight_views.append(flat[off : off + s.numel].view(shape))
                tensor = leaf_over(self._weight_views[-1])
                self._grad_views.append(grad_flat[off : off + s.numel].view(shape))
                tensor.grad = self._grad_views[-1]
                self.slices.append(s)
                self.tensors.append(tensor)
        assert self.slices == list(plan.shards[shard_id]), "per-slice lists follow the plan's slice order"
        self._params_here = {s.param for s in self.slices}
        self._with_grad: set[int] = set()  # parameters some contributor of the step sent a gradient for
        self._held_ahead: HeldMean | None = None  # a standby's mean of its next step, taken during this one's update
        self._missing: dict[int, frozenset[int]] = {}  # worker -> the parameters its pending push has no gradient for
        self._closed_received: frozenset[int] = frozenset()  # who pushed the step that closed last
        groups = [
            {"params": [t for s, t in zip(self.slices, self.tensors) if plan.params[s.param].group == g], **options}
            for g, options in enumerate(group_options)
        ]
        # the fastest of torch's implementations that gives torch's default bits (paramserver.core.kernels)
        self.kernel = kernel_choice(optimizer_cls, group_options, optimizer_kwargs, [layout.dtype for layout in self.layouts], self.device)
        self.optimizer = build_optimizer(optimizer_cls, groups, {**optimizer_kwargs, **self.kernel})
        # clipping and the step; block by block where that gives the same bits: the foreach path (paramserver.core.blocked)
        self.stepper = BlockedStep(self.optimizer, enabled=bool(self.kernel.get("foreach")))
        self.version = 0  # number of closed steps; pushes are accepted for step == version
        # Of the weights: a load starts a new one (start_generation). A push computed on the weights of
        # another generation is refused, and a pull that holds an older one returns with the new weights.
        self.generation = 0
        self.placement = "this process"  # where the shard runs, in words; its host fills it in
        # Called with the new members after every change, the lock held (its host lets go of what the workers
        # that left held); None: nothing to tell.
        self.on_members: Callable[[frozenset[int]], None] | None = None
        # What the coordinator sent with the last update (its step, schedule, ...): a coordinator that restarts
        # goes on from the records of the job's shards (``Coordinator.resume``). None: nothing sent yet.
        self.record: dict[str, Any] | None = None
        self._spare_snapshot: dict[str, Any] | None = None  # a checkpoint copy whose write is done: the next one's buffers
        self._copying = False  # a checkpoint copy is under way (without the lock): updates and loads wait for it
        self.failed: str | None = None  # why the open step's close failed (``fail``); None: it did not

    # -- push -------------------------------------------------------------------------------------------------

    def _check_buffers(self, buffers: Sequence[torch.Tensor], what: str, exact_dtype: bool = False) -> None:
        if len(buffers) != len(self.layouts):
            raise ValueError(f"shard {self.shard_id}: {what}: expected {len(self.layouts)} buffers, got {len(buffers)}")
        for i, (layout, buf) in enumerate(zip(self.layouts, buffers)):
            if buf.dim() != 1 or buf.numel() != layout.numel:
                raise ValueError(
                    f"shard {self.shard_id}: {what}: buffer {i} must be 1-D with {layout.numel} elements, got shape {tuple(buf.shape)}"
                )
            if exact_dtype and buf.dtype != layout.dtype:
                raise ValueError(f"shard {self.shard_id}: {what}: buffer {i} must be {layout.dtype}, got {buf.dtype}")
            if not buf.is_floating_point() and not buf.is_complex():
                raise ValueError(f"shard {self.shard_id}: {what}: buffer {i} must be floating point, got {buf.dtype}")
            if buf.is_complex() and not layout.dtype.is_complex:
                raise ValueError(f"shard {self.shard_id}: {what}: buffer {i} is complex ({buf.dtype}) but its parameters are {layout.dtype}")

    def _check_initialized(self) -> None:
        if not self.initialized:
            raise NotReadyError(f"shard {self.shard_id}: the job's initial weights are not in place yet")

    def check_step(self, step: int) -> None:
        if step < self.version:
            raise StaleStepError(f"shard {self.shard_id}: step {step} has already closed (now at {self.version})", self.version)
        if step > self.version:
            raise FutureStepError(f"shard {self.shard_id}: step {step} is not open yet (now at {self.version})", self.version)

    def check_push_step(self, worker: int, step: int) -> None:
        """Refuse a push that names a step it cannot be for: under synchronous steps any but the open one (a
        late retry of an applied push aside); under asynchronous steps a version that does not exist yet."""
        if self.ledger is not None:
            if step > self.version:
                raise FutureStepError(f"shard {self.shard_id}: version {step} does not exist yet (now at {self.version})", self.version)
        elif not self.is_late_retry(worker, step):
            self.check_step(step)

    def check_generation(self, generation: int | None) -> None:
        """Refuse a push computed on the weights of another generation (None: not checked)."""
        if generation is not None and generation != self.generation:
            raise StateReloadedError(
                f"shard {self.shard_id}: a state was loaded since these gradients' weights (generation {generation}, "
                f"now {self.generation}); pull the weights of step {self.version} and go on from there",
                self.version,
            )

    @_locked
    def push(
        self, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Collection[int] = (), generation: int | None = None,
        release: Callable[[Sequence[torch.Tensor]], None] | None = None,
    ) -> bool:
        """Add ``worker``'s flat gradients for ``step``. Returns False if that push was already applied.

        ``generation``: the weights generation the gradients were computed on (None: not checked); another
        generation's push raises ``StateReloadedError``.

        ``missing`` names the parameters this worker has no gradient for (their places hold zeros); one that no
        worker has a gradient for is left out of the step, as torch.optim skips a parameter whose grad is None.
        Bad input raises ``ValueError`` and changes nothing. The shard may keep ``grads`` until it folds them;
        ``release`` is then called with them once it lets go of them (a receiver's pool takes them back).
        """
        if not isinstance(worker, int) or isinstance(worker, bool) or not 0 <= worker < self.num_workers:
            raise ValueError(f"shard {self.shard_id}: worker must be in [0, {self.num_workers}), got {worker!r}")
        self._check_initialized()
        self.check_generation(generation)
        if self.ledger is not None:
            if not self.ledger.accept(worker, step, self.version, self.shard_id):
                return False  # applied already (a retry whose reply was lost)
        elif self.is_late_retry(worker, step):
            return False  # a retry whose first try closed the step (its reply was lost): applied already
        if worker not in self.members:
            raise NotAMemberError(
                f"shard {self.shard_id}: worker {worker} is not a member of the job (its lease expired, it left, or it never "
                "joined); its gradients are refused: join again"
            )
        if self.ledger is None:
            self.check_step(step)
        if worker in self.accumulator.received:
            return False
        self._check_buffers(grads, f"gradients of worker {worker}")
        if self.reject_nonfinite:
            for buf in grads:
                if not bool(torch.isfinite(buf).all()):
                    raise NonFiniteGradientError(
                        f"shard {self.shard_id}: gradients of worker {worker} for step {step} hold inf or nan"
                    )
        if not all(isinstance(i, int) and 0 <= i < len(self.plan.params) for i in missing):
            raise ValueError(f"shard {self.shard_id}: missing-gradient list names unknown parameters: {sorted(missing)}")
        if self.accumulator.kept:
            self.accumulator.undo()  # a member joined after the mean was taken ahead: the step waits for it too
        if self.device.type == "cpu":
            self.accumulator.add(worker, grads, release)
        else:  # the shard keeps its own copies on its device: the buffers pushed are free at once
            self.accumulator.add(worker, [g.to(self.device) for g in grads])
        if self.ledger is not None:
            self.ledger.pending(worker, step)
        self._missing[worker] = frozenset(missing)
        return True

    def is_late_retry(self, worker: int, step: int) -> bool:
        """A push of the step that closed last, by a worker whose push is in it."""
        return step == self.version - 1 and worker in self._closed_received

    @property
    def ready(self) -> bool:
        """Whether every member's gradients for the open step are in."""
        if self.ledger is not None:
            return bool(self.accumulator.received & self.members)  # any member's push is an update of its own
        if self.quorum is None:
            return self.accumulator.holds_all(self.members)
        return len(self.accumulator.received & self.members) >= min(self.quorum, len(self.members)) > 0

    @_locked
    def ready_in(self) -> tuple[bool, int, int, dict[int, int]]:
        """(``ready``, ``generation``, ``version``, the workers whose pushes are in, each with the version it was
        computed on) read together: a report names the generation and version it is of and what it holds."""
        return self.ready, self.generation, self.version, self._holds()

    def _holds(self) -> dict[int, int]:
        """The workers whose pushes are in, each with the version its gradients were computed on (a standby's
        mean from its primary comes without the pushes: the open version)."""
        if self.ledger is not None:
            return {w: self.ledger.based_on.get(w, self.version) for w in self.accumulator.received}
        return dict.fromkeys(self.accumulator.received, self.version)

    @_locked
    def set_members(self, members: Collection[int]) -> None:
        """The job's members changed: the open step waits for these ranks' pushes, and refuses others'."""
        self.members = frozenset(members)
        if self.on_members is not None:
            self.on_members(self.members)
        if self.ledger is not None:
            self.ledger.joined(self.members)
            with self._changed:  # a bounded-staleness wait may end with a member gone
                self._changed.notify_all()
                self._notify_version_listeners()

    # -- update -----------------------------------------------------------------------------------------------

    @_after_copy
    def apply(
        self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]], record: dict[str, Any] | None = None
    ) -> None:
        """Scale the mean by the clip coefficient, take the group hyperparameters, run the optimizer's step.
        ``record``: what the coordinator keeps here with this update (``self.record``)."""
        self._check_initialized()
        self.check_step(step)
        self._take_held_ahead(step)
        assert self.accumulator.contributors is not None, f"shard {self.shard_id}: apply before reduce (the mean) of step {step}"
        # A coefficient of exactly 1 (the norm within max_norm) is a product torch runs and the shard skips: the
        # norm is finite, so is every gradient, and x * 1 is x. (A non-finite norm gives a coefficient of 0 or NaN.)
        coef = None if clip_coef is None or bool(clip_coef == 1.0) else clip_coef.to(self.device)
        set_hyperparameters(self.optimizer, hyperparameters)
        keep_kernel(self.optimizer, self.kernel)
        for s, tensor in zip(self.slices, self.tensors):
            if s.param not in self._with_grad:
                tensor.grad = None  # torch.optim skips it (no update, no state); reduce points it back next step
        with torch.no_grad():
            self.stepper.step(coef)
            self._rebind_replaced_weights()
        self._close_step(record)

    def _rebind_replaced_weights(self) -> None:
        # An optimizer may assign ``param.data = new`` instead of updating in place (a common pattern in
        # custom optimizers); copy such values back into the flat buffer and point the parameter at it again.
        for tensor, view in zip(self.tensors, self._weight_views):
            if tensor.data_ptr() != view.data_ptr():
                view.copy_(tensor.detach())
                tensor.data = view

    @_after_copy
    def skip(self, step: int, record: dict[str, Any] | None = None) -> None:
        """Close ``step`` without an update (a non-finite step): weights and optimizer state stay."""
        self._check_initialized()
        self.check_step(step)
        self._close_step(record)

    @_locked
    def keep_record(self, record: dict[str, Any] | None) -> None:
        """Keep the coordinator's ``record`` (sent after a load, which comes with no update)."""
        self.record = record

    @_locked
    def last_record(self) -> dict[str, Any] | None:
        return self.record

    def _close_step(self, record: dict[str, Any] | None) -> None:
        with self._changed:
            if record is not None:
                self.record = record
            contributors = self.accumulator.contributors or tuple(self.accumulator.received)
            self._closed_received = frozenset(contributors)
            if self.ledger is not None:
                self.ledger.applied_update(contributors)
            self.accumulator.reset(keep_pending=self.ledger is not None)
            for w in contributors:
                self._missing.pop(w, None)
            if self.ledger is None:
                self._missing.clear()  # the pushes left out of a synchronous step are dropped
            self._with_grad = set()
            self.failed = None  # a close that failed before (its report) has happened after all
            self.version += 1
            self._changed.notify_all()
            self._notify_version_listeners()

    def add_version_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever the version changes or the weights are loaded, on whichever thread
        made the change, with the shard's lock held: it must only hand the news on (an asyncio server wakes
        its waiting pulls with ``loop.call_soon_threadsafe``), never block or call back into the shard."""
        with self._listeners_lock:  # copy-on-write under a lock: two threads adding never lose one
            self._version_listeners = (*self._version_listeners, callback)

    def remove_version_listener(self, callback: Callable[[], None]) -> None:
        with self._listeners_lock:
            self._version_listeners = tuple(c for c in self._version_listeners if c != callback)

    def _notify_version_listeners(self) -> None:
        for callback in self._version_listeners:
            callback()

    def holds(self, buffers: Sequence[torch.Tensor]) -> bool:
        """Whether pushed ``buffers`` are kept to be folded in later (so the receiver must not reuse them)."""
        with self._lock:
            return self.accumulator.holds(buffers)

    def _restore_grad_views(self) -> None:
        # An optimizer may rebind or drop ``param.grad`` (gradient centralization, zero_grad(set_to_none));
        # the next step's gradients are in the sum buffers, so point every parameter back there.
        for tensor, view in zip(self.tensors, self._grad_views):
            tensor.grad = view

    def reached(self, min_version: int, generation: int | None = None, worker: int | None = None) -> bool:
        """Whether a pull for ``min_version`` by a worker holding ``generation`` can be answered now: the shard
        is initialized and at ``min_version`` or later, or a load started a generation other than ``generation``.
        Under asynchronous steps ``worker``'s own push must be applied first, and, with a staleness bound, the
        worker may not be too far ahead of the slowest member."""
        if self.failed is not None and self.version < min_version:
            return True  # the close failed: the wait ends, with the error (check_not_failed)
        if generation is not None and generation != self.generation:
            return self.initialized
        if not (self.initialized and self.version >= min_version):
            return False
        if self.ledger is None or worker is None:
            return True
        return worker not in self.accumulator.received and not self.ledger.ahead(worker, self.members)

    def wait_for_version(self, min_version: int, timeout: float, generation: int | None = None, worker: int | None = None) -> int:
        """Wait until the shard is initialized and at ``min_version`` or later, or (``generation`` given) in
        another generation than ``generation``; returns the version.

        Raises ``TimeoutError`` when ``timeout`` seconds pass first, ``JobFailedError`` when the close of the
        step the wait is for failed (``fail``).
        """
        with self._changed:
            if not self._changed.wait_for(lambda: self.reached(min_version, generation, worker), timeout):
                raise TimeoutError(
                    f"shard {self.shard_id}: still at version {self.version}"
                    f"{'' if self.initialized else ' (not initialized)'} after {timeout:.1f}s waiting for {min_version}"
                )
            self.check_not_failed(min_version)
            return self.version

    def fail(self, reason: str) -> None:
        """The close of the open step failed (its report met an error): pulls that wait for a later version end
        with ``JobFailedError`` instead of waiting out their deadline. A load (``start_generation``) clears it."""
        with self._changed:
            self.failed = reason
            self._changed.notify_all()
            self._notify_version_listeners()

    def check_not_failed(self, min_version: int) -> None:
        """Raise ``JobFailedError`` if a wait for ``min_version`` ended because the step's close failed."""
        failed = self.failed
        if failed is not None and self.version < min_version:
            raise JobFailedError(failed)

    # -- broadcast and state ----------------------------------------------------------------------------------

    @_locked
    def status(self) -> dict[str, Any]:
        return {
            "version": self.version, "pushed": sorted(self.accumulator.received), "members": sorted(self.members),
            "holds": self._holds(),
            "initialized": self.initialized,
            "generation": self.generation, "reduced": self.accumulator.contributors is not None,
            "placement": f"{self.placement}, {self.device}",
        }

    def weight_buffers(self) -> list[torch.Tensor]:
        """The shard's flat weights (live buffers: callers copy what they keep)."""
        return self.weights

    @_locked
    def weight_copies(self) -> list[torch.Tensor]:
        return [w.clone() for w in self.weights]

    @_after_copy
    def load_weights(self, buffers: Sequence[torch.Tensor]) -> None:
        self._check_buffers(buffers, "weights", exact_dtype=True)
        for dst, src in zip(self.weights, buffers):
            dst.copy_(src)
        with self._changed:
            self.initialized = True
            self._changed.notify_all()
            self._notify_version_listeners()

    @_locked
    def optimizer_state(self) -> list[dict[str, Any]]:
        """Optimizer state of each slice, in ``self.slices`` order (live tensors: callers copy)."""
        return [self.optimizer.state.get(t, {}) for t in self.tensors]

    @_after_copy
    def restore_version(self, version: int) -> None:
        """Start at ``version`` (a job restored from a checkpoint); no push may be in yet."""
        if self.accumulator.received:
            raise ValueError(f"shard {self.shard_id}: cannot restore a version while a step has pushes in")
        with self._changed:
            self.version = version
            self._closed_received = frozenset()
            self._changed.notify_all()
            self._notify_version_listeners()

    @_after_copy
    def start_generation(self, step: int, generation: int | None = None) -> None:
        """A state was loaded: drop the open step's partial pushes, open ``step`` and start a new weights
        generation, so that pushes computed on the old weights are refused and waiting pulls return.
        ``generation``: the job's new generation (a shard re-created after its process died starts over at 0,
        so the coordinator names it); None: the next one."""
        with self._changed:
            self.accumulator.reset()
            self._with_grad = set()
            self._missing.clear()
            self._closed_received = frozenset()
            self.failed = None
            self.version = step
            self.generation = self.generation + 1 if generation is None else generation
            self._changed.notify_all()
            self._notify_version_listeners()

    @_after_copy
    def load_optimizer_state(self, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        """Load per-slice optimizer state and group hyperparameters through torch's own loader (which casts
        state to each parameter's device and dtype as torch does)."""
        assert len(slice_states) == len(self.tensors)
        index = {id(t): i for i, t in enumerate(self.tensors)}
        local_groups = []
        for group, saved in zip(self.optimizer.param_groups, param_groups, strict=True):
            local_groups.append({**{k: v for k, v in saved.items() if k not in ("params", "param_names")},
                                 "params": [index[id(t)] for t in group["params"]]})
        state = {i: st for i, st in enumerate(slice_states) if st}
        self.optimizer.load_state_dict({"state": state, "param_groups": local_groups})
        keep_kernel(self.optimizer, self.kernel)
