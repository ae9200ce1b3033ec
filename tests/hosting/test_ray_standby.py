"""Fault injection on a real Ray (issue 9): SIGKILL of a primary, of a standby and of the coordinator, at chosen
moments of a step (between steps, while pushes are in flight, during the update, during a checkpoint write).
With ``replicas=1`` no step is lost and the training loop sees no exception; a coordinator that dies comes back
on the same address and takes its jobs over from the shards. Every run ends bitwise equal to an uninterrupted
local ``torch.optim`` run. On the shared two-node cluster; every wait is bounded."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest
import torch

import paramserver as ps
from benchmarks.common import histogram_totals
from paramserver.checkpoint import load_torch_state, steps
from paramserver.dataplane.segments import PREFIX, leftover_names
from tests.helpers.reference import Reference, make_model, run_threads, worker_grads
from tests.helpers.training import wait_until
from workers.client import ServiceClient
from workers.remote_optimizer import RemoteOptimizer

pytestmark = pytest.mark.ray

W, TOTAL = 2, 8
OPTIONS = {"lr": 1e-2, "betas": (0.8, 0.9)}
RAY = {"cpus_per_shard": 0.25, "placement": "SPREAD", "placement_timeout": 60.0}
WAIT_S = 60.0


def _process(service: ps.RayService, role: str, shard: int | None = None) -> dict:
    [entry] = [p for p in service.placements() if p["role"] == role and p["shard"] == shard]
    return entry


def _kill(service: ps.RayService, role: str, shard: int | None = None) -> int:
    pid = _process(service, role, shard)["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def _standby_ready(service: ps.RayService, shard: int, job: str, not_pid: int | None = None) -> bool:
    """Whether shard ``shard`` has a standby (not process ``not_pid``) that holds a copy of ``job``."""
    return any(
        p["role"] == "standby" and p["shard"] == shard and job in p["jobs"] and p["pid"] != not_pid for p in service.placements()
    )


def _standby_rebuilds(service: ps.RayService, job: str) -> tuple[int, float]:
    """(count, seconds in all) of the standby rebuilds of ``job``, from the coordinator's metrics endpoint."""
    address = _process(service, "coordinator")["metrics"]
    per_shard = histogram_totals(address, "paramserver_standby_rebuild_seconds", job, by="shard").values()
    return sum(c for _, c in per_shard), sum(t for t, _ in per_shard)


def _train(address: str, job: str, before_step: Callable[[int, int], None] | None = None, *, total: int = TOTAL,
           optimizer: str = "Adam", options: dict | None = None) -> list[torch.nn.Module]:
    """W worker threads train ``total`` steps on the reference gradients; ``before_step(rank, step)`` runs
    before each ``step()`` (a test's kill point). No exception may reach a loop. Returns the models."""
    models = [make_model() for _ in range(W)]

    def worker(rank: int) -> None:
        model = models[rank]
        with RemoteOptimizer(model.named_parameters(), optimizer, address=address, job=job, rank=rank, num_workers=W,
                             timeout=30, join_timeout=60, **(options or OPTIONS)) as opt:
            for step in range(opt.step_count, total):
                for p, g in zip(model.parameters(), worker_grads(list(model.parameters()), step, W)[rank]):
                    p.grad = g.clone()
                if before_step is not None:
                    before_step(rank, step)
                opt.step()

    run_threads(W, worker, timeout=240)
    return models


def _torch_model(total: int = TOTAL) -> torch.nn.Module:
    """The model after ``total`` uninterrupted steps of local torch.optim on the reference gradients."""
    model = make_model()
    ref = Reference(model.parameters(), torch.optim.Adam, OPTIONS)
    for step in range(total):
        ref.step(worker_grads(list(model.parameters()), step, W))
    return model


def _assert_like_torch(models: list[torch.nn.Module], total: int = TOTAL) -> None:
    model = _torch_model(total)
    for m in models:
        for a, b in zip(m.parameters(), model.parameters()):
            assert torch.equal(a.detach(), b.detach())


