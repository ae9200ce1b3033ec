"""A shard host reports a completed shard in the background: the push that completes it is answered before the
step closes, the pulls wait for the close, and a close that fails ends them with ``JobFailedError`` at once
instead of at their deadline. No network: the host and its shard in this process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import paramserver as ps
from paramserver.core.errors import JobFailedError, StaleStepError
from paramserver.service.shard_host import ShardHost

WAIT_S = 10.0


class Reports:
    """A coordinator stand-in: records the reports; ``gate`` holds each one, ``error`` is raised by each."""

    def __init__(self, engine: ps.StepEngine, error: BaseException | None = None) -> None:
        self.engine = engine
        self.error = error
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple[int, int]] = []

    def shard_ready(self, shard, step, generation=None, holds=None, reduced=None):
        assert self.gate.wait(WAIT_S)
        self.calls.append((shard, step))
        if self.error is not None:
            raise self.error
        return self.engine.shard_ready(shard, step, generation, holds, reduced)


def _hosted(error: BaseException | None = None) -> tuple[ps.StepEngine, ShardHost, Reports]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    engine = ps.StepEngine(model.named_parameters(), "SGD", lr=0.1, config=ps.JobConfig(num_workers=2))
    host = ShardHost(0)
    reports = Reports(engine, error)
    host.add_job("j", engine.shards.shards[0], reports)
    return engine, host, reports


def _grads(host: ShardHost) -> list[torch.Tensor]:
    return [torch.ones(layout.numel, dtype=layout.dtype) for layout in host.shard("j").layouts]


def test_the_last_push_is_answered_before_the_step_closes():
    engine, host, reports = _hosted()
    reports.gate.clear()  # the coordinator is slow to close the step
    try:
        assert host.push("j", 0, 0, _grads(host)) == (True, 0)
        assert host.push("j", 1, 0, _grads(host)) == (True, 0)  # answered while the report waits
        assert host.shard("j").version == 0 and not reports.calls
        reports.gate.set()
        assert host.shard("j").wait_for_version(1, WAIT_S) == 1
        deadline = time.monotonic() + WAIT_S
        while engine.step != 1 and time.monotonic() < deadline:  # the coordinator counts the step once its call returns
            time.sleep(0.01)
        assert reports.calls == [(0, 0)] and engine.step == 1
    finally:
        reports.gate.set()
        host.close()


def test_a_close_that_fails_ends_the_waiting_pulls_with_its_error():
    engine, host, _ = _hosted(RuntimeError("the update broke"))
    shard = host.shard("j")
    try:
        for worker in range(2):
            host.push("j", worker, 0, _grads(host))
        start = time.monotonic()
        with pytest.raises(JobFailedError, match=r"step 0 of job 'j' did not close: RuntimeError: the update broke"):
            shard.wait_for_version(1, WAIT_S)
        with pytest.raises(JobFailedError, match="the update broke"):
            asyncio.run(host.wait_async("j", 1, WAIT_S))
        assert time.monotonic() - start < WAIT_S / 2
        assert shard.wait_for_version(0, WAIT_S) == 0  # a pull of what is there is answered as before
        shard.start_generation(0)  # a load clears it
        assert shard.failed is None
        with pytest.raises(TimeoutError):
            shard.wait_for_version(1, 0.2)
    finally:
        host.close()


def test_a_report_the_job_moved_past_is_no_failure():
    engine, host, reports = _hosted(StaleStepError("step 0 has closed", 1))
    try:
        for worker in range(2):
            host.push("j", worker, 0, _grads(host))
        deadline = time.monotonic() + WAIT_S
        while not reports.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert reports.calls == [(0, 0)] and host.shard("j").failed is None
    finally:
        host.close()
