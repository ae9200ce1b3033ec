"""The coordinator's view of a job's shards: the calls it makes on them, here on shards in this process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from paramserver.core.shard import Shard


class ShardGroup:
    """The coordinator's view of a job's shards, here plain ``Shard`` objects in this process.

    Every call goes through ``_all`` (the same call on every shard) or ``_each`` (one argument list per
    shard); ``paramserver.hosting.actors.RayShardGroup`` sends the same calls to shard actors in parallel.
    """

    def __init__(self, shards: Sequence[Shard]) -> None:
        self.shards = list(shards)

    def _all(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def _each(self, method: str, args_per_shard: Sequence[tuple[Any, ...]]) -> list[Any]:
        return [getattr(s, method)(*args) for s, args in zip(self.shards, args_per_shard, strict=True)]

    # used by the in-process StepEngine only
    def push(self, shard: int, worker: int, step: int, grads: Sequence[torch.Tensor], missing: Sequence[int] = ()) -> bool:
        return self.shards[shard].push(worker, step, grads, missing)

    def all_ready(self) -> bool:
        return all(s.ready for s in self.shards)

    def reduce(self, step: int, norm_type: float, clip_value: float | None) -> list[list[torch.Tensor]]:
        return self._all("reduce", step, norm_type, clip_value)

    def apply(self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]]) -> None:
        self._all("apply", step, clip_coef, hyperparameters)

    def skip(self, step: int) -> None:
        self._all("skip", step)

    def weights(self) -> list[list[torch.Tensor]]:
        return self._all("weight_copies")

    def load_weights(self, buffers: Sequence[Sequence[torch.Tensor]]) -> None:
        self._each("load_weights", [(b,) for b in buffers])

    def optimizer_states(self) -> list[list[dict[str, Any]]]:
        return self._all("optimizer_state")  # live state: the caller copies (state.join_param_state)

    def load_optimizer_states(self, states: Sequence[Sequence[dict[str, Any]]], param_groups: list[dict[str, Any]]) -> None:
        self._each("load_optimizer_state", [(st, param_groups) for st in states])

    def statuses(self) -> list[dict[str, Any]]:
        return self._all("status")

    def wait_initialized(self, timeout: float) -> None:
        self._all("wait_for_version", 0, timeout)
