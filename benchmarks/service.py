"""Measurements of the service itself: transfer, the in-service update, end-to-end training, memory."""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.common import batch, make_mlp, param_count, peak_rss_mb
from paramserver import StepEngine
from paramserver.core.config import ClipConfig, EngineConfig
from paramserver.core.params import normalize_params
from paramserver.service.local import serve_local
from paramserver.wire.jobconfig import describe_job
from workers.client import ServiceClient


def push_pull_gbps(nbytes: int, chunk_bytes: int, repeats: int) -> tuple[float, float]:
    """One worker, one shard, a flat fp32 buffer of ``nbytes``, over the service in this process.

    Push: the time of one worker's PushGradients call (receive, check, accumulate) of a 2-worker job, so no
    update runs inside it; pull: PullParameters of the new version. Best of ``repeats``, in GB/s (1e9 B/s).
    """
    n = nbytes // 4
    weights = torch.zeros(n)
    groups = normalize_params([("w", weights)])
    with serve_local(1, chunk_bytes=chunk_bytes, max_message_bytes=max(64 * 2**20, 2 * chunk_bytes)) as service:
        workers = [ServiceClient(service.address, "transfer", timeout=120, chunk_bytes=chunk_bytes) for _ in range(2)]
        try:
            workers[0].create_job(describe_job(groups, "SGD", {"lr": 0.0}, num_workers=2, clip=ClipConfig()))
            workers[0].push_initial_weights([[weights]])
            workers[1].join_job(1)
            grads = [[torch.randn(n)]]
            destination = [[torch.empty(n)]]
            push, pull = [], []
            for step in range(repeats + 1):
                start = time.perf_counter()
                workers[0].push(0, step, grads)
                push.append(time.perf_counter() - start)
                workers[1].push(1, step, grads)
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
    engine = StepEngine([("w", weights)], "Adam", config=EngineConfig(num_shards=1, num_workers=1), lr=1e-3)
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


def _bench_worker(
    rank: int, num_workers: int, address: str, steps: int, warmup: int, batch_size: int, threads: int, grad_dtype: torch.dtype | None
) -> dict[str, Any]:
    from workers.remote_optimizer import RemoteOptimizer

    torch.set_num_threads(threads)
    idle_mb = peak_rss_mb()  # the process with its imports, before the model exists
    model = make_mlp()
    loss_fn = torch.nn.CrossEntropyLoss()
    with RemoteOptimizer(model.named_parameters(), "Adam", lr=1e-3, address=address, job="e2e", num_workers=num_workers,
                         rank=rank, clip_grad_norm=1.0, push_during_backward=True, grad_dtype=grad_dtype, timeout=300) as opt:
        start = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                start = time.perf_counter()
            x, y = batch(step, rank, batch_size)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        elapsed = time.perf_counter() - start
    return {"steps_per_s": steps / elapsed, "peak_rss_mb": peak_rss_mb(), "idle_rss_mb": idle_mb}


def e2e(num_workers: int, num_shards: int, steps: int, batch_size: int, grad_dtype: torch.dtype | None = None) -> dict[str, float]:
    """W worker actors x S shard actors on Ray train the MLP with Adam (clip 1.0) through the service, each
    shard's gradients pushed as soon as backward has produced them (``grad_dtype``: on the wire).

    Returns steps/s (rank 0, after warmup), the shards' peak RSS and their RSS before any job (the fixed
    overhead of a shard process), and the workers' peak RSS.
    """
    import os

    import ray

    import paramserver
    from workers.launcher import run_workers

    threads = max(1, (os.cpu_count() or 1) // num_workers)
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        with paramserver.serve(num_shards, cpus_per_shard=0.01) as service:
            pids = [p["pid"] for p in service.placements()]
            idle_mb = [_vm_kib(pid, "VmRSS") / 1024 for pid in pids]
            config = {
                "address": service.address, "steps": steps, "warmup": 2, "batch_size": batch_size, "threads": threads, "grad_dtype": grad_dtype,
            }
            results = run_workers(_bench_worker, num_workers, config=config, num_cpus_per_worker=0.01, timeout=900)
            shard_peak_mb = [_vm_kib(pid, "VmHWM") / 1024 for pid in pids]
    finally:
        if started:
            ray.shutdown()
    return {
        "steps_per_s": results[0]["steps_per_s"],
        "shard_peak_rss_mb": max(shard_peak_mb),
        "shard_idle_rss_mb": max(idle_mb),
        "worker_peak_rss_mb": max(r["peak_rss_mb"] for r in results),
        "worker_idle_rss_mb": max(r["idle_rss_mb"] for r in results),
        "num_params": param_count(make_mlp()),
    }
