"""Measurements of the service itself: transfer, the in-service update, end-to-end training, memory."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.common import (
    batch,
    histogram_totals,
    make_mlp,
    mlp_of_size,
    param_count,
    peak_rss_mb,
    proc_status_mb,
    ray_session,
    shard_bytes,
    stage_seconds,
)
from paramserver import StepEngine
from paramserver.core.config import ClipConfig, JobConfig
from paramserver.core.params import normalize_params
from paramserver.service.local import serve_local
from paramserver.wire.jobconfig import describe_job
from workers.client import ServiceClient


def push_pull_gbps(nbytes: int, chunk_bytes: int, repeats: int, route: str = "direct") -> tuple[float, float]:
    """One worker, one shard, a flat fp32 buffer of ``nbytes``, over the service in this process; ``route``:
    "direct" (to the shard's port) or "relay" (through the front door, which forwards the chunks as bytes).

    Push: the time of one worker's PushGradients call (receive, check, accumulate) of a 2-worker job, so no
    update runs inside it; pull: PullParameters of the new version, once it is there (the other worker's pull
    waited for the step's close). Best of ``repeats``, in GB/s (1e9 B/s).
    """
    n = nbytes // 4
    weights = torch.zeros(n)
    groups = normalize_params([("w", weights)])
    with serve_local(1, chunk_bytes=chunk_bytes, max_message_bytes=max(64 * 2**20, 2 * chunk_bytes)) as service:
        workers = [ServiceClient(service.address, "transfer", timeout=120, chunk_bytes=chunk_bytes, route=route) for _ in range(2)]
        try:
            workers[0].create_job(describe_job(groups, "SGD", {"lr": 0.0}, num_workers=2, clip=ClipConfig()))
            workers[0].push_initial_weights([[weights]])
            workers[1].join_job(1)
            grads = [[torch.randn(n)]]
            destination, other = [[torch.empty(n)]], [[torch.empty(n)]]
            push, pull = [], []
            for step in range(repeats + 1):
                start = time.perf_counter()
                workers[0].push(0, step, grads)
                push.append(time.perf_counter() - start)
                workers[1].push(1, step, grads)  # answered before the step closes (the update runs after it)
                workers[1].pull(1, step + 1, destinations=other)  # the close: not part of the pull timed below
                start = time.perf_counter()
                workers[0].pull(0, step + 1, destinations=destination)
                pull.append(time.perf_counter() - start)
        finally:
            for w in workers:
                w.close()
    return nbytes / min(push[1:]) / 1e9, nbytes / min(pull[1:]) / 1e9


def update_mparams_per_s(num_params: int, repeats: int) -> tuple[float, float]:
    """Adam's step over ``num_params`` fp32 parameters: inside the service (a shard's update stage, as the
    coordinator times it) and standalone torch.optim.Adam on the same device. Mean over ``repeats``."""
    weights = torch.zeros(num_params)
    engine = StepEngine([("w", weights)], "Adam", config=JobConfig(num_workers=1), lr=1e-3)
    grad = [torch.randn(num_params)]
    seconds = []
    for step in range(repeats + 1):
        seconds.append(engine.push(0, step, grad).seconds["update"])
    in_service = num_params / (sum(seconds[1:]) / repeats) / 1e6

    param = torch.nn.Parameter(torch.zeros(num_params))
    param.grad = grad[0].clone()
    opt = torch.optim.Adam([param], lr=1e-3)
    opt.step()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    standalone = num_params / ((time.perf_counter() - start) / repeats) / 1e6
    return in_service, standalone


def _vm_kib(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise KeyError(field)


# What a worker's RemoteOptimizer must report for each transport asked for, all processes on one host: under
# "auto" a silent fallback to gRPC would otherwise pass as a shared-memory figure.
EXPECTED_ON_ONE_HOST = {"auto": "shared_memory", "shared_memory": "shared_memory", "grpc": "grpc"}


def _settled_bytes(metrics: Sequence[str], job: str, step_s: float) -> dict[str, float]:
    """The shards' byte counters of ``job``, read by rank 0 between two of its steps after the others have had
    time to reach the same point (1.5 steps: they have pulled this version and pushed their next gradients, and
    wait for rank 0's), so the counts between two such reads are whole steps of every worker."""
    time.sleep(min(10.0, 1.5 * step_s))
    return shard_bytes(list(metrics), job)


def _bench_worker(
    rank: int,
    num_workers: int,
    address: str,
    steps: int,
    warmup: int,
    batch_size: int,
    threads: int,
    grad_dtype: torch.dtype | None,
    transport: str = "auto",
    job: str = "e2e",
    num_params: int | None = None,
    shard_pids: Sequence[int] = (),
    metrics: Sequence[str] = (),
) -> dict[str, Any]:
    """One worker of ``e2e`` and of ``benchmarks.scaling``: trains the MLP (``num_params``: one of that size,
    None: ``make_mlp()``) through a ``RemoteOptimizer`` with ``transport``, and fails if the transport in use
    is not the one expected on one host. Rank 0 also reads, outside the timed steps, the shards' byte counters
    (``metrics``: their endpoints) at the first and the last timed step, and the shards' memory
    (``shard_pids``, /proc status) after the last one, while the job still holds its shared memory."""
    from workers.remote_optimizer import RemoteOptimizer

    torch.set_num_threads(threads)
    idle_mb = peak_rss_mb()  # the process with its imports, before the model exists
    idle = proc_status_mb()
    model = make_mlp() if num_params is None else mlp_of_size(num_params)
    loss_fn = torch.nn.CrossEntropyLoss()
    counted = rank == 0 and bool(metrics)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    with RemoteOptimizer(model.named_parameters(), "Adam", lr=1e-3, address=address, job=job, num_workers=num_workers,
                         rank=rank, clip_grad_norm=1.0, push_during_backward=True, grad_dtype=grad_dtype, timeout=300,
                         transport=transport) as opt:
        expected = EXPECTED_ON_ONE_HOST[transport]
        if opt.transport != expected:
            raise RuntimeError(f"worker {rank}: transport={transport!r} on one host should give {expected!r}, got {opt.transport!r}")
        # With counters to read (every worker runs the same steps, so all know ``metrics``): rank 0 reads them at
        # step ``warmup`` and at the end of the timed steps, each time after the others have reached the same point
        # (their next gradients pushed, waiting for rank 0's), so the difference is whole steps of every worker.
        # The step after the first read is not timed (the others had a head start on it), and every worker runs
        # one step after the timed ones (the others' next gradients at the second read).
        extra = 1 if metrics else 0
        first, last = warmup + extra, warmup + extra + steps  # the timed steps: [first, last)
        start = step_s = elapsed = 0.0
        for step in range(last + extra):
            if step == warmup and counted:
                before = _settled_bytes(metrics, job, step_s)
            if step == first:
                start = time.perf_counter()
            if step == last:
                elapsed = time.perf_counter() - start
                if counted:
                    after = _settled_bytes(metrics, job, step_s)
            step_start = time.perf_counter()
            x, y = batch(step, rank, batch_size)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            step_s = time.perf_counter() - step_start
        if not metrics:
            elapsed = time.perf_counter() - start
        shards_end = [proc_status_mb(pid) for pid in shard_pids] if rank == 0 else []
        shard_numel = [sum(layout.numel for layout in opt.plan.buffers(j)) for j in range(opt.plan.num_shards)]
        worker_end = proc_status_mb()
        used = opt.transport
    return {
        "steps_per_s": steps / elapsed,
        "peak_rss_mb": peak_rss_mb(),
        "idle_rss_mb": idle_mb,
        "idle": idle,
        "end": worker_end,
        "shards_end": shards_end,
        "shard_numel": shard_numel,
        "transport": used,
        "bytes_per_step": {k: (after[k] - before[k]) / (last - warmup) for k in after} if counted else None,
    }


def e2e(
    num_workers: int, num_shards: int, steps: int, batch_size: int, grad_dtype: torch.dtype | None = None, transport: str = "auto",
    num_params: int | None = None, gpus_per_shard: float = 0.0, control_lane: bool = True, checkpoint_every: int = 0,
) -> dict[str, Any]:
    """W worker actors x S shard actors on Ray train the MLP (``num_params``: one of about that size) with Adam
    (clip 1.0) through the service (the shards on a GPU with ``gpus_per_shard``: ``benchmarks.gpu``), each shard's gradients pushed as soon as backward has produced them
    (``grad_dtype``: on the wire), over ``transport`` (checked in every worker: on one host "auto" must give
    shared memory).

    Returns steps/s (rank 0, after warmup); the shards' peak RSS (VmHWM, read after the workers are done) and
    their RSS before any job (idle; the fixed overhead is measured apart: ``memory_rows``); each shard's /proc
    status (MB) before any job (``shards_idle``) and right after the last timed step, while the job holds its shared memory
    (``shards_end``); ``shard_numel``: the parameters each shard holds; the workers' peak and idle RSS, and rank
    0's status before its model existed (``worker_idle``) and after the last timed step (``worker_end``);
    ``bytes_per_step``: the payload bytes the shards counted per timed step, gRPC and shared memory, in and out.
    Uses the caller's Ray where there is one (``common.ray_session``), else an embedded one of its own.
    """
    import os

    import paramserver
    from workers.launcher import run_workers

    threads = max(1, (os.cpu_count() or 1) // num_workers)
    with tempfile.TemporaryDirectory(prefix="paramserver-bench-") as checkpoint_dir, ray_session(), paramserver.serve(
        num_shards, cpus_per_shard=0.01, gpus_per_shard=gpus_per_shard, metrics_port=0, control_lane=control_lane,
        **({"checkpoint_dir": checkpoint_dir, "checkpoint_every": checkpoint_every} if checkpoint_every else {}),
    ) as service:
        primaries = [p for p in service.placements() if p["role"] == "primary"]
        pids = [p["pid"] for p in primaries]
        idle_mb = [_vm_kib(pid, "VmRSS") / 1024 for pid in pids]
        shards_idle = [proc_status_mb(pid) for pid in pids]
        config = {
            "address": service.address, "steps": steps, "warmup": 2, "batch_size": batch_size, "threads": threads,
            "grad_dtype": grad_dtype, "transport": transport, "shard_pids": pids, "num_params": num_params,
            "metrics": [p["metrics"] for p in primaries if p["metrics"]],
        }
        results = run_workers(_bench_worker, num_workers, config=config, num_cpus_per_worker=0.01, timeout=900)
        shard_peak_mb = [_vm_kib(pid, "VmHWM") / 1024 for pid in pids]
        [coordinator] = [p for p in service.placements() if p["role"] == "coordinator"]
        stages = stage_seconds(coordinator["metrics"], "e2e")
        hold_s, checkpoints = histogram_totals(coordinator["metrics"], "paramserver_checkpoint_copy_seconds", "e2e").get("", (0.0, 0))
    return {
        "steps_per_s": results[0]["steps_per_s"],
        "num_workers": num_workers,
        "transport": results[0]["transport"],
        "shard_peak_rss_mb": max(shard_peak_mb),
        "shard_idle_rss_mb": max(idle_mb),
        "shards_idle": shards_idle,
        "shards_end": results[0]["shards_end"],
        "shard_numel": results[0]["shard_numel"],
        "worker_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "worker_idle_rss_mb": max(r["idle_rss_mb"] for r in results),
        "worker_idle": results[0]["idle"],
        "worker_end": results[0]["end"],
        "bytes_per_step": results[0]["bytes_per_step"],
        "num_params": param_count(make_mlp() if num_params is None else mlp_of_size(num_params)),
        "closed_steps": stages["queued"][1],
        # seconds in all over every closed step (warm-up too) of the coordinator's stages; "queued": the closing
        # reports' waits for the job's lock, where a checkpoint's copy holds it
        "stage_seconds": {stage: total for stage, (total, _) in stages.items()},
        "checkpoints": checkpoints,  # taken by the service (``checkpoint_every``)
        "checkpoint_hold_s": hold_s,  # in all: the coordinator's holds of the job for the checkpoints' copies
    }


def _serve_one_shard(conn: Any) -> None:
    """The server process of ``shard_steps_per_s``: a service with one shard, until the parent says stop."""
    with serve_local(1) as service:
        conn.send(service.address)
        conn.recv()


def _shard_job_steps_per_s(address: str, num_workers: int, steps: int, num_params: int) -> float:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    weights = torch.zeros(num_params)
    grads = [[torch.randn(num_params)] for _ in range(num_workers)]
    config = describe_job(normalize_params([("w", weights)]), "SGD", {"lr": 1e-3}, num_workers=num_workers, clip=ClipConfig())
    clients = [ServiceClient(address, f"scale-w{num_workers}", timeout=120) for _ in range(num_workers)]
    try:
        clients[0].create_job(config)
        clients[0].push_initial_weights([[weights]])
        times: list[float] = []
        ready = threading.Barrier(num_workers, timeout=120)

        def worker(rank: int) -> None:
            client = clients[rank]
            if rank:
                client.join_job(rank)
            ready.wait()
            for step in range(steps + 1):  # step 0 warms up
                client.push(rank, step, [grads[rank]])
                client.pull(rank, step + 1)
                if rank == 0 and step in (0, steps):
                    times.append(time.perf_counter())

        with ThreadPoolExecutor(num_workers) as pool:
            for f in [pool.submit(worker, r) for r in range(num_workers)]:
                f.result(600)
    finally:
        for client in clients:
            client.close()
    return steps / (times[1] - times[0])


def shard_steps_per_s(worker_counts: Sequence[int], steps: int, num_params: int = 1000) -> dict[int, float]:
    """W workers on one shard, for each W of ``worker_counts``: steps/s of a tiny model (``num_params``
    fp32, SGD), so the figure is the shard server's cost per worker (a push and a waiting pull each step)
    rather than the update's.

    The service (coordinator and the shard) runs in a process of its own, as a shard does in a deployment; the
    workers are threads of this process, each with its own ``ServiceClient``, so the workers' side (one
    process, one GIL) is part of what is measured. Every step each worker pushes its gradients and pulls the
    next version; timed from the end of a warmup step to the end of the last.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve_one_shard, args=(child,), daemon=True)
    server.start()
    try:
        deadline = time.monotonic() + 120
        while not parent.poll(0.1):
            if not server.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the shard's server process did not start (exit code {server.exitcode})")
        address = parent.recv()
        return {w: _shard_job_steps_per_s(address, w, steps, num_params) for w in worker_counts}
    finally:
        try:
            parent.send("stop")
        except OSError:
            pass
        server.join(30)
        if server.is_alive():
            server.kill()
            server.join(10)
