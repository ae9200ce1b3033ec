"""How the cost grows: steps/s and bytes moved per step over workers x shards x model size, on one host with
the default transport; and the multi-host case (gRPC only), computed from a measured per-link bandwidth.

    python -m benchmarks.scaling [--quick] [--json PATH]     # this part alone; python -m benchmarks runs it too

The grid: W workers (Ray actors, a ``RemoteOptimizer`` each, ``transport="auto"``, checked to be shared
memory) and S shard actors of one ``paramserver.serve()`` per (model, S), an MLP of about 1M, 10M or 50M
parameters (``common.mlp_of_size``), Adam, clip 1.0, batch 32 per worker, pushes during backward. Steps/s is
rank 0's over the timed steps. Bytes per step are measured: rank 0 reads the shards' Prometheus counters
(``paramserver_bytes_in/out``: gRPC payload; ``paramserver_shared_memory_bytes``: payload read or handed through
shared memory) at its first and its last timed step, summed over the shards, over the timed steps. The plan's
figure next to it is W x P x 4 bytes each way (fp32 gradients in, fp32 weights out).

The multi-host table is not measured across machines: it puts the measured per-link figure B (the service's
gRPC push/pull over loopback, the slower of the two, measured in the same run) into the BytePS paper's time for
a parameter server, max(M/B, n*M/(k*B)) (n worker machines, k server machines, each link B each way, M model
bytes), and ring all-reduce's 2(n-1)*M/(n*B).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import mlp_hidden, mlp_params, ray_session
from paramserver.core.config import DEFAULT_CHUNK_BYTES

WORKERS = (1, 2, 4, 8)
SHARDS = (1, 2, 4)
MODELS = {"1M": 1_000_000, "10M": 10_000_000, "50M": 50_000_000}
BYTES_PER_PARAM = 4  # fp32 gradients in, fp32 weights out
MULTIHOST_N = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Grid:
    workers: tuple[int, ...]
    shards: tuple[int, ...]
    models: tuple[str, ...]
    steps: int
    warmup: int
    batch_size: int
    point_timeout_s: float  # one (model, S, W) point: run_workers' limit
    budget_s: float  # the whole grid: points not started by then are skipped, and listed as skipped
    note: str


FULL = Grid(WORKERS, SHARDS, tuple(MODELS), steps=10, warmup=2, batch_size=32, point_timeout_s=300, budget_s=2400,
            note="full grid: W in {1,2,4,8} x S in {1,2,4} x {1M,10M,50M}, 10 timed steps after 2 warmup")
QUICK = Grid((1, 2, 4, 8), (1, 4), ("1M", "10M"), steps=3, warmup=2, batch_size=32, point_timeout_s=120, budget_s=300,
             note="quick, reduced grid: W in {1,2,4,8} x S in {1,4} x {1M,10M} (no S=2, no 50M), 3 timed steps after 2 warmup")


def grid_for(quick: bool) -> Grid:
    return QUICK if quick else FULL


def model_params(name: str) -> int:
    """The exact parameter count of the grid's model ``name`` (``common.mlp_of_size`` of its nominal size)."""
    return mlp_params(mlp_hidden(MODELS[name]))


def planned_bytes(workers: int, num_params: int, bytes_per_param: int = BYTES_PER_PARAM) -> int:
    """Bytes per step each way through the service by the plan: every worker pushes P gradients, pulls P weights."""
    return workers * num_params * bytes_per_param


