"""A job as the coordinator's host keeps it: its coordinator, where it came from, who joined, its state
("waiting for workers", "running", "finished") and how two configurations of one name differ. No gRPC, no Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import text_format

from paramserver.core.coordinator import Coordinator
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

# A job's state as status shows it (StatusReply.state).
WAITING, RUNNING, FINISHED = "waiting for workers", "running", "finished"


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, pb.ParamSpec):
        text = f"{value.name or '?'} {tuple(value.shape)} {value.dtype}" + (f" group {value.group}" if value.group else "")
    elif hasattr(value, "DESCRIPTOR"):
        text = "{" + text_format.MessageToString(value, as_one_line=True) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_difference(existing: pb.JobConfig, given: pb.JobConfig, limit: int = 3) -> str:
    """The fields where ``given`` differs from ``existing``, in one line: ``field: existing -> given; ...``
    (at most ``limit`` of them, then how many more)."""
    diffs = []
    for fd in pb.JobConfig.DESCRIPTOR.fields:
        name = fd.name
        a, b = getattr(existing, name), getattr(given, name)
        if fd.is_repeated:
            a, b = list(a), list(b)
            if a == b:
                continue
            if len(a) != len(b):
                diffs.append(f"{name}: {len(a)} -> {len(b)} entries")
            else:
                i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                diffs.append(f"{name}[{i}]: {_short(a[i])} -> {_short(b[i])}")
            continue
        has = fd.has_presence
        a_set, b_set = (existing.HasField(name), given.HasField(name)) if has else (True, True)
        if (a_set, a) == (b_set, b):
            continue
        diffs.append(f"{name}: {_short(a) if a_set else '(unset)'} -> {_short(b) if b_set else '(unset)'}")
    if not diffs:
        return "no field differs"
    more = f"; and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


@dataclass
class Job:
    name: str
    config: pb.JobConfig
    coordinator: Coordinator
    restored: bool = False  # started from a checkpoint: rank 0's initial weights do not replace its state
    lost: str | None = None  # a shard died and there was no checkpoint to roll back to: why the job failed
    # per worker, the transport its last lease renewal named ("shared_memory", "grpc", "mixed")
    transports: dict[int, str] = field(default_factory=dict)
    # the ranks that created or joined the job (rank 0's CreateJob, JoinJob) since this coordinator has it
    joined: set[int] = field(default_factory=set)

    @property
    def ready(self) -> bool:
        return all(s["initialized"] for s in self.coordinator.shards.statuses())

    @property
    def finished(self) -> bool:
        """Every worker left after the job trained: no live member, at least one step closed, and the last
        member went by leaving (a lease that ran out is a worker lost, not a finished job: it may come back)."""
        coordinator = self.coordinator
        changes = coordinator.membership.changes
        return (self.lost is None and not coordinator.membership.live and coordinator.step > 0
                and bool(changes) and changes[-1].reason == "left")

    def state(self) -> str:
        """"finished" (``finished``), "waiting for workers" (rank 0's initial weights are not in, fewer than
        ``min_workers`` members are live, or, before the first step, not every one of the ``num_workers`` ranks has
        joined), else "running"."""
        if self.finished:
            return FINISHED
        coordinator = self.coordinator
        live = coordinator.membership.live
        if not self.ready or not live or len(live) < coordinator.config.min_workers:
            return WAITING
        if coordinator.step == 0 and not self.restored and not set(range(coordinator.config.num_workers)) <= self.joined:
            return WAITING
        return RUNNING

    @property
    def members(self) -> list[int]:
        """The live members (kept by the coordinator, with their leases)."""
        return sorted(self.coordinator.membership.live)

    @property
    def epoch(self) -> int:
        """Of the membership and the shard map (kept by the coordinator, which owns the shard group)."""
        return self.coordinator.epoch
