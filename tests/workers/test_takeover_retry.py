"""``RemoteOptimizer.step()`` gets over a shard's standby taking over (issue 9, ``replicas=1``) without the
training loop noticing: it joins again, pushes the open step again to the moved shard (and to any whose push
failed) and pulls again. serve_local, one worker; the takeover is staged on the client side: the first pull
(or one push) fails with ``ConnectionError`` and the rejoin says shard 1 moved, the generation unchanged (or
changed: a rollback). Through shared memory the pull is the pushes' own second half (one call per shard a
step): there the staged pull failure is the last shard's push failing once the shard took it. Pushes the shards
already applied answer "applied", so the weights stay exactly those of torch.optim. No Ray, no process killed;
every wait has a deadline."""

from __future__ import annotations

import itertools
from concurrent.futures import Future

import pytest
import torch

from paramserver.core.errors import RolledBackError, StateReloadedError
from paramserver.service.local import serve_local
from workers import remote_optimizer
from workers.remote_optimizer import RemoteOptimizer

T = 30.0  # every wait's deadline
LR, MOMENTUM = 0.05, 0.9
STEPS = 4
_jobs = itertools.count()


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def backward(model: torch.nn.Module, t: int) -> None:
    g = torch.Generator().manual_seed(1000 + t)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()


def reference(steps: int) -> torch.nn.Module:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    for t in range(steps):
        opt.zero_grad()
        backward(model, t)
        opt.step()
    return model


def assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


@pytest.fixture(scope="module")
def service():
    svc = serve_local(2)
    yield svc
    svc.shutdown()


class Staged:
    """Wraps ``opt.client``'s pull, push_shard and join_job: fails what the test asks for, makes each rejoin
    report ``moved`` shards (and, with ``generation``, another weights generation), and records the calls."""

    def __init__(self, opt: RemoteOptimizer) -> None:
        self.opt, client = opt, opt.client
        self.real_pull, self.real_push, self.real_join = client.pull, client.push_shard, client.join_job
        client.pull, client.push_shard, client.join_job = self.pull, self.push_shard, self.join_job
        self.pull_failures = 0  # the next pulls that fail
        self.push_failures: dict[tuple[int, int], BaseException] = {}  # (step, shard): the error of its next push
        self.moved: list[int] = [1]
        self.generation: int | None = None
        self.pushes: list[tuple[int, int]] = []
        self.joins = 0

    def pull(self, *args, **kwargs):
        if self.pull_failures:
            self.pull_failures -= 1
            raise ConnectionError("staged: the shard is gone")
        return self.real_pull(*args, **kwargs)

    def push_shard(self, worker, step, shard, *args, pull_min_version=None, **kwargs) -> Future:
        self.pushes.append((step, shard))
        error = self.push_failures.pop((step, shard), None)
        future: Future = Future()
        if error is not None:
            future.set_exception(error)  # never sent
            return future
        sent = self.real_push(worker, step, shard, *args, pull_min_version=pull_min_version, **kwargs)
        if pull_min_version is None or not self.pull_failures or shard != self.opt.plan.num_shards - 1:
            return sent
        # the push that pulls too: the shard took the gradients (and the step closed), then the pull failed
        self.pull_failures -= 1
        sent.add_done_callback(lambda _: future.set_exception(ConnectionError("staged: the shard is gone")))
        return future

    def join_job(self, rank, timeout=None):
        self.joins += 1
        info = self.real_join(rank, timeout)
        self.opt.client.moved = list(self.moved)
        if self.generation is not None:
            info.generation = self.generation
        return info


def connect(service, **kwargs) -> tuple[torch.nn.Module, RemoteOptimizer, Staged]:
    model = make_model()
    opt = RemoteOptimizer(
        model.named_parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, address=service.address, job=f"takeover-{next(_jobs)}",
        timeout=T, join_timeout=T, **kwargs,
    )
    return model, opt, Staged(opt)