def _between_steps(at: dict[int, Callable[[], None]]) -> Callable[[int, int], None]:
    """A ``before_step`` that, at each step in ``at``, holds both workers while rank 0 runs ``at[step]``."""
    barrier = threading.Barrier(W, timeout=WAIT_S)

    def before_step(rank: int, step: int) -> None:
        if step in at:
            barrier.wait()
            if rank == 0:
                at[step]()
            barrier.wait()

    return before_step


@pytest.fixture
def replicated(ray_cluster):
    service = ps.serve(2, replicas=1, metrics_port=0, **RAY)
    try:
        yield service
    finally:
        service.shutdown()


def test_every_shard_has_a_standby_on_the_other_node(replicated):
    processes = replicated.placements()
    assert [p["role"] for p in processes] == ["coordinator", "primary", "standby", "primary", "standby"]
    for shard in (0, 1):
        primary, standby = _process(replicated, "primary", shard), _process(replicated, "standby", shard)
        assert primary["node_id"] != standby["node_id"]  # two nodes: the placement group puts them apart
        assert primary["pid"] != standby["pid"] and primary["address"] != standby["address"]


def test_a_primary_killed_twice_between_steps_is_taken_over_with_no_step_lost(replicated):
    job = "standby-twice"
    killed: list[int] = []

    def kill_again() -> None:
        wait_until(lambda: _standby_ready(replicated, 1, job, not_pid=killed[0]), "a new standby of shard 1", WAIT_S, poll=0.1)
        killed.append(_kill(replicated, "primary", 1))

    models = _train(replicated.address, job, _between_steps({3: lambda: killed.append(_kill(replicated, "primary", 1)), 6: kill_again}))
    _assert_like_torch(models)
    primary = _process(replicated, "primary", 1)
    assert primary["pid"] not in killed and job in primary["jobs"]
    status = ServiceClient(replicated.address, job).status()
    assert status.shards[1].address == primary["address"]  # the shard map names the standby that took over
    # the workers went on through shared memory with the new primaries, and the job's weights segment of each
    # killed primary lost its name when Ray restarted that process (its sweep at start)
    assert dict(status.transports) == dict.fromkeys(range(W), "shared_memory")
    wait_until(lambda: not [n for n in leftover_names() for pid in killed if n.startswith(f"{PREFIX}{pid}-")],
               "the sweep of the killed primaries' shared memory", WAIT_S, poll=0.1)


def test_a_killed_standby_is_rebuilt_and_training_goes_on(replicated):
    job = "standby-killed"
    killed: list[int] = []
    models = _train(replicated.address, job, _between_steps({2: lambda: killed.append(_kill(replicated, "standby", 0))}))
    _assert_like_torch(models)
    wait_until(lambda: _standby_ready(replicated, 0, job, not_pid=killed[0]), "the rebuilt standby of shard 0", WAIT_S, poll=0.1)
    # the coordinator timed the rebuild, the time it held the job for the copy (a standby that falls behind on a
    # slow machine is rebuilt once more: at least one)
    wait_until(lambda: _standby_rebuilds(replicated, job)[0] >= 1, "the rebuild in the coordinator's metrics", WAIT_S, poll=0.1)
    count, seconds = _standby_rebuilds(replicated, job)
    assert 0 < seconds < count * WAIT_S


def test_a_hung_standby_holds_no_step_and_is_rebuilt_once_it_answers_again(ray_cluster):
    """A standby that hangs without dying (SIGSTOP) costs the steps at most ``standby_timeout`` beyond its
    primary: the primary stops handing it means, the coordinator counts it out of sync, and the steps go on
    without it (with the control deadline instead, the workers' 30 s deadline would have ended the test). Once
    it runs again it is rebuilt from its primary; training ends equal to torch."""
    job = "standby-hung"
    service = ps.serve(2, replicas=1, standby_timeout=2.0, **RAY)
    pid = _process(service, "standby", 1)["pid"]
    stopped: list[int] = []

    def current() -> set:
        import ray

        return {tuple(pair) for pair in ray.get(service.coordinator_actor.current_copies.remote(), timeout=WAIT_S)}

    def stop() -> None:
        assert (1, job) in current()
        os.kill(pid, signal.SIGSTOP)
        stopped.append(pid)

    def resume() -> None:
        assert (1, job) not in current()  # out of sync while it hung
        os.kill(pid, signal.SIGCONT)
        stopped.remove(pid)

    try:
        started = time.monotonic()
        models = _train(service.address, job, _between_steps({3: stop, 6: resume}))
        assert time.monotonic() - started < 60
        _assert_like_torch(models)
        wait_until(lambda: (1, job) in current(), "the hung standby rebuilt", WAIT_S, poll=0.2)
        assert _process(service, "standby", 1)["pid"] == pid  # the same process, rebuilt (it never died)
    finally:
        for p in stopped:
            os.kill(p, signal.SIGCONT)
        service.shutdown()


