"""What every benchmark shares: the model, its data, timing and memory helpers."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# Every Ray process stays on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

INPUT, CLASSES = 1024, 10


def make_mlp(seed: int = 0) -> nn.Module:
    """The ~9.4M-parameter MLP of the end-to-end benchmarks."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(INPUT, 3072), nn.ReLU(), nn.Linear(3072, 1536), nn.ReLU(), nn.Linear(1536, 1024), nn.ReLU(), nn.Linear(1024, CLASSES)
    )


def batch(step: int, rank: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic batch for (step, rank): the same in every peer, so they do the same compute."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    return torch.randn(size, INPUT, generator=gen), torch.randint(0, CLASSES, (size,), generator=gen)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def rate(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Calls of ``fn`` per second over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def mlp_hidden(num_params: int) -> int:
    """The hidden width h of ``mlp_of_size(num_params)``: solved from INPUT*h + h*h + CLASSES*h + 2h + CLASSES."""
    b = INPUT + CLASSES + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * max(0, num_params - CLASSES))) / 2))


def mlp_params(hidden: int) -> int:
    """The exact parameter count of the MLP INPUT -> hidden -> hidden -> CLASSES."""
    return INPUT * hidden + hidden * hidden + CLASSES * hidden + 2 * hidden + CLASSES


def mlp_of_size(num_params: int, seed: int = 0) -> nn.Module:
    """An MLP of about ``num_params`` parameters (within 0.1% from 1M up): INPUT -> h -> h -> CLASSES."""
    hidden = mlp_hidden(num_params)
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(INPUT, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def cpu_seconds(pid: int | str = "self") -> float:
    """The CPU time process ``pid`` has used so far, all its threads, user and system (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def proc_status_mb(pid: int | str = "self", fields: tuple[str, ...] = ("VmRSS", "VmHWM", "RssAnon", "RssShmem")) -> dict[str, float]:
    """Fields of /proc/<pid>/status, in MB (2**20 bytes): VmRSS (resident now), VmHWM (peak resident),
    RssAnon (private: heap, anonymous mappings), RssShmem (shared memory: /dev/shm segments, shmem)."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in fields:
                found[name] = float(rest.split()[0]) / 1024  # kB
    return found


def _metric_families(metrics_address: str, timeout: float) -> list[Any]:
    """The metric families a Prometheus endpoint ("host:port") exposes now."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=timeout) as reply:
        return list(text_string_to_metric_families(reply.read().decode()))


def shard_bytes(metrics_addresses: list[str], job: str, timeout: float = 10.0) -> dict[str, float]:
    """The payload bytes the shards' Prometheus counters have counted for ``job``, summed over the shards at
    ``metrics_addresses`` ("host:port"): ``grpc_in``, ``grpc_out`` (paramserver_bytes_in/out) and ``shm_in``,
    ``shm_out`` (paramserver_shared_memory_bytes by direction)."""
    totals = {"grpc_in": 0.0, "grpc_out": 0.0, "shm_in": 0.0, "shm_out": 0.0}
    for address in metrics_addresses:
        for family in _metric_families(address, timeout):
            for sample in family.samples:
                if not sample.name.endswith("_total") or sample.labels.get("job") != job:
                    continue
                if family.name == "paramserver_bytes_in":
                    totals["grpc_in"] += sample.value
                elif family.name == "paramserver_bytes_out":
                    totals["grpc_out"] += sample.value
                elif family.name == "paramserver_shared_memory_bytes":
                    totals["shm_" + sample.labels.get("direction", "in")] += sample.value
    return totals


def histogram_totals(metrics_address: str, family: str, job: str, by: str | None = None, timeout: float = 10.0) -> dict[str, tuple[float, int]]:
    """The sum and count of Prometheus histogram ``family`` for ``job`` at a metrics endpoint ("host:port"), per
    value of its label ``by`` (one entry, "", without)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for found in _metric_families(metrics_address, timeout):
        if found.name != family:
            continue
        for sample in found.samples:
            if sample.labels.get("job") != job:
                continue
            key = sample.labels.get(by, "") if by else ""
            if sample.name.endswith("_sum"):
                sums[key] = sample.value
            elif sample.name.endswith("_count"):
                counts[key] = int(sample.value)
    return {key: (sums[key], counts.get(key, 0)) for key in sums}


def stage_seconds(metrics_address: str, job: str) -> dict[str, tuple[float, int]]:
    """The coordinator's stage timers of ``job``: stage -> (seconds in all, steps timed)."""
    return histogram_totals(metrics_address, "paramserver_stage_seconds", job, by="stage")


@contextlib.contextmanager
def ray_session() -> Iterator[None]:
    """One embedded local Ray for what runs inside (on 127.0.0.1, see above); the caller's Ray where there is one."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()
