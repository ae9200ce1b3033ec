"""The core of standbys and coordinator recovery, without Ray: a standby that takes its primary's reduced mean
applies the same update bit for bit; a copy of a shard's whole state (``replica_state`` / ``adopt``) goes on like
it; a step whose close was interrupted by a lost shard stays open and closes on ``recheck``; a new coordinator
takes a job over from its shards' records (``resume``), also when the last update reached only some of them."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch

import paramserver as ps
from paramserver.core.coordinator import Coordinator
from paramserver.core.errors import FutureStepError, ShardLostError
from paramserver.core.shard import Shard
from paramserver.core.sharding import pack
from paramserver.core.shards import ShardGroup

W, SHARDS = 2, 2
CONFIG = ps.JobConfig(num_workers=W, clip=ps.ClipConfig(max_norm=0.5))
SCHEDULER = ps.SchedulerSpec("StepLR", {"step_size": 2, "gamma": 0.5})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def _engine(model: torch.nn.Module | None = None) -> ps.StepEngine:
    model = model or _model()
    return ps.StepEngine(model.named_parameters(), "Adam", lr=0.1, config=CONFIG, num_shards=SHARDS, scheduler=SCHEDULER)


def _grads(step: int, rank: int, model: torch.nn.Module) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    grads: list[torch.Tensor | None] = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    if step % 3 == 1:
        grads[1] = None  # a parameter without a gradient this step: torch.optim skips it
    return grads


def _train(engine: ps.StepEngine, steps: range, model: torch.nn.Module) -> None:
    for step in steps:
        for rank in range(W):
            engine.push(rank, step, _grads(step, rank, model))


def _same_shard(a: Shard, b: Shard) -> None:
    assert (a.version, a.generation) == (b.version, b.generation)
    for x, y in zip(a.weights, b.weights):
        assert torch.equal(x, y)
    for sa, sb in zip(a.optimizer_state(), b.optimizer_state()):
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


class MirroredGroup(ShardGroup):
    """Primaries with a standby each, as the Ray hosting pairs them: a primary's mean (taken now or ahead) goes to
    the standby, and the updates go to both."""

    def __init__(self, primaries: list[Shard], standbys: list[Shard]) -> None:
        super().__init__(primaries)
        self.standbys = standbys

    def reduce(self, step, norm_type, clip_value, contributors=None, known=None):
        norms = super().reduce(step, norm_type, clip_value, contributors, known=known)
        for primary, standby in zip(self.shards, self.standbys):
            standby.hold_reduced(step, *primary.reduced(step))
        return norms

    def apply(self, step, clip_coef, hyperparameters, record=None):
        super().apply(step, clip_coef, hyperparameters, record)
        for standby in self.standbys:
            standby.apply(step, clip_coef, hyperparameters, record)

    def skip(self, step, record=None):
        super().skip(step, record)
        for standby in self.standbys:
            standby.skip(step, record)


def test_a_standby_fed_the_reduced_mean_holds_the_primarys_state_bit_for_bit():
    model = _model()
    engine = _engine(model)
    standbys = [engine.job.make_shard(j) for j in range(SHARDS)]
    engine.shards = MirroredGroup(engine.shards.shards, standbys)  # type: ignore[arg-type]
    _train(engine, range(6), model)
    for primary, standby in zip(engine.shards.shards, standbys):
        _same_shard(primary, standby)
        assert standby.last_record() == primary.last_record() and primary.last_record()["version"] == 6
        assert standby.is_late_retry(1, 5)  # it knows who pushed the step that closed last


class LaggingGroup(MirroredGroup):
    """As the Ray hosting runs them on a busy machine: each standby's update runs on a thread of its own and
    ``lag_s`` late; the step's close waits for it, but the workers pushed the next step once the primary's update
    ended, so the primary's next mean reaches a standby still in the update before."""

    lag_s = 0.1

    def __init__(self, primaries: list[Shard], standbys: list[Shard]) -> None:
        super().__init__(primaries, standbys)
        self.updates = [ThreadPoolExecutor(max_workers=1) for _ in standbys]
        self.done: list[Future] = []
        self.behind = 0  # means handed to a standby still in its update of the step before

    def reduce(self, step, norm_type, clip_value, contributors=None, known=None):
        norms = ShardGroup.reduce(self, step, norm_type, clip_value, contributors, known=known)
        for primary, standby in zip(self.shards, self.standbys):
            self.behind += standby.version < step
            standby.hold_reduced(step, *primary.reduced(step))
        return norms

    def apply(self, step, clip_coef, hyperparameters, record=None):
        for done in self.done:  # the close before waited for its standbys' updates (the workers did not)
            done.result(timeout=10.0)
        ShardGroup.apply(self, step, clip_coef, hyperparameters, record)
        for standby, updates in zip(self.standbys, self.updates):
            def late(standby: Shard = standby) -> None:
                time.sleep(self.lag_s)
                standby.apply(step, clip_coef, hyperparameters, record)

            self.done.append(updates.submit(late))

    def close(self) -> None:
        for updates in self.updates:
            updates.shutdown(wait=True, cancel_futures=True)


