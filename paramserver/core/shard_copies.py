"""A shard's copies of itself: its piece of a checkpoint (copied at a step boundary, into the buffers of its last
copy once that one is written), the whole state a standby takes over (``replica_state`` / ``adopt``), and its
weights moved into memory workers share (``place_weights``). A part of ``Shard``, kept apart because it is one
concern: plain Python and torch."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from paramserver.core.scheduling import hyperparameters


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


# How long a change of the weights or the optimizer state waits for a checkpoint copy under way (a copy of
# memory: milliseconds; the bound is there so that nothing waits forever).
COPY_WAIT_S = 300.0


def _after_copy(method: Callable[..., Any]) -> Callable[..., Any]:
    """``_locked``, and once no checkpoint copy is under way: for the methods that change what a copy reads (the
    weights, the optimizer state, the version). Pushes, reduces and pulls do not wait for a copy."""

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._wait_for_copy()
            return method(self, *args, **kwargs)

    return locked


@dataclass(frozen=True)
class SnapshotWrite:
    """A shard's piece of a checkpoint, copied at a step boundary, on its way to its file ``path``. ``piece``: the
    copy itself (version, weights, state), which the checkpoint's writer writes, for a shard in the caller's
    process; None for a shard in its own process, which writes the file there and reports its checksum
    (``ShardControl.snapshot_written``)."""

    path: str
    version: int
    piece: dict[str, Any] | None = None
    # called once the piece is written: its buffers then serve the shard's next copy (None: nothing to hand back)
    release: Callable[[], None] | None = field(default=None, compare=False)


class ShardCopies:
    """``Shard``'s copies (it mixes this in): every attribute used here is the shard's own."""

    @_locked
    def snapshot(self) -> dict[str, Any]:
        """Copies, on the CPU, of the weights and of every slice's optimizer state: this shard's piece of a
        checkpoint. The copy is all a step waits for; writing it happens elsewhere."""
        return self._copy_new()

    def _copy_new(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "weights": [w.detach().to("cpu", copy=True) for w in self.weights],
            "state": [{k: _cpu_copy(v) for k, v in st.items()} for st in self.optimizer_state()],
        }

    def save_snapshot(self, path: str) -> SnapshotWrite:
        """This shard's piece of a checkpoint, copied now, for the caller to write to ``path`` and then
        ``release()``. The copy goes into the buffers of the last one once its write released them: copying into
        memory already touched takes a fraction of the time of new memory.

        The copy runs without the shard's lock: the next step's pushes (and its mean, taken ahead) go on
        meanwhile, and only what changes the copied state (an update, a load: ``_after_copy``) waits for it."""
        with self._lock:
            self._wait_for_copy()  # one copy at a time: the spare buffers are one copy's
            spare, self._spare_snapshot = self._spare_snapshot, None
            self._copying = True
        try:
            piece = self._copy_into(spare) if spare is not None else None
            if piece is None:
                piece = self._copy_new()
        finally:
            with self._changed:
                self._copying = False
                self._changed.notify_all()
        return SnapshotWrite(path, piece["version"], piece, functools.partial(self._keep_spare, piece))

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """The shard's lock, taken once no checkpoint copy is under way: for a caller that changes the copied
        state over several calls (no copy starts before the lock is let go)."""
        with self._lock:
            self._wait_for_copy()
            yield

    def _wait_for_copy(self) -> None:
        """(The lock held.) Wait until no checkpoint copy reads the weights and the optimizer state; the wait
        lets go of the lock, as every wait on ``_changed`` does."""
        if self._copying and not self._changed.wait_for(lambda: not self._copying, COPY_WAIT_S):
            raise RuntimeError(f"shard {self.shard_id}: a checkpoint copy is still under way after {COPY_WAIT_S:.0f}s")

    def _copy_into(self, spare: dict[str, Any]) -> dict[str, Any] | None:
        """``snapshot()`` into ``spare``'s tensors; None when their number, shapes or dtypes no longer match."""
        states = self.optimizer_state()
        if len(spare["weights"]) != len(self.weights) or len(spare["state"]) != len(states):
            return None
        pairs = list(zip(spare["weights"], self.weights))
        for old, new in zip(spare["state"], states):
            if old.keys() != new.keys():
                return None
            pairs += [(old[k], v) for k, v in new.items() if isinstance(v, torch.Tensor)]
            if any(isinstance(v, torch.Tensor) != isinstance(old[k], torch.Tensor) for k, v in new.items()):
                return None
        if any(dst.shape != src.shape or dst.dtype != src.dtype for dst, src in pairs):
            return None
        for dst, src in pairs:
            dst.copy_(src.detach())
        for old, new in zip(spare["state"], states):
            old.update({k: copy.deepcopy(v) for k, v in new.items() if not isinstance(v, torch.Tensor)})
        spare["version"] = self.version
        return spare

    def _keep_spare(self, piece: dict[str, Any]) -> None:
        with self._lock:
            self._spare_snapshot = piece

    def snapshot_written(self, path: str, timeout: float) -> dict[str, Any]:
        raise RuntimeError(f"shard {self.shard_id} is in the caller's process: the caller writes {path} from save_snapshot's copy")

    @_locked
    def replica_state(self) -> dict[str, Any]:
        """Everything a standby needs to become this shard's copy (``adopt``): ``snapshot()`` plus the weights
        generation, the groups' hyperparameters, who pushed the step that closed last, and the record."""
        return {
            **self.snapshot(), "generation": self.generation, "hyperparameters": copy.deepcopy(hyperparameters(self.optimizer)),
            "closed_received": sorted(self._closed_received), "record": copy.deepcopy(self.record),
            "members": sorted(self.members),
        }

    @_after_copy
    def adopt(self, replica: dict[str, Any]) -> None:
        """Become a copy of the shard whose ``replica_state()`` this is: weights, optimizer state, version and
        generation, the open step empty (a standby receives no pushes)."""
        self.load_optimizer_state(replica["state"], replica["hyperparameters"])
        self._check_buffers(replica["weights"], "replica weights", exact_dtype=True)
        with self._changed:
            for dst, src in zip(self.weights, replica["weights"]):
                dst.copy_(src)
            self.accumulator.reset()
            self._with_grad = set()
            self._held_ahead = None
            self._missing.clear()
            self.version = replica["version"]
            self.generation = replica["generation"]
            self._closed_received = frozenset(replica["closed_received"])
            self.record = replica["record"]
            self.members = frozenset(replica["members"])
            self.initialized = True
            self._changed.notify_all()
            self._notify_version_listeners()


    @_after_copy
    def place_weights(self, buffers: list[torch.Tensor]) -> None:
        """Move the flat weights into ``buffers`` (same sizes and dtypes, on the shard's device): shared memory
        that workers on this host read without a copy. The values are copied over and every optimizer parameter
        is pointed at its place in the new buffers (the same tensor objects: the optimizer's state stays keyed
        by them). Nothing replaces ``self.weights`` afterwards: updates, loads and adoptions write into them."""
        if len(buffers) != len(self.weights) or any(
            b.numel() != w.numel() or b.dtype != w.dtype or b.device != w.device for b, w in zip(buffers, self.weights)
        ):
            raise ValueError(f"shard {self.shard_id}: new weight buffers must match the layouts {[(w.numel(), w.dtype) for w in self.weights]}")
        with torch.no_grad():
            for dst, src in zip(buffers, self.weights):
                dst.copy_(src)
            k = 0
            for layout, flat in zip(self.layouts, buffers):
                for off in layout.offsets:
                    view = flat[off : off + self._weight_views[k].numel()].view(self._weight_views[k].shape)
                    self.tensors[k].set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
                    self._weight_views[k] = view
                    k += 1
        self.weights = list(buffers)


def _cpu_copy(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else copy.deepcopy(value)
