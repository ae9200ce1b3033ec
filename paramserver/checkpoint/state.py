"""A job's checkpoint in memory: what is copied at a step boundary (``take``), and torch's formats from it
(``torch_state``, joined with the same helpers as ``Coordinator.state_dict``), ready to be cut again for any
number of shards (``restore``)."""

from __future__ import annotations

import base64
import copy
import os
from collections.abc import Iterable
from typing import Any

import torch

from paramserver.checkpoint import store
from paramserver.core.coordinator import Coordinator
from paramserver.core.params import ParamInfo
from paramserver.core.shard import SnapshotWrite
from paramserver.core.sharding import ShardingPlan, Slice, unpack
from paramserver.core.state import join_param_state


def take(
    coordinator: Coordinator, root: str, job: str, *, config: bytes | None = None, members: Iterable[int] = ()
) -> tuple[dict[str, Any], list[SnapshotWrite]]:
    """Copy a job's state at its step boundary: the coordinator's part (plain values, JSON-able but for the
    scheduler's own state) and every shard's, bound for its file in the step's directory under ``root`` (a
    shard in its own process writes it there in the background). ``config``: the job's description as the
    service knows it (the JobConfig proto's bytes), kept to rebuild the job on restore."""
    # the coordinator's lock (re-entrant: a hook after a step already holds it) keeps the step from moving
    with coordinator._lock:
        plan = coordinator.plan
        schedule = coordinator.schedule
        path = store.step_dir(root, job, coordinator.step)
        writes = coordinator.shards.save_snapshots([os.path.join(path, store.shard_file(j)) for j in range(len(plan.shards))])
        for j, write in enumerate(writes):
            if write.version != coordinator.version:
                raise RuntimeError(f"shard {j} is at version {write.version}, the job at {coordinator.version}: not a step boundary")
        part = {
            "step": coordinator.step,
            "version": coordinator.version,
            "epoch": coordinator.epoch,
            "skipped_steps": coordinator.skipped_steps,
            "params": [[p.index, p.name, list(p.shape), str(p.dtype).removeprefix("torch."), p.group] for p in plan.params],
            "plan": [[[s.param, s.start, s.stop] for s in slices] for slices in plan.shards],
            "param_groups": copy.deepcopy(schedule.optimizer.state_dict()["param_groups"]),
            "scheduler": copy.deepcopy(schedule.state_dict()),
            "applied_steps": schedule.applied_steps,
            "config": None if config is None else base64.b64encode(config).decode(),
            "members": sorted(members),
        }
    return part, writes


def config_bytes(part: dict[str, Any]) -> bytes | None:
    return None if part.get("config") is None else base64.b64decode(part["config"])


def saved_plan(part: dict[str, Any]) -> ShardingPlan:
    params = tuple(ParamInfo(i, name, tuple(shape), getattr(torch, dtype), group) for i, name, shape, dtype, group in part["params"])
    return ShardingPlan(params, tuple(tuple(Slice(*s) for s in slices) for slices in part["plan"]))


def torch_state(part: dict[str, Any], shards: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"model", "optimizer", "scheduler"}`` as a local model, ``torch.optim`` optimizer and scheduler
    over the same parameters would give them."""
    plan = saved_plan(part)
    out = [torch.empty(p.shape, dtype=p.dtype) for p in plan.params]
    for j, piece in enumerate(shards):
        unpack(plan, j, piece["weights"], out)
    state: dict[int, dict[str, Any]] = {}
    for p in plan.params:
        pieces = [(s, shards[j]["state"][plan.shards[j].index(s)]) for j, s in plan.pieces(p.index)]
        if any(st for _, st in pieces):
            state[p.index] = join_param_state(plan, p, pieces)
    return {
        "model": {p.key: t for p, t in zip(plan.params, out)},
        "optimizer": {"state": state, "param_groups": copy.deepcopy(part["param_groups"])},
        "scheduler": copy.deepcopy(part["scheduler"]),
    }


def load_torch_state(checkpoint_dir: str, job: str, step: int | None = None) -> dict[str, Any]:
    """Job ``job``'s checkpoint ``step`` (default: the newest valid one) under ``checkpoint_dir`` in torch's
    formats: ``model.load_state_dict(s["model"])``, ``optimizer.load_state_dict(s["optimizer"])`` and
    ``scheduler.load_state_dict(s["scheduler"])`` continue exactly where the job was."""
    part, shards = store.read_latest(checkpoint_dir, job, step)
    return torch_state(part, shards)


def restore(coordinator: Coordinator, part: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    """Start ``coordinator``'s new job (its own plan, any shard count) from a checkpoint."""
    coordinator.restore(torch_state(part, shards), part["step"])
    coordinator.schedule.applied_steps = part["applied_steps"]
    coordinator.skipped_steps = part["skipped_steps"]
