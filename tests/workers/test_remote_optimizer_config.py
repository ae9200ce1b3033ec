"""RemoteOptimizer's job options come from the configuration tree, and error_if_nonfinite raises on the
workers as clip_grad_norm_ raises."""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch

from paramserver.core.config import REMOTE_OPTIMIZER_KWARGS, JobConfig, default_of
from paramserver.service.local import serve_local
from workers.remote_optimizer import NonFiniteNormError, RemoteOptimizer


def _leaves(node: object, prefix: str = "") -> set[str]:
    out = set()
    for f in dataclasses.fields(node):  # type: ignore[arg-type]
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out |= _leaves(value, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_every_job_option_is_a_keyword_with_the_trees_default():
    params = inspect.signature(RemoteOptimizer.__init__).parameters
    for kwarg, path in REMOTE_OPTIMIZER_KWARGS.items():
        assert kwarg in params, f"RemoteOptimizer has no {kwarg} (JobConfig.{path})"
        assert params[kwarg].default == default_of(path), f"{kwarg} defaults to {params[kwarg].default}, JobConfig.{path} to {default_of(path)}"
    # the optimizer, its kwargs, the groups and the scheduler come as torch takes them: positionally, **kwargs, params,
    # scheduler=/scheduler_kwargs=/scheduler_interval=
    by_other_means = {"optimizer.name", "optimizer.kwargs", "groups", "scheduler"}
    assert _leaves(JobConfig()) - by_other_means == set(REMOTE_OPTIMIZER_KWARGS.values())
    assert {"scheduler", "scheduler_kwargs", "scheduler_interval"} <= set(params)


@pytest.fixture(scope="module")
def service():
    with serve_local(num_shards=2) as server:
        yield server


def test_error_if_nonfinite_raises_on_every_worker_and_skips_the_step(service):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    models = [model, copy.deepcopy(model)]
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opts = [RemoteOptimizer(m.parameters(), "SGD", lr=0.1, address=service.address, job="nonfinite", num_workers=2, rank=r,
                            clip_grad_norm=1.0, error_if_nonfinite=True) for r, m in enumerate(models)]
    errors: list[BaseException | None] = [None, None]

    def step(rank: int, bad: bool) -> None:
        opts[rank].zero_grad()
        models[rank](torch.ones(2, 4)).sum().backward()
        if bad and rank == 1:
            models[rank].weight.grad[0, 0] = float("inf")
        try:
            opts[rank].step()
        except NonFiniteNormError as exc:
            errors[rank] = exc

    import threading

    try:
        for t, bad in enumerate([False, True, False]):
            errors[:] = [None, None]
            threads = [threading.Thread(target=step, args=(r, bad)) for r in range(2)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(timeout=60)
            assert not any(th.is_alive() for th in threads)
            if bad:
                # as clip_grad_norm_(error_if_nonfinite=True) raises, on every worker; nothing was applied
                assert all(isinstance(e, RuntimeError) and "non-finite" in str(e) for e in errors), errors
                continue
            assert errors == [None, None]
            ref_opt.zero_grad()
            ref(torch.ones(2, 4)).sum().backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            ref_opt.step()
        assert [o.step_count for o in opts] == [3, 3]
        for m in models:
            for p, q in zip(m.parameters(), ref.parameters()):
                assert torch.equal(p, q)
    finally:
        for o in opts:
            o.close()