def _during_pushes(service: ps.RayService, job: str, step: int, kill: Callable[[], None]) -> Callable[[int, int], None]:
    """At ``step``: rank 0 pushes (and waits in its pull) while rank 1 is held; once shard 1 holds rank 0's
    push, ``kill()`` runs, then rank 1 goes on."""
    release = threading.Event()

    def killer() -> None:
        try:
            client = ServiceClient(service.address, job, timeout=10)
            wait_until(lambda: list(client.status().shards[1].pushed_workers) == [0], "rank 0's push on shard 1", WAIT_S)
            client.close()
            kill()
        finally:
            release.set()

    def before_step(rank: int, s: int) -> None:
        if s != step:
            return
        if rank == 0:
            threading.Thread(target=killer, daemon=True).start()
        else:
            assert release.wait(WAIT_S), "the kill did not happen"

    return before_step


def test_a_primary_killed_while_pushes_are_in_flight_loses_no_step(replicated):
    job = "standby-pushes"
    models = _train(replicated.address, job, _during_pushes(replicated, job, 4, lambda: _kill(replicated, "primary", 1)))
    _assert_like_torch(models)


def test_a_primary_killed_during_its_update_is_taken_over_by_the_standby_that_finished_it(ray_cluster, tmp_path):
    job, pause_at = "standby-update", 5  # the 5th update: step 4
    service = ps.serve(2, replicas=1, trusted_modules=("tests",), **RAY)
    try:
        killed: list[int] = []

        def kill_during_update() -> None:
            pid = _process(service, "primary", 1)["pid"]
            wait_until(lambda: os.path.exists(tmp_path / str(pid)), "shard 1's primary in its update", WAIT_S)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

        killer = threading.Thread(target=kill_during_update, daemon=True)
        killer.start()
        options = {**OPTIONS, "marker_dir": str(tmp_path), "pause_at": pause_at, "pause_s": 3.0}
        models = _train(service.address, job, optimizer="tests.helpers.custom_optimizers:PausingAdam", options=options)
        killer.join(WAIT_S)
        assert killed, "the primary was not killed during its update"
        _assert_like_torch(models)
        assert _process(service, "primary", 1)["pid"] != killed[0]
    finally:
        service.shutdown()


@pytest.mark.parametrize("replicas", [0, 1])
def test_a_killed_coordinator_comes_back_on_its_address_and_the_steps_go_on(ray_cluster, replicas):
    job = f"coordinator-killed-{replicas}"
    service = ps.serve(2, replicas=replicas, **RAY)
    try:
        before = _process(service, "coordinator")
        kills = {2: lambda: _kill(service, "coordinator"), 5: lambda: _kill(service, "coordinator")}
        models = _train(service.address, job, _between_steps(kills))
        _assert_like_torch(models)
        after = _process(service, "coordinator")
        assert after["pid"] != before["pid"] and after["address"] == before["address"] == service.address
        status = ServiceClient(service.address, job).status()
        assert status.version == TOTAL
    finally:
        service.shutdown()


def test_a_coordinator_killed_while_pushes_are_in_flight_closes_the_step_once_back(replicated):
    job = "coordinator-pushes"
    models = _train(replicated.address, job, _during_pushes(replicated, job, 3, lambda: _kill(replicated, "coordinator")))
    _assert_like_torch(models)


