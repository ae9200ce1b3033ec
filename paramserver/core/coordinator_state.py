"""A job's state in torch's formats, through its coordinator: ``state_dict`` / ``load_state_dict`` and ``restore``
of a checkpoint. A part of ``Coordinator``, kept apart because it
is one concern: plain Python and torch."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch

from paramserver.core.registry import is_elementwise
from paramserver.core.sharding import pack
from paramserver.core.state import (
    check_model_state,
    check_optimizer_state,
    cut_param_state,
    join_param_state,
)

log = logging.getLogger("paramserver")


class CoordinatorState:
    """``Coordinator``'s state in torch's formats (it mixes this in): every attribute used here is the coordinator's own."""

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            params = self.plan.params
            model = {p.key: t for p, t in zip(params, self.parameters())}
            shard_states = self.shards.optimizer_states()
            state: dict[int, dict[str, Any]] = {}
            for p in params:
                pieces = []
                for j, s in self.plan.pieces(p.index):
                    pieces.append((s, shard_states[j][self.plan.shards[j].index(s)]))
                if any(st for _, st in pieces):
                    state[p.index] = join_param_state(self.plan, p, pieces)
            groups = self.schedule.optimizer.state_dict()["param_groups"]
            optimizer = {"state": state, "param_groups": copy.deepcopy(groups)}
            return {"model": model, "optimizer": optimizer, "scheduler": self.schedule.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any], step: int | None = None) -> None:
        """Load any of "model", "optimizer", "scheduler" in torch's formats; everything is checked before
        anything changes. The job then goes on from ``step`` (None: the step it is at), in a new weights
        generation: the open step's partial pushes are dropped, pushes computed on the old weights are
        refused (``StateReloadedError``) and waiting pulls return with the loaded weights."""
        unknown = set(state_dict) - {"model", "optimizer", "scheduler"}
        if unknown:
            raise ValueError(f"unknown state dict keys {sorted(unknown)}; expected 'model', 'optimizer', 'scheduler'")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        with self._lock:
            params = self.plan.params
            weights = None
            if "model" in state_dict:
                tensors = check_model_state(params, state_dict["model"])
                weights = [pack(self.plan, j, tensors) for j in range(self.plan.num_shards)]
            shard_states = None
            if "optimizer" in state_dict:
                sd = state_dict["optimizer"]
                check_optimizer_state(params, len(self.job.params.group_options), sd)
                # torch maps saved ids to parameters by position across the groups
                saved_ids = [i for group in sd["param_groups"] for i in group["params"]]
                by_index = {pos: sd["state"].get(saved_id, {}) for pos, saved_id in enumerate(saved_ids)}
                shard_states = [
                    [cut_param_state(params[s.param], s, self.plan.is_whole(s), by_index[s.param]) for s in slices]
                    for slices in self.plan.shards
                ]
                self._check_state_shapes(by_index)
            if "scheduler" in state_dict:
                self.schedule.load_state_dict(state_dict["scheduler"])
            if shard_states is not None:
                sd = state_dict["optimizer"]
                self.schedule.optimizer.load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
                self.shards.load_optimizer_states(shard_states, self.schedule.hyperparameters())
            if weights is not None:
                self.shards.load_weights(weights)
            if weights is not None and shard_states is not None:
                self.failed = None  # every shard holds the same, complete state again
            self._start_generation(self.step if step is None else step)

    def _start_generation(self, step: int) -> None:
        # after the weights are in: a pull that sees the new generation gets the loaded weights
        self.shards.start_generation(step, self.generation + 1)
        self.generation += 1
        self.step = self.version = step
        self.policy.reset()
        self._metrics.clear()
        self.shards.keep_records(self._record(None, None, None, applied=False))

    def restore(self, state_dict: Mapping[str, Any], step: int) -> None:
        """Start this job, new and untrained, from a checkpoint: ``state_dict`` ("model", "optimizer",
        "scheduler" in torch's formats) cut for this job's plan (any shard count), at step and version
        ``step``. The weights go in last: they mark the shards initialized, which lets workers join."""
        with self._lock:
            params = self.plan.params
            tensors = check_model_state(params, state_dict["model"])
            sd = state_dict["optimizer"]
            check_optimizer_state(params, len(self.job.params.group_options), sd)
            saved_ids = [i for group in sd["param_groups"] for i in group["params"]]
            by_index = {pos: sd["state"].get(saved_id, {}) for pos, saved_id in enumerate(saved_ids)}
            self._check_state_shapes(by_index)
            self.schedule.load_state_dict(state_dict["scheduler"])
            self.schedule.optimizer.load_state_dict({"state": {}, "param_groups": sd["param_groups"]})
            self.shards.restore_version(step)
            self.shards.load_optimizer_states(
                [[cut_param_state(params[s.param], s, self.plan.is_whole(s), by_index[s.param]) for s in slices] for slices in self.plan.shards],
                self.schedule.hyperparameters(),
            )
            self.step = self.version = step
            self.failed = None
            self.shards.keep_records(self._record(None, None, None, applied=False))
            self.shards.load_weights([pack(self.plan, j, tensors) for j in range(self.plan.num_shards)])

    def _check_state_shapes(self, by_index: Mapping[int, Mapping[str, Any]]) -> None:
        elementwise = is_elementwise(self.job.optimizer_cls)
        for p in self.plan.params:
            if not (elementwise or self.plan.is_split(p.index)):
                continue
            for key, value in by_index[p.index].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != p.shape:
                    raise ValueError(f"optimizer state {key!r} of parameter {p.key!r} has shape {tuple(value.shape)}, expected {p.shape}")
