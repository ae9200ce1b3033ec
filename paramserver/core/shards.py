"""The coordinator's control plane: the typed calls it makes on one shard (``ShardControl``) and on all shards
of a job (``ShardGroup``), here over shards in this process.

Pushes and pulls are the data plane and do not pass through here (the servicers call the shard's host). A
plain ``Shard`` is a ``ShardControl``; ``paramserver.hosting.replicas.ActorShard`` is one over Ray actors.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from paramserver.core.shard import Shard, SnapshotWrite

T = TypeVar("T")


@runtime_checkable
class ShardControl(Protocol):
    """The calls a coordinator makes on one shard of one job, in the order a step uses them."""

    @property
    def ready(self) -> bool:
        """Whether the shard holds every worker's gradients for the open step."""
        ...

    def reduce(
        self, step: int, norm_type: float, clip_value: float | None = None, contributors: Collection[int] | None = None
    ) -> list[torch.Tensor | None]:
        """The mean over ``contributors`` (clamped to ``clip_value``); one norm per slice, None for a slice
        no worker sent a gradient for."""
        ...

    def apply(
        self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]], record: dict[str, Any] | None = None
    ) -> None:
        """Scale the mean, set the groups' hyperparameters, run the optimizer; closes ``step``. ``record``: the
        coordinator's state after this step, kept by the shard for a coordinator that restarts."""
        ...

    def skip(self, step: int, record: dict[str, Any] | None = None) -> None:
        """Close ``step`` without an update."""
        ...

    def set_members(self, members: Collection[int]) -> None:
        """The job's members changed: the open step waits for these ranks' pushes, and refuses others'."""
        ...

    def keep_record(self, record: dict[str, Any] | None) -> None:
        """Keep the coordinator's ``record`` (after a load, which has no update to carry it)."""
        ...

    def last_record(self) -> dict[str, Any] | None:
        """The record the shard kept last (None: none yet)."""
        ...

    def weight_copies(self) -> list[torch.Tensor]:
        """The shard's flat weights, copied."""
        ...

    def load_weights(self, buffers: Sequence[torch.Tensor]) -> None: ...

    def optimizer_state(self) -> list[dict[str, Any]]:
        """The optimizer state of each slice (live tensors in process: callers copy what they keep)."""
        ...

    def load_optimizer_state(self, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None: ...

    def save_snapshot(self, path: str) -> SnapshotWrite:
        """Copy this shard's piece of a checkpoint now (``version``, ``weights``: flat buffers, ``state``: per
        slice), for file ``path``; the copy is all a step waits for. A shard in its own process starts writing
        the file there in the background (then ``snapshot_written``); one in the caller's process hands the copy
        back for the caller to write."""
        ...

    def snapshot_written(self, path: str, timeout: float) -> dict[str, Any]:
        """``{"crc32", "bytes"}`` of file ``path`` once this shard's process has written (and fsynced) it after
        ``save_snapshot``; raises the write's error, or ``TimeoutError`` after ``timeout`` seconds."""
        ...

    def restore_version(self, version: int) -> None:
        """Start at ``version`` (a job restored from a checkpoint)."""
        ...

    def start_generation(self, step: int, generation: int | None = None) -> None:
        """A state was loaded: drop the open step's partial pushes, open ``step``, start a new weights generation
        (``generation``, or the next one when None)."""
        ...

    def status(self) -> dict[str, Any]:
        """``version``, ``pushed`` (workers), ``holds`` (each pushed worker -> the version its gradients were
        computed on), ``initialized``, ``generation``, ``reduced`` (the open step's mean is taken), ``placement``."""
        ...

    def wait_for_version(self, min_version: int, timeout: float) -> int:
        """Wait until initialized and at ``min_version``; raises ``TimeoutError`` after ``timeout`` seconds."""
        ...


class ShardGroup:
    """All shards of one job, called together; here one call after another on shards in this process.

    Every group call goes through ``_each``; ``paramserver.hosting.actors.RayShardGroup`` overrides it to start
    every shard's call before waiting for any.
    """

    def __init__(self, shards: Sequence[ShardControl]) -> None:
        self.shards = list(shards)
        if not self.shards:
            raise ValueError("a shard group needs at least one shard")  # else "all shards ready" would hold vacuously

    def __len__(self) -> int:
        return len(self.shards)

    def _each(self, call: Callable[[int, ShardControl], T], wait_s: float = 0.0, only: Sequence[int] | None = None) -> list[T]:
        """``call(j, shard j)`` for every shard (``only``: these), the results in shard order. ``wait_s``: how long
        the call itself may block on purpose (a group over remote shards adds it to its deadline)."""
        return [call(j, s) for j, s in enumerate(self.shards) if only is None or j in only]

    def _per_shard(self, values: Sequence[Any], what: str) -> None:
        if len(values) != len(self.shards):
            raise ValueError(f"{what}: expected one per shard ({len(self.shards)}), got {len(values)}")

    # used by the in-process StepEngine only: served shards take pushes over gRPC
    def push(self, shard: int, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = ()) -> bool:
        target = self.shards[shard]
        if not isinstance(target, Shard):
            raise TypeError(f"shard {shard} is not in this process ({type(target).__name__}); push to it over the wire")
        return target.push(worker, step, grads, missing)

    def all_ready(self) -> bool:
        return all(self._each(lambda _, s: s.ready))

    def reduce(
        self,
        step: int,
        norm_type: float,
        clip_value: float | None,
        contributors: Collection[int] | None = None,
        known: Mapping[int, list[torch.Tensor | None]] | None = None,
    ) -> list[list[torch.Tensor | None]]:
        """Every shard's norms of the step's mean; ``known``: those of shards that took this mean ahead (not asked)."""
        known = known or {}
        who = None if contributors is None else tuple(contributors)  # a tuple travels to remote shards cheaply
        asked = [j for j in range(len(self.shards)) if j not in known]
        norms = dict(zip(asked, self._each(lambda _, s: s.reduce(step, norm_type, clip_value, who), only=asked)))
        return [known[j] if j in known else norms[j] for j in range(len(self.shards))]

    def readiness(self) -> list[bool]:
        return self._each(lambda _, s: s.ready)

    def apply(self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]], record: dict[str, Any] | None = None) -> None:
        self._each(lambda _, s: s.apply(step, clip_coef, hyperparameters, record))

    def skip(self, step: int, record: dict[str, Any] | None = None) -> None:
        self._each(lambda _, s: s.skip(step, record))

    def set_members(self, members: Collection[int]) -> None:
        who = tuple(sorted(members))
        self._each(lambda _, s: s.set_members(who))

    def keep_records(self, record: dict[str, Any] | None) -> None:
        self._each(lambda _, s: s.keep_record(record))

    def records(self) -> list[dict[str, Any] | None]:
        return self._each(lambda _, s: s.last_record())

    def weights(self) -> list[list[torch.Tensor]]:
        return self._each(lambda _, s: s.weight_copies())

    def load_weights(self, buffers: Sequence[Sequence[torch.Tensor]]) -> None:
        self._per_shard(buffers, "weights")
        self._each(lambda j, s: s.load_weights(buffers[j]))

    def optimizer_states(self) -> list[list[dict[str, Any]]]:
        return self._each(lambda _, s: s.optimizer_state())  # live state: the caller copies (state.join_param_state)

    def load_optimizer_states(self, states: Sequence[Sequence[dict[str, Any]]], param_groups: list[dict[str, Any]]) -> None:
        self._per_shard(states, "optimizer states")
        self._each(lambda j, s: s.load_optimizer_state(states[j], param_groups))

    def save_snapshots(self, paths: Sequence[str]) -> list[SnapshotWrite]:
        """Every shard's piece of a checkpoint, copied now; shard j's goes to ``paths[j]``."""
        self._per_shard(paths, "snapshot paths")
        return self._each(lambda j, s: s.save_snapshot(paths[j]))

    def snapshots_written(self, paths: Sequence[str], timeout: float) -> list[dict[str, Any]]:
        """Each shard's report on the file its own process wrote (``save_snapshots``), waited for ``timeout``."""
        self._per_shard(paths, "snapshot paths")
        return self._each(lambda j, s: s.snapshot_written(paths[j], timeout), wait_s=timeout)

    def restore_version(self, version: int) -> None:
        self._each(lambda _, s: s.restore_version(version))

    def start_generation(self, step: int, generation: int | None = None) -> None:
        if generation is None:
            self._each(lambda _, s: s.start_generation(step))
        else:
            self._each(lambda _, s: s.start_generation(step, generation))

    def statuses(self) -> list[dict[str, Any]]:
        return self._each(lambda _, s: s.status())

    def wait_initialized(self, timeout: float) -> None:
        self._each(lambda _, s: s.wait_for_version(0, timeout), wait_s=timeout)


@dataclass
class ShardCheck:
    """What one health check found: ``taken_over`` (shard -> the promoted standby's address), ``lost`` (shard ->
    the address of its process, restarted empty, with no standby to take over), ``stale`` (job -> shards whose
    copy of it on the new primary is not current: it rolls back)."""

    taken_over: dict[int, str] = field(default_factory=dict)
    lost: dict[int, str] = field(default_factory=dict)
    stale: dict[str, list[int]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.taken_over or self.lost)
