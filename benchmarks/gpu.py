"""The shards on a GPU, where there is one: the update, the host-device copies and the end-to-end job.

    python -m benchmarks.gpu [--quick] [--json PATH]

- The update: a shard on CUDA (``StepEngine(device="cuda")``, one worker, no clipping) steps Adam over N fp32
  parameters with the fused and with the foreach kernel, against standalone ``torch.optim.Adam`` with the same
  kernel on the same GPU. Both are timed to the end of the GPU's work (synchronized).
- The host-device copies: a shard on CUDA takes a worker's gradients from host memory (the buffers gRPC filled,
  or the worker's shared-memory segment, both pinned by the shard) and gives its weights to the host for a pull
  (the servicer's copy, and the copy into a worker's segment), against copies from and into pinned host memory,
  which is as fast as the link between host and device goes, and against pageable memory.
- End to end: the job of ``service.e2e`` (2 worker actors, 2 shard actors, the MLP, Adam, clipping, shared
  memory) with the shards on the GPU (``gpus_per_shard=0.5``) against the same job with the shards on the CPU,
  in one Ray, one after the other.

Every figure is a rate (higher is better); the ratio is the service's over its baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.rows import Row, table_lines, write_json
from paramserver import StepEngine
from paramserver.core.config import JobConfig

GB = 1e9


def _seconds(run: Callable[[], object], repeats: int) -> float:
    """Mean seconds of ``run`` to the end of the GPU's work, after one warm-up call."""
    run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def update_mparams_per_s(num_params: int, repeats: int, kernel: str) -> tuple[float, float]:
    """Adam over ``num_params`` on the GPU, ``kernel`` "fused" or "foreach": a shard's whole step (the mean of
    one worker's gradients, the update), and standalone torch.optim.Adam. Mparams/s, each."""
    options = {kernel: True}
    engine = StepEngine([("w", torch.zeros(num_params))], "Adam", device="cuda", config=JobConfig(num_workers=1), lr=1e-3,
                        **options)
    grad = [torch.randn(num_params, device="cuda")]
    steps = iter(range(repeats + 1))
    in_service = _seconds(lambda: engine.push(0, next(steps), grad), repeats)

    param = torch.nn.Parameter(torch.zeros(num_params, device="cuda"))
    param.grad = grad[0].clone()
    opt = torch.optim.Adam([param], lr=1e-3, **options)
    standalone = _seconds(opt.step, repeats)
    return num_params / in_service / 1e6, num_params / standalone / 1e6