def _point(service: Any, model: str, num_shards: int, workers: int, grid: Grid) -> dict[str, Any]:
    from benchmarks import service as service_bench
    from workers.launcher import run_workers

    primaries = [p for p in service.placements() if p["role"] == "primary"]
    job = f"scale-{model}-s{num_shards}-w{workers}"
    config = {
        "address": service.address, "steps": grid.steps, "warmup": grid.warmup, "batch_size": grid.batch_size,
        "threads": max(1, (os.cpu_count() or 1) // workers), "grad_dtype": None, "transport": "auto", "job": job,
        "num_params": MODELS[model], "metrics": [p["metrics"] for p in primaries if p["metrics"]],
    }
    results = run_workers(service_bench._bench_worker, workers, config=config, num_cpus_per_worker=0.01, timeout=grid.point_timeout_s)
    measured = results[0]["bytes_per_step"] or {}
    return {
        "steps_per_s": results[0]["steps_per_s"],
        "transport": results[0]["transport"],
        "measured": measured,  # per timed step, summed over the shards: grpc_in, grpc_out, shm_in, shm_out
        "bytes_in_per_step": measured.get("grpc_in", 0.0) + measured.get("shm_in", 0.0) if measured else None,
        "bytes_out_per_step": measured.get("grpc_out", 0.0) + measured.get("shm_out", 0.0) if measured else None,
    }


def scaling_run(grid: Grid, log: Any = None) -> dict[str, Any]:
    """The grid on one host, one Ray for all of it and one service per (model, S). Every point is bounded
    (``grid.point_timeout_s``) and so is the whole (``grid.budget_s``: points not started by then are skipped);
    a point that fails is recorded with its error and the grid goes on."""
    import paramserver

    started = time.perf_counter()
    points: list[dict[str, Any]] = []
    with ray_session():
        for model in grid.models:
            num_params = model_params(model)
            for num_shards in grid.shards:
                todo = list(grid.workers)
                if time.perf_counter() - started > grid.budget_s:
                    points += [_skipped(model, num_params, num_shards, w) for w in todo]
                    continue
                with paramserver.serve(num_shards, cpus_per_shard=0.01, metrics_port=0) as service:
                    for workers in todo:
                        base = {"model": model, "num_params": num_params, "shards": num_shards, "workers": workers,
                                "planned_bytes_per_step": planned_bytes(workers, num_params)}
                        if time.perf_counter() - started > grid.budget_s:
                            points.append(_skipped(model, num_params, num_shards, workers))
                            continue
                        t0 = time.perf_counter()
                        try:
                            points.append({**base, **_point(service, model, num_shards, workers, grid), "error": None})
                        except Exception as exc:  # noqa: BLE001 - recorded in the table; the grid goes on
                            points.append({**base, "steps_per_s": None, "error": f"{type(exc).__name__}: {exc}"[:300]})
                        if log is not None:
                            p = points[-1]
                            print(f"... scaling {model} S={num_shards} W={workers}: "
                                  f"{p['steps_per_s'] or 0:.2f} steps/s, {time.perf_counter() - t0:.0f}s"
                                  f"{' ' + p['error'] if p['error'] else ''}", file=log, flush=True)
    return {"grid": asdict(grid), "points": points, "seconds": time.perf_counter() - started,
            "bytes_source": "measured: the shards' payload counters (gRPC + shared memory), per timed step"}


def _skipped(model: str, num_params: int, num_shards: int, workers: int) -> dict[str, Any]:
    return {"model": model, "num_params": num_params, "shards": num_shards, "workers": workers,
            "planned_bytes_per_step": planned_bytes(workers, num_params), "steps_per_s": None,
            "error": "skipped: the grid's time budget was spent"}


def ps_seconds(model_bytes: float, n: int, k: int, link_bps: float) -> float:
    """BytePS's communication time of a parameter server per step: max(M/B, n*M/(k*B)): each worker link
    carries M each way, each of the k server links n*M/k each way."""
    return max(model_bytes / link_bps, n * model_bytes / (k * link_bps))


def ring_allreduce_seconds(model_bytes: float, n: int, link_bps: float) -> float:
    """Ring all-reduce's communication time per step: 2(n-1)*M/(n*B) (each link, each way); 0 for n = 1."""
    return 2 * (n - 1) * model_bytes / (n * link_bps)


def multihost_table(link_GBps: float, models: dict[str, int], ns: Iterable[int] = MULTIHOST_N, bytes_per_param: int = BYTES_PER_PARAM) -> list[dict[str, Any]]:
    """Per model and n worker machines, with k = 1 and k = n server machines: the bytes per step on a worker's
    and on a server's link (each way) and the time they imply at ``link_GBps`` (1e9 B/s each way), for the
    parameter server and for ring all-reduce. Computed, not measured across machines."""
    link_bps = link_GBps * 1e9
    rows = []
    for model, num_params in models.items():
        m = num_params * bytes_per_param
        for n in ns:
            for k in sorted({1, n}):
                ps = ps_seconds(m, n, k, link_bps)
                ring = ring_allreduce_seconds(m, n, link_bps)
                rows.append({
                    "model": model, "model_MB": m / 1e6, "n": n, "k": k,
                    "ps_worker_link_MB": m / 1e6, "ps_server_link_MB": n * m / k / 1e6, "ps_ms": ps * 1e3,
                    "ring_link_MB": 2 * (n - 1) * m / n / 1e6, "ring_ms": ring * 1e3,
                    "ps_over_ring": ps / ring if ring else None,
                })
    return rows


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def scaling_lines(result: dict[str, Any], markdown: bool = False) -> list[str]:
    """The grid as a table: model, P, S, W, steps/s, MB in and out per step (measured) and the plan's MB each way."""
    head = ["model", "params", "S", "W", "steps/s", "in MB/step", "out MB/step", "of which shm in/out", "plan MB/step each way", "note"]
    rows = []
    for p in result["points"]:
        m = p.get("measured") or {}
        shm = f"{_fmt(m.get('shm_in', 0) / 1e6)}/{_fmt(m.get('shm_out', 0) / 1e6)}" if m else "-"
        note = p.get("error") or ("" if p.get("transport") in (None, "shared_memory") else p["transport"])
        rows.append([p["model"], f"{p['num_params'] / 1e6:.2f}M", str(p["shards"]), str(p["workers"]), _fmt(p.get("steps_per_s")),
                     _fmt(None if p.get("bytes_in_per_step") is None else p["bytes_in_per_step"] / 1e6),
                     _fmt(None if p.get("bytes_out_per_step") is None else p["bytes_out_per_step"] / 1e6),
                     shm, _fmt(p["planned_bytes_per_step"] / 1e6), note])
    return _table(head, rows, markdown)


def multihost_lines(rows: Sequence[dict[str, Any]], markdown: bool = False) -> list[str]:
    head = ["model", "M MB", "n", "k", "PS worker link MB", "PS server link MB", "PS ms", "ring link MB", "ring ms", "PS/ring"]
    body = [[r["model"], _fmt(r["model_MB"], ".4g"), str(r["n"]), str(r["k"]), _fmt(r["ps_worker_link_MB"], ".4g"),
             _fmt(r["ps_server_link_MB"], ".4g"), _fmt(r["ps_ms"], ".4g"), _fmt(r["ring_link_MB"], ".4g"), _fmt(r["ring_ms"], ".4g"),
             _fmt(r["ps_over_ring"], ".3f")] for r in rows]
    return _table(head, body, markdown)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|", *("| " + " | ".join(r) + " |" for r in rows)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]


def link_gbps(quick: bool) -> dict[str, float]:
    """The per-link figure B: the service's gRPC push and pull (``service.push_pull_gbps``), the slower of them."""
    from benchmarks import service

    push, pull = service.push_pull_gbps((16 if quick else 64) * 2**20, DEFAULT_CHUNK_BYTES, 3 if quick else 5)
    return {"push_GBps": push, "pull_GBps": pull, "link_GBps": min(push, pull)}


def print_all(scaling: dict[str, Any], link: dict[str, float], multihost: Sequence[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout
    print(f"\nScaling on one host, transport auto (shared memory): {scaling['grid']['note']}; {scaling['bytes_source']} "
          f"({scaling['seconds']:.0f}s)", file=out)
    print("\n".join(scaling_lines(scaling)), file=out)
    print(f"\nMulti-host, gRPC: COMPUTED from the measured per-link B = {link['link_GBps']:.3f} GB/s (min of this run's "
          f"push {link['push_GBps']:.3f} and pull {link['pull_GBps']:.3f} GB/s over loopback), not measured across machines; "
          "PS: max(M/B, nM/(kB)), ring all-reduce: 2(n-1)M/(nB)", file=out)
    print("\n".join(multihost_lines(multihost)), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the reduced grid, a few steps: minutes on 2 cores")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    link = link_gbps(args.quick)
    scaling = scaling_run(grid_for(args.quick), log=sys.stderr)
    multihost = multihost_table(link["link_GBps"], {name: model_params(name) for name in MODELS})
    print_all(scaling, link, multihost)
    if args.json:
        args.json.write_text(json.dumps({"quick": args.quick, "scaling": scaling, "link": link, "multihost": multihost}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
