"""Where a step of the end-to-end job goes: each worker's forward + backward against its wait in ``step()``, the
coordinator's stage timers (aggregate, clip, update, schedule) per step, from its metrics endpoint, and the CPU time
each process of the job used per step (workers, shards, coordinator: how busy the machine's cores are).

    python -m benchmarks.step_profile [--steps 30] [--transport auto] [--no-control-lane]

The job is ``service.e2e``'s: 2 worker actors and 2 shard actors on an embedded Ray, the benchmark's MLP, Adam,
clipping at 1.0, pushes during backward. Prints one line per worker and one per stage (medians over the timed
steps, after 3 warm-up steps).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.common import batch, cpu_seconds, make_mlp, ray_session, stage_seconds

WARMUP = 3


def _worker(rank: int, num_workers: int, address: str, steps: int, transport: str, pids: dict[str, int]) -> dict[str, Any]:
    """One worker; rank 0 also reads the CPU time of the service's processes (``pids``) over the timed steps."""
    from workers.remote_optimizer import RemoteOptimizer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_workers))
    model, loss_fn = make_mlp(), torch.nn.CrossEntropyLoss()
    compute, wait = [], []
    with RemoteOptimizer(model.named_parameters(), "Adam", lr=1e-3, address=address, job="profile", num_workers=num_workers,
                         rank=rank, clip_grad_norm=1.0, push_during_backward=True, timeout=300, transport=transport) as opt:
        for step in range(WARMUP + steps):
            if step == WARMUP:
                cpu_start = _cpu({"self": "self", **(pids if rank == 0 else {})})
                timed_start = time.perf_counter()
            start = time.perf_counter()
            x, y = batch(step, rank, 32)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            computed = time.perf_counter()
            opt.step()
            if step >= WARMUP:
                compute.append(computed - start)
                wait.append(time.perf_counter() - computed)
        cpu_end = _cpu({"self": "self", **(pids if rank == 0 else {})})
        step_ms = 1e3 * (time.perf_counter() - timed_start) / steps
        used = opt.transport
    return {
        "forward_backward_ms": 1e3 * statistics.median(compute), "step_wait_ms": 1e3 * statistics.median(wait), "transport": used,
        "step_ms": step_ms, "cpu_ms_per_step": {name: 1e3 * (cpu_end[name] - cpu_start[name]) / steps for name in cpu_start},
    }


def _cpu(pids: dict[str, int | str]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _stage_ms(metrics_address: str, job: str) -> dict[str, float]:
    """The coordinator's mean time per step of each stage."""
    return {stage: 1e3 * total / count for stage, (total, count) in stage_seconds(metrics_address, job).items() if count}


def step_profile(
    steps: int = 30, transport: str = "auto", num_workers: int = 2, num_shards: int = 2, control_lane: bool = True
) -> dict[str, Any]:
    import paramserver
    from workers.launcher import run_workers

    with ray_session(), paramserver.serve(num_shards, cpus_per_shard=0.01, metrics_port=0, control_lane=control_lane) as service:
        placements = service.placements()
        coordinator = next(p for p in placements if p["role"] == "coordinator")
        pids = {"coordinator": coordinator["pid"], **{f"shard {p['shard']}": p["pid"] for p in placements if p["role"] == "primary"}}
        config = {"address": service.address, "steps": steps, "transport": transport, "pids": pids}
        workers = run_workers(_worker, num_workers, config=config, num_cpus_per_worker=0.01, timeout=600)
        stages = _stage_ms(coordinator["metrics"], "profile")
    return {"workers": workers, "stages_ms": stages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default: %(default)s)")
    parser.add_argument("--transport", default="auto", choices=["auto", "grpc", "shared_memory"], help="(default: %(default)s)")
    parser.add_argument("--no-control-lane", action="store_true", help="every control call over Ray (RayConfig.control_lane=False)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    result = step_profile(args.steps, args.transport, control_lane=not args.no_control_lane)
    for rank, w in enumerate(result["workers"]):
        total = w["forward_backward_ms"] + w["step_wait_ms"]
        print(f"worker {rank} ({w['transport']}): forward+backward {w['forward_backward_ms']:.1f} ms, wait in step() {w['step_wait_ms']:.1f} ms, step {total:.1f} ms")
    for stage, ms in result["stages_ms"].items():
        print(f"coordinator stage {stage}: {ms:.2f} ms a step")
    cpu = {f"worker {rank}": w["cpu_ms_per_step"]["self"] for rank, w in enumerate(result["workers"])}
    cpu.update({name: ms for name, ms in result["workers"][0]["cpu_ms_per_step"].items() if name != "self"})
    step_ms = result["workers"][0]["step_ms"]
    print("CPU time a step: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in cpu.items()))
    print(f"all of them: {sum(cpu.values()):.1f} ms of CPU in a {step_ms:.1f} ms step ({sum(cpu.values()) / step_ms:.2f} of {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
