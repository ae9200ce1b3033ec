"""The typed control plane: in-process shards are ``ShardControl``s, a group calls them all (never an empty
group), and the three counters (step, weights' version, membership epoch) move as specified. No Ray, no network."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import pytest
import torch

import paramserver as ps
from paramserver.core.coordinator import Coordinator
from paramserver.core.shard import Shard, SnapshotWrite
from paramserver.core.shards import ShardControl, ShardGroup

PROTOCOL_CALLS = sorted(n for n in vars(ShardControl) if not n.startswith("_"))


def _engine(num_workers: int = 2, num_shards: int = 2, **config: Any) -> tuple[torch.nn.Module, ps.StepEngine]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 2))
    engine = ps.StepEngine(
        model.named_parameters(), "SGD", lr=0.1, num_shards=num_shards, config=ps.JobConfig(num_workers=num_workers, **config)
    )
    return model, engine


def test_the_protocol_lists_the_coordinators_calls():
    assert PROTOCOL_CALLS == [
        "apply", "keep_record", "last_record", "load_optimizer_state", "load_weights", "optimizer_state", "ready", "reduce",
        "restore_version", "save_snapshot", "set_members", "skip",
        "snapshot_written", "start_generation", "status", "wait_for_version", "weight_copies",
    ]


def test_in_process_shards_are_shard_controls():
    _, engine = _engine()
    shards = engine.shards.shards
    assert len(shards) == 2
    for shard in shards:
        assert isinstance(shard, Shard) and isinstance(shard, ShardControl)
        control: ShardControl = shard  # the static check: mypy verifies the signatures here
        assert control.status()["version"] == 0
    assert not isinstance(object(), ShardControl)


def test_an_empty_group_is_refused():
    with pytest.raises(ValueError, match="at least one shard"):
        ShardGroup([])


def test_a_group_must_match_the_plan():
    _, engine = _engine(num_shards=2)
    with pytest.raises(ValueError, match="2 shards"):
        Coordinator(engine.job, ShardGroup([engine.job.make_shard(0)]))


class FakeShard:
    """Records the calls a group makes on it."""

    def __init__(self, j: int) -> None:
        self.j = j
        self.calls: list[tuple[Any, ...]] = []

    @property
    def ready(self) -> bool:
        return self.j == 0

    def reduce(self, step: int, norm_type: float, clip_value: float | None = None, contributors: Collection[int] | None = None) -> list[torch.Tensor | None]:
        self.calls.append(("reduce", step, norm_type, clip_value, contributors))
        return [torch.tensor(float(self.j))]

    def apply(self, step: int, clip_coef: torch.Tensor | None, hyperparameters: list[dict[str, Any]], record: dict[str, Any] | None = None) -> None:
        self.calls.append(("apply", step, clip_coef, hyperparameters))

    def set_members(self, members: Collection[int]) -> None:
        self.calls.append(("set_members", tuple(members)))

    def skip(self, step: int, record: dict[str, Any] | None = None) -> None:
        self.calls.append(("skip", step))

    def keep_record(self, record: dict[str, Any] | None) -> None:
        self.calls.append(("keep_record", record))

    def last_record(self) -> dict[str, Any] | None:
        return None

    def weight_copies(self) -> list[torch.Tensor]:
        return [torch.full((2,), float(self.j))]

    def load_weights(self, buffers: Sequence[torch.Tensor]) -> None:
        self.calls.append(("load_weights", [float(b[0]) for b in buffers]))

    def optimizer_state(self) -> list[dict[str, Any]]:
        return [{"j": self.j}]

    def load_optimizer_state(self, slice_states: Sequence[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        self.calls.append(("load_optimizer_state", list(slice_states), param_groups))

    def save_snapshot(self, path: str) -> SnapshotWrite:
        self.calls.append(("save_snapshot", path))
        return SnapshotWrite(path, 0)

    def snapshot_written(self, path: str, timeout: float) -> dict[str, Any]:
        self.calls.append(("snapshot_written", path, timeout))
        return {"crc32": 0, "bytes": 0}

    def restore_version(self, version: int) -> None:
        self.calls.append(("restore_version", version))

    def status(self) -> dict[str, Any]:
        return {"version": 0, "pushed": [], "holds": {}, "initialized": True, "placement": f"fake {self.j}"}

    def start_generation(self, step: int, generation: int | None = None) -> None:
        self.calls.append(("start_generation", step))

    def wait_for_version(self, min_version: int, timeout: float) -> int:
        self.calls.append(("wait_for_version", min_version, timeout))
        return 0


def test_a_group_makes_each_call_on_every_shard_in_order():
    fakes = [FakeShard(0), FakeShard(1)]
    assert all(isinstance(f, ShardControl) for f in fakes)
    group = ShardGroup(fakes)
    assert len(group) == 2 and not group.all_ready()
    norms = group.reduce(3, 2.0, None, [0, 1])
    assert [float(n[0]) for n in norms] == [0.0, 1.0]
    group.apply(3, None, [{"lr": 0.1}])
    group.skip(4)
    assert [float(w[0][0]) for w in group.weights()] == [0.0, 1.0]
    group.load_weights([[torch.zeros(1)], [torch.ones(1)]])
    assert group.optimizer_states() == [[{"j": 0}], [{"j": 1}]]
    group.load_optimizer_states([[{"a": 0}], [{"a": 1}]], [{"lr": 0.2}])
    assert [s["placement"] for s in group.statuses()] == ["fake 0", "fake 1"]
    group.wait_initialized(5.0)
    for j, fake in enumerate(fakes):
        assert fake.calls == [
            ("reduce", 3, 2.0, None, (0, 1)),  # the contributors travel as a tuple
            ("apply", 3, None, [{"lr": 0.1}]),
            ("skip", 4),
            ("load_weights", [float(j)]),
            ("load_optimizer_state", [{"a": j}], [{"lr": 0.2}]),
            ("wait_for_version", 0, 5.0),
        ]
    with pytest.raises(ValueError, match="one per shard"):
        group.load_weights([[torch.zeros(1)]])
    with pytest.raises(TypeError, match="not in this process"):
        group.push(0, 0, 0, [torch.zeros(1)])


def test_step_and_version_count_closed_steps_and_the_epoch_stays():
    model, engine = _engine(num_workers=2)
    assert (engine.step, engine.version, engine.epoch) == (0, 0, 0)
    grads = [torch.ones_like(p) for p in model.parameters()]
    assert engine.push(0, 0, grads) is None
    assert (engine.step, engine.version) == (0, 0)  # open until every worker pushed
    assert engine.push(1, 0, grads) is not None
    assert (engine.step, engine.version, engine.epoch) == (1, 1, 0)
    assert [s["version"] for s in engine.shards.statuses()] == [1, 1]  # what a pull for version 1 waits for
    # a skipped (non-finite) step closes too and publishes a version: its pulls must not hang
    bad = [torch.full_like(p, float("nan")) for p in model.parameters()]
    engine.push(0, 1, bad)
    result = engine.push(1, 1, bad)
    assert result is not None and result.skipped
    assert (engine.step, engine.version, engine.skipped_steps) == (2, 2, 1)
    assert [s["version"] for s in engine.shards.statuses()] == [2, 2]
    assert engine.bump_epoch() == 1 and engine.epoch == 1 and (engine.step, engine.version) == (2, 2)


def test_membership_changes_bump_the_epoch():
    pytest.importorskip("google.protobuf")
    from paramserver.core.params import normalize_params
    from paramserver.service.coordinator_host import CoordinatorHost, LocalFleet
    from paramserver.service.shard_host import ShardHost
    from paramserver.wire.jobconfig import to_proto

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = ps.JobConfig(optimizer=ps.OptimizerConfig("SGD", {"lr": 0.1}), num_workers=2, max_workers=3)
    host = CoordinatorHost(LocalFleet([ShardHost(0), ShardHost(1)]), ["shard-0", "shard-1"])
    job = host.create_job("j", to_proto(config, normalize_params(model.named_parameters())))
    job.coordinator.load_state_dict({"model": dict(model.named_parameters())})  # rank 0's initial weights
    assert job.epoch == 0 and job.members == [0, 1]  # the ranks below num_workers, on a lease from the start
    host.join_job("j", 1, timeout=5.0)  # a member already: a join changes nothing
    assert job.epoch == 0
    host.join_job("j", 2, timeout=5.0)  # below max_workers: a new member
    assert job.epoch == 1 and job.members == [0, 1, 2]
    host.leave_job("j", 1)
    host.leave_job("j", 1)  # leaving twice changes nothing
    assert job.epoch == 2 and job.members == [0, 2]
    assert [s["members"] for s in job.coordinator.shards.statuses()] == [[0, 2], [0, 2]]  # the shards wait for these
    status = host.status("j")
    assert (status["step"], status["version"], status["epoch"]) == (0, 0, 2)
    assert {"num_workers", "members", "shards", "lrs", "hyperparameters", "skipped_steps", "last_total_norm", "waiting_for"} <= set(status)
    assert status["members"] == [0, 2]
    assert status["changes"] == [{"rank": 2, "reason": "joined", "step": 0}, {"rank": 1, "reason": "left", "step": 0}]


def test_the_actor_shard_and_its_process_offer_every_call():
    pytest.importorskip("ray")
    pytest.importorskip("grpc")
    from paramserver.hosting.actors import ShardProcess
    from paramserver.hosting.replicas import ActorShard, RayShardGroup

    assert issubclass(RayShardGroup, ShardGroup)
    for name in PROTOCOL_CALLS:
        assert name in vars(ActorShard), f"ActorShard lacks {name}"
        assert callable(getattr(ShardProcess, name, None)), f"ShardProcess lacks {name}"
    assert not hasattr(ShardProcess, "call")  # no method names as strings
