"""The service hosted on Ray: shards on both nodes of a two-node cluster, training equal to local torch.optim,
placement errors within a deadline, and the CLI against the cluster."""

from __future__ import annotations

import copy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paramserver as ps
from tests.helpers.reference import (
    Reference,
    assert_state_equal,
    make_model,
    run_threads,
    worker_grads,
)
from workers.remote_optimizer import RemoteOptimizer

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_service(ray_cluster):
    service = ps.serve(2, placement="STRICT_SPREAD", cpus_per_shard=0.5)
    yield service
    service.shutdown()


def test_shards_land_on_both_nodes(ray_service):
    import ray

    placements = [p for p in ray_service.placements() if p["role"] == "primary"]
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    kinds = sorted(next(k for k in nodes[p["node_id"]] if k.startswith("node_")) for p in placements)
    assert kinds == ["node_head", "node_second"]
    assert all(p["address"].startswith("127.0.0.1:") and p["device"] == "cpu" for p in placements)
    assert ray_service.address.startswith("127.0.0.1:")


def test_placements_list_every_process_with_its_role(ray_service):
    import os

    import ray

    placements = ray_service.placements()
    assert [(p["role"], p["shard"]) for p in placements] == [("coordinator", None), ("primary", 0), ("primary", 1)]
    for p in placements:
        assert set(p) >= {"role", "shard", "pid", "node_id", "address", "device", "metrics"}
        os.kill(p["pid"], 0)  # a live process (the test's nodes are on this machine)
    assert len({p["pid"] for p in placements}) == 3
    assert os.getpid() not in {p["pid"] for p in placements}
    assert placements[0]["address"] == ray_service.address
    assert placements[0]["node_id"] == ray.get_runtime_context().get_node_id()  # the driver's node
    assert len({p["address"] for p in placements}) == 3


@pytest.mark.parametrize("optimizer,kwargs,scheduler,sched_kwargs", [
    ("Adam", {"lr": 0.01}, "StepLR", {"step_size": 3, "gamma": 0.5}),
    ("SGD", {"lr": 0.05, "momentum": 0.9}, "ReduceLROnPlateau", {"patience": 0, "factor": 0.5}),
])
def test_parity_on_a_two_node_ray_cluster(ray_service, optimizer, kwargs, scheduler, sched_kwargs):
    num_workers = 2
    base = make_model()
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    ref_model = copy.deepcopy(base)
    sched_cls = getattr(torch.optim.lr_scheduler, scheduler)
    ref = Reference(ref_model.named_parameters(), getattr(torch.optim, optimizer), kwargs, clip=ps.ClipConfig(max_norm=0.5),
                    scheduler=lambda o: sched_cls(o, **sched_kwargs))
    opts = [None] * num_workers
    job = f"ray-{optimizer}"

    def create(r):
        opts[r] = RemoteOptimizer(models[r].named_parameters(), optimizer, address=ray_service.address, job=job, num_workers=num_workers,
                                  rank=r, clip_grad_norm=0.5, scheduler=scheduler, scheduler_kwargs=sched_kwargs, timeout=60.0, **kwargs)

    run_threads(num_workers, create)
    plateau = scheduler == "ReduceLROnPlateau"
    try:
        for t in range(10):
            grads = worker_grads(ref.params, t, num_workers)
            metrics = [1.0 + (t % 3) * 0.1 + r * 0.01 for r in range(num_workers)]

            def step(r):
                for p, g in zip(models[r].parameters(), grads[r]):
                    p.grad = g.clone()
                opts[r].step(metric=metrics[r] if plateau else None)

            run_threads(num_workers, step)
            ref.step(grads, metric=sum(metrics) / num_workers if plateau else None)
        for m in models:
            for a, b in zip(m.parameters(), ref.params):
                assert torch.equal(a, b.detach())
        assert_state_equal(opts[0].state_dict()["optimizer"], ref.optimizer.state_dict())
        assert opts[1].get_last_lr() == [g["lr"] for g in ref.optimizer.param_groups]
    finally:
        for o in opts:
            if o is not None:
                o.close()


def test_placement_that_cannot_be_met_fails_within_its_deadline(ray_cluster):
    with pytest.raises(TimeoutError, match="cannot place 3 shards .* STRICT_SPREAD"):
        ps.serve(3, placement="STRICT_SPREAD", placement_timeout=3.0)