def host_copies_gbps(num_params: int, repeats: int) -> dict[str, float]:
    """GB/s of a shard on CUDA moving ``num_params`` fp32 between host and device, the shard's ways and the
    pinned-memory and pageable ones:

    - ``take_grpc`` and ``take_shm``: one worker's push of host gradients to a 2-worker job (copied to the device
      and summed; the step stays open, so no update runs) from a receive buffer of the servicer's pool and from
      a worker's gradient segment, each as the shard makes them;
    - ``give``: the servicer's copy of the weights for a gRPC pull, and ``give_shm``: the copy into a worker's
      weights segment for a shared-memory pull;
    - ``pinned_*`` (the link's speed) and ``pageable_*`` (what plain host memory gets), the baselines.
    """
    from paramserver.dataplane.segments import Segment
    from paramserver.service.shard_servicer import _to_cpu
    from paramserver.wire.codec import BufferPool

    nbytes = 4 * num_params
    engine = StepEngine([("w", torch.zeros(num_params))], "Adam", device="cuda", config=JobConfig(num_workers=2), lr=1e-3)
    received = BufferPool().take(num_params, torch.float32, pin=True)
    grads, weights_segment = Segment.create(nbytes), Segment.create(nbytes)
    try:
        for segment in (grads, weights_segment):
            segment.pin()
        (in_segment,), (out_segment,) = grads.tensors([(num_params, torch.float32)]), weights_segment.tensors([(num_params, torch.float32)])
        step = 0

        def take(host: torch.Tensor) -> float:
            nonlocal step
            pushes = []
            for _ in range(repeats + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                engine.shards.push(0, 0, step, [host])  # worker 0's flat buffer, as the shard's servicer hands it over
                torch.cuda.synchronize()
                pushes.append(time.perf_counter() - start)
                engine.push(1, step, [host])  # worker 1 closes the step, untimed
                step += 1
            return sum(pushes[1:]) / repeats

        for host in (received, in_segment):
            host.normal_()
        take_grpc, take_shm = take(received), take(in_segment)
        device = torch.empty(num_params, device="cuda")
        pinned, pageable = torch.randn(num_params).pin_memory(), torch.randn(num_params)
        pageable_h2d = _seconds(lambda: device.copy_(pageable), repeats)
        pinned_h2d = _seconds(lambda: device.copy_(pinned, non_blocking=True), repeats)

        weights = engine.shards.shards[0].weights
        give = _seconds(lambda: _to_cpu(weights), repeats)
        give_shm = _seconds(lambda: out_segment.copy_(weights[0]), repeats)
        pageable_d2h = _seconds(lambda: pageable.copy_(weights[0]), repeats)
        pinned_d2h = _seconds(lambda: pinned.copy_(weights[0], non_blocking=True), repeats)
    finally:
        for segment in (grads, weights_segment):
            segment.unpin()
            segment.unlink()
    rates = {"take_grpc": take_grpc, "take_shm": take_shm, "pageable_h2d": pageable_h2d, "pinned_h2d": pinned_h2d,
             "give": give, "give_shm": give_shm, "pageable_d2h": pageable_d2h, "pinned_d2h": pinned_d2h}
    return {name: nbytes / seconds / GB for name, seconds in rates.items()}


def e2e_steps_per_s(steps: int, batch_size: int) -> tuple[dict, dict]:
    """``service.e2e`` with the shards on the GPU (two shards sharing it) and on the CPU, in one Ray."""
    import ray

    from benchmarks import service

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    try:
        on_gpu = service.e2e(2, 2, steps, batch_size, gpus_per_shard=0.5)
        on_cpu = service.e2e(2, 2, steps, batch_size)
    finally:
        if started:
            ray.shutdown()
    return on_gpu, on_cpu


def run(quick: bool, extras: dict | None = None) -> list[Row]:
    """The GPU rows; ``ValueError`` where there is no CUDA device."""
    if not torch.cuda.is_available():
        raise ValueError("the GPU benchmarks need a CUDA device; torch sees none")
    num_params = 2_000_000 if quick else 10_000_000
    repeats = 10 if quick else 50
    rows = []
    for kernel in ("fused", "foreach"):
        in_service, standalone = update_mparams_per_s(num_params, repeats, kernel)
        rows.append(Row(f"gpu_update_{kernel}_Mparams_per_s", in_service, "Mparams/s", f"gpu_torch_adam_{kernel}_Mparams_per_s",
                        standalone))
    copies = host_copies_gbps(num_params, repeats)
    for direction, names in (("h2d", ("take_grpc", "take_shm")), ("d2h", ("give", "give_shm"))):
        baseline = f"pinned_{direction}"
        rows += [Row(f"gpu_shard_{name}_GBps", copies[name], "GB/s", f"{baseline}_GBps", copies[baseline]) for name in names]
        rows.append(Row(f"pageable_{direction}_GBps", copies[f"pageable_{direction}"], "GB/s", f"{baseline}_GBps", copies[baseline]))
    on_gpu, on_cpu = e2e_steps_per_s(10 if quick else 30, 32)
    rows.append(Row("gpu_e2e_steps_per_s", on_gpu["steps_per_s"], "steps/s", "e2e_steps_per_s", on_cpu["steps_per_s"]))
    if extras is not None:
        extras["gpu_e2e"] = {"gpu_shards": on_gpu, "cpu_shards": on_cpu}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    extras: dict = {}
    try:
        rows = run(args.quick, extras)
    except ValueError as exc:
        print(f"benchmarks.gpu: {exc}", file=sys.stderr)
        return 2
    print("\n".join(table_lines(rows)))
    seconds = time.perf_counter() - started
    print(f"({seconds:.0f}s)")
    if args.json:
        write_json(args.json, rows, quick=args.quick, seconds=seconds, extras=extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
