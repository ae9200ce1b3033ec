"""Run the benchmarks, print a table, write JSON.

    python -m benchmarks [--quick] [--json PATH]

Every figure is measured in this one run, next to the baseline it is compared with, on this machine;
the ratio is the figure over its baseline (for memory: over what the state alone needs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import checkpoint, failover, gpt2, gpu, peers, scaling, service, straggler
from benchmarks.common import ray_session
from benchmarks.rows import Row, alternating_rounds, middle, middle_run, table_lines, write_json
from paramserver.core.config import DEFAULT_CHUNK_BYTES

MIB = 2**20
ROUNDS = 3  # the goals' figures and their baselines: the median of this many alternating runs


def e2e_rows(e2e: dict, e2e_grpc: dict, e2e_bf16: dict | None, *, local: float, ddp: float, ray_ps: float) -> list[Row]:
    """The end-to-end rows: the service over the default transport (shared memory on one host) and over gRPC,
    each against the Ray object-store PS, DDP over gloo and one local process; shared memory against gRPC;
    bf16 gradients against the default."""
    rows = []
    for name, result in (("e2e_steps_per_s", e2e), ("e2e_grpc_steps_per_s", e2e_grpc)):
        rows += [
            Row(name, result["steps_per_s"], "steps/s", "ray_ps_steps_per_s", ray_ps),
            Row(name, result["steps_per_s"], "steps/s", "ddp_gloo_steps_per_s", ddp),
            Row(name, result["steps_per_s"], "steps/s", "local_steps_per_s", local),
        ]
    rows.append(Row("e2e_steps_per_s", e2e["steps_per_s"], "steps/s", "e2e_grpc_steps_per_s", e2e_grpc["steps_per_s"]))
    if e2e_bf16 is not None:
        rows.append(Row("e2e_bf16_grads_steps_per_s", e2e_bf16["steps_per_s"], "steps/s", "e2e_steps_per_s", e2e["steps_per_s"]))
    return rows


def checkpoint_rows(e2e: dict, checkpointed: dict, every: int, copy_ms: float) -> list[Row]:
    """What checkpoints cost the end-to-end job with a checkpoint every ``every`` steps (``checkpointed``, into a
    temporary directory on this machine's disk) against the same job without (``e2e``).

    The stall is what the job's steps waited for the checkpoints' copies: the closing shard reports' waits for the
    job's lock (the coordinator's ``queued`` stage, every step of the run, the ones that had no checkpoint to wait
    for too), per checkpoint. The hold is how long the coordinator held the job for each copy (the shards copy
    their slices meanwhile); the workers compute the next step during it. ``copy_ms``: the copy of the same state
    in one process (``checkpoint.checkpoint_copy_ms``), what a step would wait if nothing overlapped it. The
    background write (serialization, its checksum, the disk) and the Ray calls take from the training on these 2
    cores: the cost of one checkpoint is the time it added over its ``every`` steps."""
    step_ms = 1000 / e2e["steps_per_s"]
    checkpoints = checkpointed["checkpoints"]
    assert checkpoints > 0, "the checkpointed run took no checkpoint"
    stall_ms = 1000 * checkpointed["stage_seconds"]["queued"] / checkpoints
    hold_ms = 1000 * checkpointed["checkpoint_hold_s"] / checkpoints
    cost_ms = every * (1000 / checkpointed["steps_per_s"] - step_ms)
    return [
        Row("checkpoint_stall_ms", stall_ms, "ms", "e2e_step_ms", step_ms),
        Row("checkpoint_hold_ms", hold_ms, "ms", "e2e_step_ms", step_ms),
        Row("checkpoint_copy_ms", copy_ms, "ms", "e2e_step_ms", step_ms),
        Row("e2e_checkpointed_steps_per_s", checkpointed["steps_per_s"], "steps/s", "e2e_steps_per_s", e2e["steps_per_s"]),
        Row("checkpoint_cost_ms", cost_ms, "ms", "e2e_step_ms", step_ms),
    ]


def memory_rows(e2e: dict, small: dict) -> list[Row]:
    """Memory of the end-to-end run over the default transport, in MB (2**20 bytes).

    A shard's state is fp32 weights plus Adam's two moments of its part (the largest shard's). Peak RSS is
    VmHWM (after the run), over a shard process's RSS before any job (idle). A shard's peak over idle is a fixed
    overhead plus a part that grows with its state; ``small`` is the same job with a smaller model
    (``SMALL_PARAMS``), and the line through the two runs gives both: its slope is the goal row's ratio (peak
    over the fixed overhead, against the state) and its intercept the fixed overhead (code paged in, the
    threads' heap arenas with their block-sized temporaries, buffers whose size does not grow with the model).
    The same peak against the state and one mean gradient (what exact clipping needs held at once) shows what
    else is left. The workers' gradient segments a shard maps to read them in place (W x its part of the
    gradients) are in its RSS and in the workers' too: ``shard_own_peak_over_fixed_MB`` leaves them out.
    ``*_end_*`` are read right after the last timed step, while the job holds its shared memory: RssAnon is
    private memory, RssShmem resident shared memory (the segments the shard and the workers share). A worker's
    model and gradients are fp32 parameters twice."""

    def state_mb(run: dict) -> float:
        return max(run["shard_numel"]) * 4 * 3 / MIB

    def over_idle(run: dict) -> float:
        return run["shard_peak_rss_mb"] - run["shard_idle_rss_mb"]

    state, idle = state_mb(e2e), e2e["shard_idle_rss_mb"]
    slope = (over_idle(e2e) - over_idle(small)) / (state - state_mb(small))
    fixed = over_idle(small) - slope * state_mb(small)
    over_fixed = over_idle(e2e) - fixed
    own = over_fixed - max(e2e["shard_numel"]) * 4 * e2e["num_workers"] / MIB  # less the workers' gradients it maps
    end = max(e2e["shards_end"], key=lambda s: s["RssAnon"] + s["RssShmem"])
    idle_anon = max(s["RssAnon"] for s in e2e["shards_idle"])
    model_and_grads = e2e["num_params"] * 4 * 2 / MIB
    worker_idle, worker_end = e2e["worker_idle"], e2e["worker_end"]
    return [
        Row("shard_idle_rss_MB", idle, "MB"),
        Row("shard_peak_rss_MB", e2e["shard_peak_rss_mb"], "MB", "shard_state_plus_idle_MB", state + idle),
        Row("shard_peak_rss_over_idle_MB", over_idle(e2e), "MB", "shard_state_MB", state),
        Row("shard_fixed_overhead_MB", fixed, "MB"),
        Row("shard_peak_rss_over_fixed_MB", over_fixed, "MB", "shard_state_MB", state),
        Row("shard_own_peak_over_fixed_MB", own, "MB", "shard_state_MB", state),
        Row("shard_own_peak_over_fixed_MB", own, "MB", "shard_state_and_mean_MB", state * 4 / 3),
        Row("shard_rss_anon_end_over_idle_MB", end["RssAnon"] - idle_anon, "MB", "shard_state_MB", state),
        Row("shard_rss_shmem_end_MB", end["RssShmem"], "MB", "shard_state_MB", state),
        Row("worker_peak_rss_MB", e2e["worker_peak_rss_mb"], "MB", "model_and_grads_MB", model_and_grads),
        Row("worker_peak_rss_over_idle_MB", e2e["worker_peak_rss_mb"] - e2e["worker_idle_rss_mb"], "MB", "model_and_grads_MB", model_and_grads),
        Row("worker_rss_anon_end_over_idle_MB", worker_end["RssAnon"] - worker_idle["RssAnon"], "MB", "model_and_grads_MB", model_and_grads),
        Row("worker_rss_shmem_end_MB", worker_end["RssShmem"], "MB", "model_and_grads_MB", model_and_grads),
    ]


# The smaller model of the memory figures (memory_rows): about 0.7M parameters on its larger shard, three of
# the blocks a shard works in (paramserver.core.blocked), so its run holds every temporary the big one does.
SMALL_PARAMS = 1_200_000

# Workers on one shard (threads with a client each, a tiny model): the shard server's cost per worker.
SHARD_WORKERS = (1, 8, 32, 128)


def run(quick: bool, extras: dict | None = None) -> list[Row]:
    """Every measurement of the main table, as rows; ``extras`` (a dict) gets the end-to-end runs' details
    (``e2e``), the scaling grid (``scaling``), the per-link figure (``link``) and the multi-host table computed
    from it (``multihost``)."""
    extras = {} if extras is None else extras
    mib = 2**20
    nbytes = (16 if quick else 64) * mib
    chunk = DEFAULT_CHUNK_BYTES  # the wire's default: the service's rows and their raw baselines alike
    repeats = 3 if quick else 5
    steps = 5 if quick else 20
    checkpoint_every = 5 if quick else 10  # the end-to-end job with checkpoints: one or two in its timed steps
    batch_size = 32
    rows: list[Row] = []

    def timed(label: str):
        print(f"... {label}", file=sys.stderr, flush=True)

    # The goal figures and their baselines are the median of ROUNDS alternating rounds (each round's figure in
    # the JSON's "rounds"): one measurement of a few seconds moves by 20% from one minute to the next here.
    timed(f"transfer ({ROUNDS} rounds)")
    transfer = alternating_rounds(ROUNDS, {
        "raw_socket_GBps": lambda: peers.raw_socket_gbps(nbytes, chunk, repeats),
        "raw_grpc_push_GBps": lambda: peers.raw_grpc_gbps(nbytes, chunk, repeats, "push"),
        "raw_grpc_pull_GBps": lambda: peers.raw_grpc_gbps(nbytes, chunk, repeats, "pull"),
        "push_pull_GBps": lambda: service.push_pull_gbps(nbytes, chunk, repeats),
        "relay_push_pull_GBps": lambda: service.push_pull_gbps(nbytes, chunk, repeats, route="relay"),
    })
    rounds = {name: transfer[name] for name in ("raw_socket_GBps", "raw_grpc_push_GBps", "raw_grpc_pull_GBps")}
    for route in ("", "relay_"):
        rounds[f"{route}push_GBps"], rounds[f"{route}pull_GBps"] = (list(v) for v in zip(*transfer[f"{route}push_pull_GBps"]))
    socket_gbps, grpc_push, grpc_pull, push, pull, relay_push, relay_pull = (middle(rounds[name]) for name in (
        "raw_socket_GBps", "raw_grpc_push_GBps", "raw_grpc_pull_GBps", "push_GBps", "pull_GBps", "relay_push_GBps", "relay_pull_GBps"))
    rows += [
        Row("raw_socket_GBps", socket_gbps, "GB/s"),
        Row("raw_grpc_GBps", grpc_push, "GB/s", "raw_socket_GBps", socket_gbps),
        Row("push_GBps", push, "GB/s", "raw_grpc_GBps", grpc_push),
        Row("pull_GBps", pull, "GB/s", "raw_grpc_GBps", grpc_pull),
        # through the front door's relay (one reachable port) against the direct route to the shard
        Row("relay_push_GBps", relay_push, "GB/s", "push_GBps", push),
        Row("relay_pull_GBps", relay_pull, "GB/s", "pull_GBps", pull),
    ]

    timed("update")
    in_service, standalone = service.update_mparams_per_s(2_000_000 if quick else 10_000_000, repeats)
    rows.append(Row("update_Mparams_per_s", in_service, "Mparams/s", "torch_adam_Mparams_per_s", standalone))

    timed(f"end to end: local, DDP gloo, Ray PS, the service over shared memory ({ROUNDS} rounds), over gRPC")
    outside_ray = alternating_rounds(ROUNDS, {
        "local": lambda: peers.local_steps_per_s(steps, batch_size),
        "ddp": lambda: peers.ddp_gloo_steps_per_s(2, steps, batch_size),
    })
    local, ddp = middle(outside_ray["local"]), middle(outside_ray["ddp"])
    with ray_session():  # one Ray for the Ray PS and the service's runs
        on_ray = alternating_rounds(ROUNDS, {
            "ray_ps": lambda: peers.ray_ps_steps_per_s(2, steps, batch_size),
            # transport="auto": checked to be shared memory in every worker
            "e2e": lambda: service.e2e(2, 2, steps, batch_size),
        })
        ray_ps = middle(on_ray["ray_ps"])
        e2e = {**middle_run(on_ray["e2e"]), "rounds_steps_per_s": [run["steps_per_s"] for run in on_ray["e2e"]]}
        checkpointed = service.e2e(2, 2, steps, batch_size, checkpoint_every=checkpoint_every)
        e2e_grpc = service.e2e(2, 2, steps, batch_size, transport="grpc")
        e2e_bf16 = service.e2e(2, 2, steps, batch_size, grad_dtype=torch.bfloat16)
        small = service.e2e(2, 2, 5, batch_size, num_params=SMALL_PARAMS)  # with e2e: the shards' memory line (memory_rows)
    rows += e2e_rows(e2e, e2e_grpc, e2e_bf16, local=local, ddp=ddp, ray_ps=ray_ps)
    # each run's details in the JSON: the transport in use, the bytes per step the shards counted, memory
    extras["e2e"] = {"auto": e2e, "grpc": e2e_grpc, "auto_bf16_grads": e2e_bf16, "small": small, "checkpointed": checkpointed}
    extras["checkpoint_every"] = checkpoint_every
    rounds.update(local_steps_per_s=outside_ray["local"], ddp_gloo_steps_per_s=outside_ray["ddp"],
                  ray_ps_steps_per_s=on_ray["ray_ps"], e2e_steps_per_s=e2e["rounds_steps_per_s"])
    extras["rounds"] = rounds

    timed("end to end: GPT-2 (transformers, byte-level), the service and one local process")
    gpt2_steps = 10 if quick else 30
    rows.append(Row("e2e_gpt2_steps_per_s", gpt2.service_steps_per_s(2, 2, gpt2_steps), "steps/s", "local_gpt2_steps_per_s",
                    gpt2.local_steps_per_s(gpt2_steps)))

    timed("checkpoints: the copy in one process")
    rows += checkpoint_rows(e2e, checkpointed, checkpoint_every, checkpoint.checkpoint_copy_ms(3 if quick else 10))

    # Kill to the next closed step, against a step of the end-to-end run: the ratio is the steps a failover costs.
    timed("failover: standby takeover, rollback to a checkpoint")
    step_s = 1 / e2e["steps_per_s"]
    takeover = failover.takeover(2 if quick else 5)
    rows += [
        Row("takeover_s", takeover["takeover_s"], "s", "e2e_step_s", step_s),
        # the job's steps wait once while the killed primary, back as the new standby, is rebuilt from the primary
        Row("standby_rebuild_hold_ms", 1e3 * takeover["rebuild_hold_s"], "ms", "e2e_step_ms", 1e3 * step_s),
        Row("rollback_s", failover.rollback_s(1 if quick else 3), "s", "e2e_step_s", step_s),
    ]

    rows += memory_rows(e2e, small)
    timed("workers per shard")
    per_shard = service.shard_steps_per_s(SHARD_WORKERS, 5 if quick else 20)
    rows += [Row(f"shard_steps_per_s_w{w}", v, "steps/s", "shard_steps_per_s_w1", per_shard[1]) for w, v in per_shard.items()]

    if not quick:
        timed("chunk size")
        for chunk_mib in (0.5, 1, 2, 4, 8):
            push_c, pull_c = service.push_pull_gbps(nbytes, int(chunk_mib * mib), repeats)
            rows.append(Row(f"push_GBps_chunk_{chunk_mib}MiB", push_c, "GB/s", "raw_grpc_GBps", grpc_push))
            rows.append(Row(f"pull_GBps_chunk_{chunk_mib}MiB", pull_c, "GB/s", "raw_grpc_GBps", grpc_pull))

    # A straggler among 4 workers of the digits job: seconds (and steps) to 95% test accuracy per step policy,
    # against sync's; the ratio is the policy's time over sync's (below 1: sooner), its inverse the speed-up.
    timed("straggler: time to 95% test accuracy per step policy")
    result = straggler.straggler_run(quick)
    rows += [Row(*r) for r in straggler.target_rows(result)]
    print(f"straggler plot: {result['plot']}", file=sys.stderr)

    # How the cost grows (one host, shared memory), and the multi-host case computed from this run's gRPC B.
    timed(f"scaling: {scaling.grid_for(quick).note}")
    extras["scaling"] = scaling.scaling_run(scaling.grid_for(quick), log=sys.stderr)
    extras["link"] = {"push_GBps": push, "pull_GBps": pull, "link_GBps": min(push, pull)}
    extras["multihost"] = scaling.multihost_table(min(push, pull), {name: scaling.model_params(name) for name in scaling.MODELS})

    if torch.cuda.is_available():  # the shards on the GPU: the update, the host-device copies, end to end
        timed("GPU: the update, the shard's copies, end to end with GPU shards")
        rows += gpu.run(quick, extras)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, ends within minutes on 2 cores")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    extras: dict = {}
    rows = run(args.quick, extras)
    print("\n".join(table_lines(rows)))
    scaling.print_all(extras["scaling"], extras["link"], extras["multihost"])
    seconds = time.perf_counter() - started
    print(f"({seconds:.0f}s)")
    if args.json:
        write_json(args.json, rows, quick=args.quick, seconds=seconds, extras=extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