def _primary_at_step_2_and_a_standby(model: torch.nn.Module) -> tuple[ps.StepEngine, Shard, Shard]:
    engine = _engine(model)
    standby = engine.job.make_shard(0)
    _train(engine, range(2), model)
    primary = engine.shards.shards[0]
    for rank in range(W):
        primary.push(rank, 2, pack(engine.plan, 0, _grads(2, rank, model)))
    primary.reduce(2, 2.0)
    return engine, primary, standby


def test_a_standby_more_than_a_step_behind_refuses_the_mean_and_keeps_its_state():
    engine, primary, standby = _primary_at_step_2_and_a_standby(_model())  # the standby is at step 0
    before = [w.clone() for w in standby.weights]
    with pytest.raises(FutureStepError, match="step 2 is not open yet"):
        standby.hold_reduced(2, *primary.reduced(2))
    assert standby.version == 0 and standby.accumulator.contributors is None and standby._held_ahead is None
    assert all(torch.equal(a, b) for a, b in zip(before, standby.weights))


class HandedTwice(LaggingGroup):
    """A primary that hands its standby each mean twice, a wrong one first (a mean taken ahead over workers the
    close did not keep, then taken again): the second replaces the first, also while it is kept for later."""

    def reduce(self, step, norm_type, clip_value, contributors=None, known=None):
        norms = ShardGroup.reduce(self, step, norm_type, clip_value, contributors, known=known)
        for primary, standby in zip(self.shards, self.standbys):
            means, with_grad, who = primary.reduced(step)
            self.behind += standby.version < step
            standby.hold_reduced(step, [2 * m for m in means], with_grad, who)
            standby.hold_reduced(step, means, with_grad, who)
        return norms


@pytest.mark.parametrize("group_class", [LaggingGroup, HandedTwice], ids=["lagging", "handed-twice"])
def test_a_standby_still_in_the_update_before_keeps_the_next_mean_for_its_update(group_class):
    model = _model()
    engine = _engine(model)
    standbys = [engine.job.make_shard(j) for j in range(SHARDS)]
    group = group_class(engine.shards.shards, standbys)
    engine.shards = group  # type: ignore[assignment]
    try:
        _train(engine, range(4), model)
        for done in group.done:
            done.result(timeout=10.0)  # each standby update found its step's mean
    finally:
        group.close()
    assert group.behind >= 3  # the standbys were behind at the steps after the first
    for primary, standby in zip(engine.shards.shards, standbys):
        _same_shard(primary, standby)


def test_a_mean_kept_for_the_next_step_is_not_taken_after_a_load():
    engine, primary, _ = _primary_at_step_2_and_a_standby(_model())
    standby = engine.job.make_shard(0)
    standby.start_generation(1)  # at step 1, in generation 1
    standby.hold_reduced(2, *primary.reduced(2))  # kept for step 2
    standby.start_generation(2)  # a load opens step 2 in generation 2: the mean kept is of the old weights
    with pytest.raises(AssertionError, match="apply before reduce"):
        standby.apply(2, None, [])


def test_a_copy_of_a_shards_whole_state_goes_on_like_it():
    model = _model()
    engine, reference = _engine(model), _engine(_model())
    _train(engine, range(3), model)
    _train(reference, range(6), _model())
    copies = []
    for primary in engine.shards.shards:
        copy = engine.job.make_shard(primary.shard_id)
        copy.adopt(primary.replica_state())
        _same_shard(primary, copy)
        copies.append(copy)
    engine.shards = ShardGroup(copies)  # the copies take over
    _train(engine, range(3, 6), model)
    for mine, theirs in zip(copies, reference.shards.shards):
        _same_shard(mine, theirs)


def test_reduce_runs_again_unchanged_and_refuses_other_contributors():
    engine = _engine()
    shard = engine.shards.shards[0]
    grads = [torch.ones(layout.numel, dtype=layout.dtype) for layout in shard.layouts]
    for rank in range(W):
        shard.push(rank, 0, grads)
    first = shard.reduce(0, 2.0, None, (0, 1))
    means = [b.clone() for b in shard.accumulator.sums]
    again = shard.reduce(0, 2.0, None, (0, 1))  # a close interrupted by a lost shard runs again
    assert all(torch.equal(a, b) for a, b in zip(first, again) if a is not None)
    assert all(torch.equal(a, b) for a, b in zip(means, shard.accumulator.sums))
    with pytest.raises(ValueError, match="mean is over workers"):
        shard.reduce(0, 2.0, None, (0,))