def _stall_checkpoint_io(op: str, file_prefix: str, marker: str) -> None:
    """Run inside a process of the service: its next checkpoint file operation ``op`` on a file whose name starts
    with ``file_prefix`` stops there (the writing thread sleeps), after leaving ``marker``."""
    import paramserver.checkpoint.io as checkpoint_io

    def before(operation: str, path: str) -> None:
        if operation == op and os.path.basename(path).startswith(file_prefix):
            with open(marker, "w"):
                pass
            time.sleep(60)

    checkpoint_io.before = before


def test_a_coordinator_killed_during_a_checkpoint_write_keeps_the_previous_checkpoint(ray_cluster, tmp_path):
    d, job, marker = str(tmp_path / "ckpt"), "coordinator-ckpt", str(tmp_path / "renaming")
    service = ps.serve(2, replicas=1, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        def stall_then_kill() -> None:
            wait_until(lambda: 2 in steps(d, job), "the checkpoint of step 2", WAIT_S)
            import ray

            ray.get(service.coordinator_actor.__ray_call__.remote(lambda self: _stall_checkpoint_io("rename", "", marker)), timeout=WAIT_S)

        def kill_when_renaming() -> None:
            wait_until(lambda: os.path.exists(marker), "the checkpoint write's rename", WAIT_S)
            _kill(service, "coordinator")

        killer = threading.Thread(target=kill_when_renaming, daemon=True)
        killer.start()
        models = _train(service.address, job, _between_steps({3: stall_then_kill}))
        killer.join(WAIT_S)
        assert not killer.is_alive() and os.path.exists(marker)
        _assert_like_torch(models)
        # the coordinator that came back checkpoints again (in the background: its write may end after the last step)
        wait_until(lambda: max(steps(d, job)) >= 6, "a checkpoint by the restarted coordinator", WAIT_S, poll=0.1)
        saved = steps(d, job)
        assert 2 in saved and 4 not in saved, saved  # the write of step 4 died before its manifest
        state = load_torch_state(d, job, step=2)  # the checkpoint from before the kill stays valid
        assert set(state) == {"model", "optimizer", "scheduler"}
    finally:
        service.shutdown()


def test_a_primary_killed_while_writing_its_checkpoint_file_keeps_the_previous_checkpoint(ray_cluster, tmp_path):
    d, job, marker = str(tmp_path / "ckpt"), "primary-ckpt", str(tmp_path / "writing")
    service = ps.serve(2, replicas=1, checkpoint_dir=d, checkpoint_every=2, **RAY)
    try:
        def stall_primary_1() -> None:
            wait_until(lambda: 2 in steps(d, job), "the checkpoint of step 2", WAIT_S)
            import ray

            places = ray.get([a.placement.remote() for a in service.shard_actors], timeout=WAIT_S)
            [actor] = [a for a, p in zip(service.shard_actors, places) if p["role"] == "primary" and p["shard"] == 1]
            ray.get(actor.__ray_call__.remote(lambda self: _stall_checkpoint_io("write", "shard-", marker)), timeout=WAIT_S)

        def kill_when_writing() -> None:
            wait_until(lambda: os.path.exists(marker), "shard 1's checkpoint file write", WAIT_S)
            _kill(service, "primary", 1)

        killer = threading.Thread(target=kill_when_writing, daemon=True)
        killer.start()
        models = _train(service.address, job, _between_steps({3: stall_primary_1}))
        killer.join(WAIT_S)
        assert not killer.is_alive() and os.path.exists(marker)
        _assert_like_torch(models)
        saved = steps(d, job)
        assert 2 in saved and 4 not in saved, saved  # the write of step 4 died with shard 1's primary
        wait_until(lambda: 8 in steps(d, job), "a checkpoint after the takeover", WAIT_S)
        model = _torch_model()
        state = load_torch_state(d, job, step=8)  # written by the standby that took over
        for name, p in model.named_parameters():
            assert torch.equal(state["model"][name], p.detach())
    finally:
        service.shutdown()
