"""Shard failure on Ray with ``replicas=0`` (issue 9): a SIGKILLed shard actor comes back empty (Ray's
max_restarts), the coordinator notices and rolls the job back to its newest checkpoint; every worker's
``step()`` raises ``RolledBackError`` at that step with the checkpoint's weights in its model, and a loop that
resumes from ``err.step`` ends bitwise equal to the uninterrupted run. Without a checkpoint the job fails
clearly. On the shared two-node cluster; every wait is bounded."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import paramserver as ps
from paramserver.checkpoint import steps
from paramserver.core.errors import JobFailedError
from tests.helpers.reference import Reference, make_model, run_threads, worker_grads
from workers.remote_optimizer import RemoteOptimizer

pytestmark = pytest.mark.ray

W, KILL_AFTER, TOTAL = 2, 5, 8
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}
RAY = {"cpus_per_shard": 0.25, "placement": "SPREAD", "placement_timeout": 60.0}
WAIT_S = 60.0


def _primary_pid(service, shard: int) -> int:
    [entry] = [p for p in service.placements() if p["role"] == "primary" and p["shard"] == shard]
    return entry["pid"]


def _kill_when(reached: threading.Event, resume: threading.Event, kill) -> None:
    """Wait (bounded) for worker 0 to reach the kill point, kill, then let it go on."""
    assert reached.wait(WAIT_S), "worker 0 did not reach the kill point"
    try:
        kill()
    finally:
        resume.set()


def _train(address: str, job: str, models: list[torch.nn.Module], reached: threading.Event, resume: threading.Event,
           rollbacks: list[list[int]], noticed: dict[int, float]) -> None:
    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), "Adam", address=address, job=job, rank=rank, num_workers=W,
                             timeout=30, join_timeout=60, **OPTIONS) as opt:
            start = opt.step_count
            for _attempt in range(3):
                try:
                    for step in range(start, TOTAL):
                        if rank == 0 and step == KILL_AFTER and not reached.is_set():
                            reached.set()
                            assert resume.wait(WAIT_S)
                        grads = worker_grads(list(model.parameters()), step, W)[rank]
                        for p, g in zip(model.parameters(), grads):
                            p.grad = g.clone()
                        opt.step()
                    return
                except ps.RolledBackError as err:
                    assert opt.step_count == err.step
                    noticed.setdefault(rank, time.monotonic())
                    rollbacks[rank].append(err.step)
                    start = err.step
            raise AssertionError(f"worker {rank} rolled back more than twice: {rollbacks[rank]}")

    run_threads(W, worker, timeout=240)


def test_a_killed_shard_rolls_the_job_back_to_its_checkpoint_and_training_ends_bitwise_equal(ray_cluster, tmp_path):
    d, job = str(tmp_path), "ray-failover"
    models = [make_model() for _ in range(W)]
    reached, resume = threading.Event(), threading.Event()
    rollbacks: list[list[int]] = [[] for _ in range(W)]
    timings: dict[str, float] = {}
    service = ps.serve(2, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        old = {p["shard"]: p for p in service.placements() if p["role"] == "primary"}

        def kill() -> None:
            deadline = time.monotonic() + WAIT_S
            while 4 not in steps(d, job):  # the checkpoint of step 4 is written in the background
                assert time.monotonic() < deadline, f"no checkpoint of step 4: {steps(d, job)}"
                time.sleep(0.05)
            os.kill(old[1]["pid"], signal.SIGKILL)
            timings["killed"] = time.monotonic()

        killer = threading.Thread(target=_kill_when, args=(reached, resume, kill), daemon=True)
        killer.start()
        noticed: dict[int, float] = {}
        _train(service.address, job, models, reached, resume, rollbacks, noticed)
        killer.join(WAIT_S)
        assert "killed" in timings
        assert rollbacks == [[4], [4]]
        # noticed within seconds (a shard restart), never after the 120 s control timeout
        assert max(noticed.values()) - timings["killed"] < 30.0, (noticed, timings)
        print(f"kill -> RolledBackError: {max(noticed.values()) - timings['killed']:.2f}s")
        new = {p["shard"]: p for p in service.placements() if p["role"] == "primary"}
        assert new[1]["pid"] != old[1]["pid"] and new[1]["address"] != old[1]["address"]
        assert new[0]["pid"] == old[0]["pid"]
    finally:
        service.shutdown()

    model = make_model()
    ref = Reference(model.parameters(), torch.optim.Adam, OPTIONS)
    for step in range(TOTAL):
        ref.step(worker_grads(list(model.parameters()), step, W))
    for m in models:
        for a, b in zip(m.parameters(), model.parameters()):
            assert torch.equal(a.detach(), b.detach())


def test_a_killed_shard_without_a_checkpoint_fails_the_job_clearly(ray_cluster):
    job = "ray-failover-nockpt"
    service = ps.serve(2, **RAY)
    try:
        pid = _primary_pid(service, 0)
        model = make_model()
        with RemoteOptimizer(model.named_parameters(), "Adam", address=service.address, job=job, rank=0, num_workers=1,
                             timeout=30, join_timeout=60, **OPTIONS) as opt:
            for step in range(2):
                for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), step, 1)[0]):
                    p.grad = g.clone()
                opt.step()
            os.kill(pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(JobFailedError, match="no checkpoint"):
                opt.step()
            assert time.monotonic() - start < WAIT_S
            assert opt.step_count == 2
    finally:
        service.shutdown()
