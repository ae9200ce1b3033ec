"""A state loaded over the wire reaches every worker (issue 9): the others never apply a gradient of the
old model, hold the loaded weights before their next step, and the step counter and scheduler say the
loaded step. serve_local, two RemoteOptimizers as threads, Adam + StepLR; every wait has a deadline."""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import paramserver as ps
from paramserver.service.local import serve_local
from workers.remote_optimizer import RemoteOptimizer

T = 30.0  # every wait's deadline
LR, STEP_SIZE, GAMMA = 0.01, 3, 0.5


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)


def backward(model: torch.nn.Module, t: int) -> None:
    x, y = batch(t)
    torch.nn.functional.mse_loss(model(x), y).backward()


def local_run(steps: int, save_at: int) -> tuple[dict, torch.nn.Module, list[float]]:
    """torch.optim alone: the state after ``save_at`` steps, the model after ``steps``, the lr at ``save_at``."""
    model = make_model()
    opt = torch.optim.Adam(model.named_parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=STEP_SIZE, gamma=GAMMA)
    state, lrs = None, None
    for t in range(steps):
        if t == save_at:
            state = copy.deepcopy({"model": dict(model.named_parameters()), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
            state["model"] = {k: v.detach().clone() for k, v in state["model"].items()}
            lrs = sched.get_last_lr()
        opt.zero_grad()
        backward(model, t)
        opt.step()
        sched.step()
    return state, model, lrs


@pytest.fixture(scope="module")
def service():
    svc = serve_local(2)
    yield svc
    svc.shutdown()


def connect(service, job: str, **options: object) -> tuple[list[torch.nn.Module], list[RemoteOptimizer]]:
    models = [make_model(), make_model()]
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(1.0)  # rank 1 starts from other weights: it must take the server's
    opts = []
    for rank in range(2):
        opts.append(RemoteOptimizer(
            models[rank].named_parameters(), torch.optim.Adam, lr=LR, address=service.address, job=job, num_workers=2, rank=rank,
            scheduler=torch.optim.lr_scheduler.StepLR, scheduler_kwargs={"step_size": STEP_SIZE, "gamma": GAMMA}, timeout=T,
            **options,
        ))
    return models, opts


def train_step(model: torch.nn.Module, opt: RemoteOptimizer, t: int) -> None:
    opt.zero_grad()
    backward(model, t)
    opt.step()


def both(pool: ThreadPoolExecutor, models, opts, t: int) -> None:
    futures = [pool.submit(train_step, models[r], opts[r], t) for r in range(2)]
    for f in futures:
        f.result(timeout=T)


def assert_holds(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name


def test_a_load_by_rank_0_reaches_rank_1_and_both_continue_exactly(service):
    state, local, lrs = local_run(15, save_at=10)
    models, opts = connect(service, "load-reaches")
    pool = ThreadPoolExecutor(2)
    try:
        opts[0].load_state_dict(state)  # the step comes from the state: Adam's step says 10
        assert opts[0].step_count == 10
        assert_holds(models[0], state["model"])
        models[1].zero_grad()
        backward(models[1], 0)  # a gradient of the old model
        with pytest.raises(ps.StateReloadedError) as err:
            opts[1].step()
        assert err.value.step == err.value.version == 10
        assert_holds(models[1], state["model"])
        assert opts[1].step_count == 10 and opts[0].step_count == 10
        assert opts[1].get_last_lr() == pytest.approx(lrs) and opts[0].get_last_lr() == opts[1].get_last_lr()
        assert opts[0].client.status().version == 10
        for t in range(opts[1].step_count, 15):  # the loop resumes from err.step with the same data
            both(pool, models, opts, t)
        for m in models:
            for a, b in zip(m.parameters(), local.parameters()):
                assert torch.equal(a, b)
        assert opts[0].step_count == opts[1].step_count == 15
    finally:
        pool.shutdown(wait=False)
        for o in opts:
            o.close()


def test_a_load_at_the_same_step_still_invalidates_the_old_weights(service):
    state, _, _ = local_run(10, save_at=5)
    models, opts = connect(service, "load-same-step")
    pool = ThreadPoolExecutor(2)
    try:
        both(pool, models, opts, 0)
        both(pool, models, opts, 1)
        assert opts[0].step_count == opts[1].step_count == 2
        opts[0].load_state_dict(state, step=2)  # the explicit step: the job's own
        assert opts[0].step_count == 2
        models[1].zero_grad()
        backward(models[1], 2)  # computed on the weights of before the load
        with pytest.raises(ps.StateReloadedError) as err:
            opts[1].step()
        assert err.value.step == 2 and opts[1].step_count == 2
        assert_holds(models[1], state["model"])
        server = opts[0].state_dict()
        assert_holds(models[0], server["model"])  # nothing stale was applied: the server holds the loaded weights
        for name, w in state["model"].items():
            assert torch.equal(server["model"][name], w)
        assert opts[0].client.status().version == 2
        both(pool, models, opts, 2)  # and the job goes on
        assert opts[0].step_count == opts[1].step_count == 3
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
    finally:
        pool.shutdown(wait=False)
        for o in opts:
            o.close()


def test_a_worker_waiting_in_its_pull_gets_the_reload(service):
    state, _, _ = local_run(10, save_at=10 - 3)
    models, opts = connect(service, "load-while-waiting")
    pool = ThreadPoolExecutor(1)
    try:
        waiting = pool.submit(train_step, models[1], opts[1], 0)  # pushes step 0, then waits for rank 0's push
        deadline = time.monotonic() + T
        while not all(1 in s.pushed_workers for s in opts[0].client.status().shards):
            assert time.monotonic() < deadline, "rank 1's push never arrived"
            assert not waiting.done(), waiting.exception()
            time.sleep(0.01)
        time.sleep(0.1)  # into its pull
        assert not waiting.done()
        opts[0].load_state_dict(state)
        with pytest.raises(ps.StateReloadedError) as err:
            waiting.result(timeout=T)
        assert err.value.step == 7 and opts[1].step_count == 7 and opts[0].step_count == 7
        assert_holds(models[1], state["model"])
        status = opts[0].client.status()
        assert status.version == 7 and all(list(s.pushed_workers) == [] for s in status.shards)  # the stale push was dropped
        server = opts[0].state_dict()
        for name, w in state["model"].items():
            assert torch.equal(server["model"][name], w)
    finally:
        pool.shutdown(wait=False)
        for o in opts:
            o.close()


def test_a_worker_that_reports_a_metric_after_anothers_load_gets_the_reload(service):
    state, _, _ = local_run(10, save_at=5)
    models, opts = connect(service, "load-then-metric")
    pool = ThreadPoolExecutor(2)
    try:
        both(pool, models, opts, 0)
        opts[0].load_state_dict(state)  # Adam's step says 5: the job moves to step 5
        models[1].zero_grad()
        backward(models[1], 1)
        with pytest.raises(ps.StateReloadedError) as err:
            opts[1].step(metric=0.5)  # its metric names step 1, which the job is no longer at
        assert err.value.step == 5 and opts[1].step_count == 5
        assert_holds(models[1], state["model"])
        both(pool, models, opts, 5)
        assert opts[0].step_count == opts[1].step_count == 6
    finally:
        pool.shutdown(wait=False)
        for o in opts:
            o.close()


def test_a_load_refuses_the_gradients_a_worker_pushed_during_backward(service):
    state, local, _ = local_run(8, save_at=4)
    models, opts = connect(service, "load-during-backward", push_during_backward=True)
    pool = ThreadPoolExecutor(2)
    try:
        both(pool, models, opts, 0)
        opts[0].load_state_dict(state)  # the job moves to step 4
        models[1].zero_grad()
        backward(models[1], 1)  # pushes start during backward, computed on the old weights
        with pytest.raises(ps.StateReloadedError) as err:
            opts[1].step()
        assert err.value.step == 4 and opts[1].step_count == 4
        assert_holds(models[1], state["model"])
        for t in range(4, 8):  # both go on from the loaded step with the same data as the local run
            both(pool, models, opts, t)
        for m in models:
            for a, b in zip(m.parameters(), local.parameters()):
                assert torch.equal(a, b)
    finally:
        pool.shutdown(wait=False)
        for o in opts:
            o.close()