def train(model: torch.nn.Module, opt: RemoteOptimizer, steps: range) -> None:
    for t in steps:
        opt.zero_grad()
        backward(model, t)
        opt.step()


@pytest.mark.parametrize("transport", ["auto", "grpc"])  # the pull as the pushes' second half, and as a call of its own
@pytest.mark.parametrize("push_during_backward", [False, True])
@pytest.mark.parametrize("failures", [1, 2])
def test_a_takeover_on_the_pull_is_invisible(service, push_during_backward, failures, transport) -> None:
    model, opt, staged = connect(service, push_during_backward=push_during_backward, transport=transport)
    with opt:
        assert opt.transport == ("shared_memory" if transport == "auto" else "grpc")
        train(model, opt, range(1))
        staged.pull_failures = failures  # the step closed on the shards; its pull fails (twice: killed again)
        train(model, opt, range(1, STEPS))
        assert opt.step_count == STEPS
        assert staged.joins == failures
        # after each failure step 1 went again to the moved shard (which answered "applied")
        assert staged.pushes.count((1, 1)) == 1 + failures
        if transport == "grpc":
            assert staged.pushes.count((1, 0)) == 1
        else:  # shard 0's push (which pulls too) goes again if it was still under way when shard 1's failed
            assert 1 <= staged.pushes.count((1, 0)) <= 1 + failures
    assert_same_weights(model, reference(STEPS))


@pytest.mark.parametrize("push_during_backward", [False, True])
def test_a_takeover_on_a_push_is_invisible(service, push_during_backward) -> None:
    model, opt, staged = connect(service, push_during_backward=push_during_backward)
    staged.moved = [0]  # shard 0 moved; the push that failed went to shard 1: both get step 1 again
    staged.push_failures[(1, 1)] = ConnectionError("staged: the shard is gone")
    with opt:
        train(model, opt, range(STEPS))
        assert opt.step_count == STEPS
        assert staged.joins == 1
        assert staged.pushes.count((1, 0)) == 2 and staged.pushes.count((1, 1)) == 2
    assert_same_weights(model, reference(STEPS))


def test_another_generation_on_rejoin_is_a_rollback(service) -> None:
    model, opt, staged = connect(service)
    with opt:
        train(model, opt, range(1))
        staged.pull_failures, staged.generation = 1, 7
        with pytest.raises(RolledBackError) as err:
            train(model, opt, range(1, 2))
        assert err.value.step == opt.step_count == 2  # (staged: the job did not roll back, so it is where it was)
        assert staged.pushes.count((1, 1)) == 1  # nothing pushed again


def test_a_push_refused_after_a_takeover_is_a_rollback(service) -> None:
    model, opt, staged = connect(service)
    staged.push_failures[(1, 1)] = ConnectionError("staged: the shard is gone")
    with opt:
        train(model, opt, range(1))
        real_push = staged.push_shard

        def push_shard(worker, step, shard, *args, **kwargs) -> Future:
            if staged.joins:  # the re-push after the takeover
                staged.push_failures[(step, shard)] = StateReloadedError("staged: another generation", 1)
            return real_push(worker, step, shard, *args, **kwargs)

        opt.client.push_shard = push_shard
        with pytest.raises(RolledBackError):
            train(model, opt, range(1, 2))
        assert staged.joins == 1


def test_no_shard_moved_raises_the_error(service) -> None:
    model, opt, staged = connect(service)
    staged.moved = []
    with opt:
        train(model, opt, range(1))
        staged.pull_failures = 1
        with pytest.raises(ConnectionError, match="staged"):
            train(model, opt, range(1, 2))
        assert staged.joins == 1 and opt.step_count == 1


def test_too_many_takeovers_in_one_step_raise(service) -> None:
    model, opt, staged = connect(service)
    with opt:
        train(model, opt, range(1))
        staged.pull_failures = 100
        with pytest.raises(ConnectionError, match="staged"):
            train(model, opt, range(1, 2))
        assert staged.joins == remote_optimizer._MAX_RECOVERIES
        assert opt.step_count == 1