def test_cli_serves_on_the_cluster_and_exits_cleanly_on_sigterm(ray_cluster):
    server = subprocess.Popen(
        [sys.executable, "-m", "paramserver", "serve", "--ray-address", ray_cluster.address, "--shards", "2", "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving on 127.0.0.1:"), line
        address = line.split()[-1]
        model = make_model()
        with RemoteOptimizer(model.named_parameters(), "AdamW", lr=0.01, address=address, job="cli", timeout=60.0) as opt:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
            opt.step()
            status = subprocess.run([sys.executable, "-m", "paramserver", "status", "--address", address, "--job", "cli"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert status.returncode == 0 and "job cli: step 1" in status.stdout, status.stdout + status.stderr
            assert status.stdout.count("on node ") == 2 and "cpu" in status.stdout, status.stdout
        server.send_signal(signal.SIGTERM)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate(timeout=30)
    assert server.returncode == 0
    assert "stopped" in out


def test_training_job_through_a_running_service_on_the_cluster(ray_service):
    """What `ray job submit -- python -m workers.demos.train --service HOST:PORT` runs: workers on the cluster,
    the service already up."""
    pytest.importorskip("sklearn")
    from workers.demos import train

    out = train.train(num_workers=2, epochs=2, progress=False, service_address=ray_service.address, job="submitted")
    assert out["replicas_equal"]
    assert out["test_accuracy"] > 0.6
    assert len(out["history"]["loss"]) == out["steps"]


def test_workers_that_join_before_rank_0_creates_the_job_start_from_its_weights(ray_service):
    """Joins wait on the coordinator actor without a thread (for the job, then for the shard actors' initial
    weights), and every worker then trains from rank 0's weights."""
    import threading
    import time

    num_workers = 4
    base = make_model(seed=5)
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    for m in models[1:]:
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()  # joiners' own weights are replaced by rank 0's
    ref_model = copy.deepcopy(base)
    ref = Reference(ref_model.named_parameters(), torch.optim.SGD, {"lr": 0.1})
    opts: list = [None] * num_workers

    def create(r: int) -> None:
        opts[r] = RemoteOptimizer(models[r].named_parameters(), "SGD", lr=0.1, address=ray_service.address, job="early-joins",
                                  num_workers=num_workers, rank=r, timeout=60.0, join_timeout=60.0)

    joiners = [threading.Thread(target=create, args=(r,)) for r in range(1, num_workers)]
    for t in joiners:
        t.start()
    time.sleep(1.0)  # the joins are waiting for a job that does not exist yet
    try:
        create(0)
        for t in joiners:
            t.join(timeout=60)
        assert all(o is not None for o in opts), "a join did not complete"
        _steps_equal_torch(models, opts, ref, 2)
    finally:
        for o in opts:
            if o is not None:
                o.close()


def _steps_equal_torch(models: list, opts: list, ref: Reference, steps: int) -> None:
    """``steps`` steps of the reference gradients on every worker's optimizer and on ``ref``; every model then
    equals the reference bit for bit."""
    for t in range(steps):
        grads = worker_grads(ref.params, t, len(models))

        def step(r: int) -> None:
            for p, g in zip(models[r].parameters(), grads[r]):
                p.grad = g.clone()
            opts[r].step()

        run_threads(len(models), step)
        ref.step(grads)
    for m in models:
        for a, b in zip(m.parameters(), ref.params):
            assert torch.equal(a, b.detach())


def _train_adam(address: str, job: str, steps: int) -> None:
    """2 workers train ``steps`` steps of Adam with clipping; their weights and Adam's state equal local torch.optim's."""
    num_workers = 2
    base = make_model(seed=3)
    models = [copy.deepcopy(base) for _ in range(num_workers)]
    ref = Reference(copy.deepcopy(base).named_parameters(), torch.optim.Adam, {"lr": 0.01}, clip=ps.ClipConfig(max_norm=0.5))
    opts: list = [None] * num_workers

    def create(r: int) -> None:
        opts[r] = RemoteOptimizer(models[r].named_parameters(), "Adam", lr=0.01, address=address, job=job, num_workers=num_workers,
                                  rank=r, clip_grad_norm=0.5, timeout=60.0)

    run_threads(num_workers, create)
    try:
        _steps_equal_torch(models, opts, ref, steps)
        assert_state_equal(opts[0].state_dict()["optimizer"], ref.optimizer.state_dict())
    finally:
        for o in opts:
            if o is not None:
                o.close()


def test_on_the_coordinators_node_a_steps_report_and_update_calls_take_the_control_lane(ray_service):
    """The shard on the coordinator's node reports over the coordinator's lane and takes its update calls over
    its own; the shard on the other node has both over Ray (a lane joins processes of one node)."""
    def lane_calls() -> dict:
        return {(p["role"], p["shard"]): (p["node_id"], p["lane_calls"]) for p in ray_service.placements()}

    before = lane_calls()
    steps = 6
    _train_adam(ray_service.address, "lane", steps)
    after = lane_calls()
    node = after[("coordinator", None)][0]
    near = next(j for j in (0, 1) if after[("primary", j)][0] == node)
    far = 1 - near
    assert after[("primary", far)][0] != node
    served = {key: after[key][1] - before[key][1] for key in after}
    # a lane is looked up at the first call that could take it, which goes over Ray meanwhile; every later one takes it
    assert served[("primary", near)] >= steps - 1  # the update calls
    assert served[("coordinator", None)] >= steps - 1  # the near shard's reports
    assert after[("primary", far)][1] == 0


def test_with_the_control_lane_off_every_control_call_is_rays_and_training_is_the_same(ray_cluster):
    service = ps.serve(2, placement="PACK", cpus_per_shard=0.5, control_lane=False)
    try:
        _train_adam(service.address, "no-lane", 4)
        assert [p["lane_calls"] for p in service.placements()] == [None, None, None]
    finally:
        service.shutdown()
