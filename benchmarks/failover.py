"""Failover time (issue 9): from a SIGKILL of a shard's primary to the next step that closes.

2 worker threads train the benchmarks' MLP with Adam through ``RemoteOptimizer`` on 2 shards of an embedded
local Ray. At each chosen step both workers have their gradients ready and wait at a barrier; the primary of
shard 1 is killed there, between steps, and the clock runs until both workers' next ``step()`` has returned.

- ``takeover_s``: ``replicas=1``; the standby takes over and ``step()`` just goes on. Ray restarts the killed
  process, which becomes the shard's new standby: the coordinator rebuilds it from the primary, holding the job
  meanwhile; ``rebuild_hold_s`` is the mean of those holds (its metric ``paramserver_standby_rebuild_seconds``).
- ``rollback_s``: ``replicas=0`` with checkpoints; ``step()`` raises ``RolledBackError``, the workers redo the
  step they are sent back to (forward and backward included), and the clock stops when that step has closed.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import batch, histogram_totals, make_mlp

W, SHARD, JOB = 2, 1, "failover"
WARMUP = 2  # steps before the first kill: the job exists on every process and the first steps' costs are paid
CHECKPOINT_EVERY = 2
GAP = 2 * CHECKPOINT_EVERY  # steps between two kills; every kill lands on a checkpoint, so no step is lost
WAIT_S = 60.0  # every wait is bounded by this
THREADS_S = 300.0  # the whole training of one measurement


def _primary_pid(service: Any) -> int | None:
    # None while Ray restarts the shard's process (placements() leaves it out until it answers)
    found = [p["pid"] for p in service.placements() if p["role"] == "primary" and p["shard"] == SHARD]
    return found[0] if found else None


def _wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {WAIT_S:.0f}s")
        time.sleep(0.05)


def _standby_ready(service: Any) -> bool:
    """Whether shard 1's standby can take over the job (it is rebuilt after each takeover): placements() lists
    a job on a standby once the coordinator counts its copy as current."""
    return any(p["role"] == "standby" and p["shard"] == SHARD and JOB in p["jobs"] for p in service.placements())


def _train(service: Any, kills: list[int], prepare: Callable[[int], None], rollback: bool) -> list[float]:
    """Train until the last kill's step has closed; for each kill, seconds from the kill to the close of the
    first step that both workers completed after it. ``rollback``: whether each kill must roll the job back."""
    import paramserver
    from workers.remote_optimizer import RemoteOptimizer

    gate = threading.Barrier(W, timeout=WAIT_S)
    killed: dict[int, float] = {}  # kill index -> time of the kill
    closed: list[dict[int, float]] = [{} for _ in kills]  # kill index -> rank -> its first step() after the kill
    errors: list[BaseException] = []
    rolled_back: list[int] = []  # err.step of every RolledBackError, any rank
    total = kills[-1] + 1

    def worker(rank: int) -> None:
        model = make_mlp()
        loss_fn = torch.nn.CrossEntropyLoss()
        with RemoteOptimizer(model.named_parameters(), "Adam", lr=1e-3, address=service.address, job=JOB, rank=rank,
                             num_workers=W, timeout=WAIT_S / 2, join_timeout=WAIT_S) as opt:
            step = opt.step_count
            while step < total:
                x, y = batch(step, rank)
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                k = kills.index(step) if step in kills and len(killed) == kills.index(step) else None
                if k is not None:  # a kill not yet made (a rollback comes back through its step)
                    gate.wait()
                    if rank == 0:
                        prepare(step)
                        pid = _primary_pid(service)
                        assert pid is not None, "the primary is not up"
                        os.kill(pid, signal.SIGKILL)
                        killed[k] = time.monotonic()
                    gate.wait()
                try:
                    opt.step()
                except paramserver.RolledBackError as err:
                    rolled_back.append(err.step)
                    step = err.step  # the model holds that step's weights: redo it with its own batch
                    continue
                for i in killed:
                    closed[i].setdefault(rank, time.monotonic())
                step += 1

    def guarded(rank: int) -> None:
        try:
            worker(rank)
        except Exception as exc:  # noqa: BLE001 - raised below; the barrier breaks so the other worker ends too
            errors.append(exc)
            gate.abort()

    threads = [threading.Thread(target=guarded, args=(r,), daemon=True) for r in range(W)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + THREADS_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"the workers did not finish within {THREADS_S:.0f}s")
    if errors:
        raise errors[0]
    # a takeover that rolled back, or a kill that went unnoticed, would measure something else
    if sorted(rolled_back) != (sorted(kills * W) if rollback else []):
        raise RuntimeError(f"kills at steps {kills}, rollbacks to {sorted(rolled_back)} (expected rollback: {rollback})")
    return [max(c.values()) - killed[i] for i, c in enumerate(closed)]


def _measure(repeats: int, rollback: bool, options: Callable[[str], dict[str, Any]],
             prepare: Callable[[Any, str], Callable[[int], None]], after: Callable[[Any], Any] | None = None) -> tuple[float, Any]:
    """Own service and temp dir (and own embedded Ray unless one is connected) for one measurement; all of them
    gone again on the way out. ``options`` and ``prepare`` get the temp dir; ``after(service)``, run once the
    training ended, reads what else the measurement wants from the service. Returns the median seconds from a
    kill to the next closed step, and what ``after`` returned."""
    import ray

    import paramserver

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    root = tempfile.mkdtemp(prefix="ps-failover-")
    started = not ray.is_initialized()
    if started:  # "local": a new embedded Ray, never a cluster that a stale RAY_ADDRESS names
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        service = paramserver.serve(2, cpus_per_shard=0.25, placement_timeout=WAIT_S, **options(root))
        try:
            kills = [WARMUP + i * GAP for i in range(repeats)]
            seconds = _train(service, kills, prepare(service, root), rollback)
            # shutdown() fails on a process that Ray is still restarting: let the service become whole first
            whole = 1 + 2 * (1 + options(root)["replicas"])
            _wait_for(lambda: len(service.placements()) == whole, "every process of the service back")
            return statistics.median(seconds), None if after is None else after(service)
        finally:
            service.shutdown()
    finally:
        if started:
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def takeover(repeats: int) -> dict[str, float]:
    """With a standby per shard: ``takeover_s``, the median seconds from a primary's SIGKILL to the next closed
    step, and ``rebuild_hold_s``, the mean time the coordinator held the job to rebuild a standby (at least one
    rebuild per kill, the last one waited for)."""

    def prepare(service: Any, _root: str) -> Callable[[int], None]:
        return lambda _step: _wait_for(lambda: _standby_ready(service), "standby holding the job")

    def rebuild_hold_s(service: Any) -> float:
        _wait_for(lambda: _standby_ready(service), "the standby rebuilt after the last kill")
        [coordinator] = [p for p in service.placements() if p["role"] == "coordinator"]
        per_shard = histogram_totals(coordinator["metrics"], "paramserver_standby_rebuild_seconds", JOB, by="shard").values()
        total, count = sum(t for t, _ in per_shard), sum(c for _, c in per_shard)
        if count < repeats:  # one a kill; a standby that fell behind meanwhile is rebuilt once more
            raise RuntimeError(f"{repeats} kills but {count} standby rebuilds counted")
        return total / count

    seconds, hold_s = _measure(repeats, False, lambda _root: {"replicas": 1, "metrics_port": 0}, prepare, rebuild_hold_s)
    return {"takeover_s": seconds, "rebuild_hold_s": hold_s}


def rollback_s(repeats: int) -> float:
    """Median seconds from a primary's SIGKILL to the close of the step the job rolled back to, no standby."""
    from paramserver.checkpoint import steps

    def prepare(service: Any, root: str) -> Callable[[int], None]:
        def ready(step: int) -> None:
            # the checkpoint of this step is written in the background: wait, so the rollback loses no step
            _wait_for(lambda: step in steps(root, JOB), f"checkpoint of step {step}")
            _wait_for(lambda: _primary_pid(service) is not None, "primary of the restarted shard")
        return ready

    def options(root: str) -> dict[str, Any]:
        return {"replicas": 0, "checkpoint_dir": root, "checkpoint_every": CHECKPOINT_EVERY}

    return _measure(repeats, True, options, prepare)[0]