class LosesAShardOnce(ShardGroup):
    """A group whose first reduce finds a shard's process gone (after the other shards reduced)."""

    lost = False

    def reduce(self, step, norm_type, clip_value, contributors=None, known=None):
        norms = super().reduce(step, norm_type, clip_value, contributors, known=known)
        if not self.lost:
            self.lost = True
            raise ShardLostError("shard 1's process died", 1)
        return norms


def test_a_close_interrupted_by_a_lost_shard_stays_open_and_closes_on_recheck():
    model = _model()
    engine, reference = _engine(model), _engine(_model())
    engine.shards = LosesAShardOnce(engine.shards.shards)
    _train(engine, range(1), model)  # step 0's close is interrupted: no update, no error for the push
    assert (engine.step, engine.interrupted) == (0, True)
    with pytest.raises(FutureStepError):  # step 1 is not open yet
        engine.push(0, 1, _grads(1, 0, model))
    result = engine.recheck()
    assert result is not None and result.step == 0 and (engine.step, engine.interrupted) == (1, False)
    _train(engine, range(1, 4), model)
    _train(reference, range(4), _model())
    for mine, theirs in zip(engine.shards.shards, reference.shards.shards):
        _same_shard(mine, theirs)


def _resumed(shards: ShardGroup) -> ps.StepEngine:
    """A new coordinator (this process's view of a restarted one) over the shards another one trained."""
    fresh = _engine()
    Coordinator.__init__(fresh, fresh.job, shards)
    fresh.resume()
    return fresh


def test_a_new_coordinator_takes_the_job_over_from_the_shards_records():
    model = _model()
    engine, reference = _engine(model), _engine(_model())
    _train(engine, range(5), model)
    resumed = _resumed(engine.shards)
    assert (resumed.step, resumed.version, resumed.generation) == (5, 5, 0)
    assert resumed.get_last_lr() == engine.get_last_lr() and resumed.schedule.state_dict() == engine.schedule.state_dict()
    _train(resumed, range(5, 8), model)
    _train(reference, range(8), _model())
    for mine, theirs in zip(resumed.shards.shards, reference.shards.shards):
        _same_shard(mine, theirs)
    assert resumed.get_last_lr() == reference.get_last_lr()


class DiesDuringApply(ShardGroup):
    """The coordinator dies while sending a step's update: only shard 0 gets it."""

    def apply(self, step, clip_coef, hyperparameters, record=None):
        self.shards[0].apply(step, clip_coef, hyperparameters, record)
        raise SystemExit("the coordinator's process died")


def test_a_new_coordinator_finishes_an_update_that_reached_only_some_shards():
    model = _model()
    engine, reference = _engine(model), _engine(_model())
    _train(engine, range(3), model)
    engine.shards = DiesDuringApply(engine.shards.shards)
    with pytest.raises(SystemExit):
        _train(engine, range(3, 4), model)
    versions = [s.version for s in engine.shards.shards]
    assert versions == [4, 3]
    resumed = _resumed(ShardGroup(engine.shards.shards))
    assert [s.version for s in resumed.shards.shards] == [4, 4] and resumed.step == 4
    _train(resumed, range(4, 7), model)
    _train(reference, range(7), _model())
    for mine, theirs in zip(resumed.shards.shards, reference.shards.shards):
        _same_shard(mine, theirs)


def test_a_new_coordinator_closes_a_step_whose_pushes_all_came_while_it_was_down():
    model = _model()
    engine, reference = _engine(model), _engine(_model())
    _train(engine, range(2), model)
    for j, shard in enumerate(engine.shards.shards):  # every push of step 2 is in; the reports were lost
        for rank in range(W):
            grads = _grads(2, rank, model)
            full = [torch.zeros(p.shape) if g is None else g for p, g in zip(model.parameters(), grads)]
            shard.push(rank, 2, pack(engine.plan, j, full), [i for i, g in enumerate(grads) if g is None])
    resumed = _resumed(engine.shards)
    assert resumed.step == 3  # closed on resume
    _train(resumed, range(3, 5), model)
    _train(reference, range(5), _model())
    for mine, theirs in zip(resumed.shards.shards, reference.shards.shards):
        _same_shard(mine, theirs)
