"""The benchmark harness runs (small sizes); it asserts what it measures exists, never how fast it is."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import checkpoint, failover, gpu, peers, service
from benchmarks.rows import Row


def test_transfer_and_update_measurements_run():
    push, pull = service.push_pull_gbps(2 * 2**20, 2**20, 1)
    assert push > 0 and pull > 0
    relay_push, relay_pull = service.push_pull_gbps(2 * 2**20, 2**20, 1, route="relay")
    assert relay_push > 0 and relay_pull > 0
    assert peers.raw_grpc_gbps(2 * 2**20, 2**20, 1, "push") > 0
    assert peers.raw_socket_gbps(2 * 2**20, 2**20, 1) > 0
    in_service, standalone = service.update_mparams_per_s(100_000, 2)
    assert in_service > 0 and standalone > 0


def test_rows_carry_their_ratio_and_serialize():
    row = Row("push_GBps", 1.0, "GB/s", "raw_grpc_GBps", 2.0)
    assert row.ratio == 0.5
    assert Row("raw_socket_GBps", 3.0, "GB/s").ratio is None
    json.dumps({"name": row.name, "value": row.value, "ratio": row.ratio})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_the_gpu_benchmark_says_it_needs_a_gpu(capsys):
    with pytest.raises(ValueError, match="need a CUDA device"):
        gpu.run(quick=True)
    assert gpu.main([]) == 2
    assert "need a CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_update_and_copy_measurements_run():
    for kernel in ("fused", "foreach"):
        in_service, standalone = gpu.update_mparams_per_s(100_000, 2, kernel)
        assert in_service > 0 and standalone > 0
    copies = gpu.host_copies_gbps(100_000, 2)
    assert set(copies) == {"take_grpc", "take_shm", "pageable_h2d", "pinned_h2d", "give", "give_shm", "pageable_d2h", "pinned_d2h"}
    assert all(v > 0 for v in copies.values())


def test_checkpoint_copy_measurement_runs():
    assert checkpoint.checkpoint_copy_ms(1) > 0


# About 30 s on 2 cores (a service per measurement, a kill each): with the Ray tests, not the fast ones.
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failover_measurements_run(ray_cluster):
    takeover = failover.takeover(1)
    assert 0 < takeover["takeover_s"] < failover.WAIT_S
    assert 0 < takeover["rebuild_hold_s"] < failover.WAIT_S
    assert 0 < failover.rollback_s(1) < failover.WAIT_S


def test_straggler_run_runs(tmp_path):
    """Both policies at the smallest caps (a few seconds on 2 cores); the curve, the rows and the plot exist."""
    from benchmarks import straggler

    result = straggler.straggler_run(quick=True, max_steps=15, max_seconds=10, plot_path=tmp_path / "straggler.png")
    assert result["step_s"] > 0 and result["slow_sleep_s"] > 0
    for name, runs in result["runs"].items():
        (run,) = runs
        assert not run.errors, (name, run.errors)
        assert run.steps >= 15 and run.curve
        if name in ("sync", "ssp (max_staleness=2)"):  # these steps wait for the straggler; async ones may end first
            assert run.slow_worker_steps > 0
    names = [r[0] for r in straggler.target_rows(result)]
    assert "straggler_sync_s_to_95" in names and "straggler_backup_s_to_95" in names
    if result["plot"] is not None:
        assert result["plot"].exists()


# --- scaling, the multi-host formula table, the rows and the report (pure functions, no Ray) ---


def test_mlp_of_size_has_the_count_it_is_asked_for():
    from benchmarks.common import mlp_hidden, mlp_of_size, mlp_params, param_count

    assert param_count(mlp_of_size(200_000)) == mlp_params(mlp_hidden(200_000))
    for nominal in (1_000_000, 10_000_000, 50_000_000):
        assert abs(mlp_params(mlp_hidden(nominal)) - nominal) / nominal < 1e-3


def test_the_multihost_formulas():
    from benchmarks import scaling

    m, b = 100e6, 1e9  # 100 MB, 1 GB/s
    assert scaling.ps_seconds(m, 1, 1, b) == pytest.approx(0.1)
    assert scaling.ps_seconds(m, 8, 1, b) == pytest.approx(0.8)  # the one server link carries n*M
    assert scaling.ps_seconds(m, 8, 8, b) == pytest.approx(0.1)  # k = n: M/B, whatever n
    assert scaling.ps_seconds(m, 8, 2, b) == pytest.approx(0.4)
    assert scaling.ring_allreduce_seconds(m, 1, b) == 0
    assert scaling.ring_allreduce_seconds(m, 2, b) == pytest.approx(0.1)
    assert scaling.ring_allreduce_seconds(m, 16, b) == pytest.approx(2 * 15 / 16 * 0.1)
    assert scaling.planned_bytes(4, 1000) == 16_000


def test_the_multihost_table():
    from benchmarks import scaling

    rows = scaling.multihost_table(2.0, {"a": 1_000_000, "b": 10_000_000}, ns=(1, 2, 16))
    assert [(r["model"], r["n"], r["k"]) for r in rows] == [
        ("a", 1, 1), ("a", 2, 1), ("a", 2, 2), ("a", 16, 1), ("a", 16, 16),
        ("b", 1, 1), ("b", 2, 1), ("b", 2, 2), ("b", 16, 1), ("b", 16, 16),
    ]
    r = rows[4]  # 1M params, n = k = 16 at 2 GB/s
    assert r["model_MB"] == pytest.approx(4.0)
    assert r["ps_ms"] == pytest.approx(2.0) and r["ring_ms"] == pytest.approx(2 * 15 / 16 * 2.0)
    assert r["ps_server_link_MB"] == pytest.approx(4.0) and rows[3]["ps_server_link_MB"] == pytest.approx(64.0)
    assert rows[0]["ps_over_ring"] is None  # one machine: no all-reduce traffic
    assert len(scaling.multihost_lines(rows)) == len(rows) + 1
    assert len(scaling.multihost_lines(rows, markdown=True)) == len(rows) + 2


def test_the_quick_grid_is_smaller_than_the_full_one():
    from benchmarks import scaling

    full, quick = scaling.grid_for(False), scaling.grid_for(True)
    assert (full.workers, full.shards, full.models) == (scaling.WORKERS, scaling.SHARDS, tuple(scaling.MODELS))
    assert len(quick.workers) * len(quick.shards) * len(quick.models) < len(full.workers) * len(full.shards) * len(full.models)
    assert quick.steps <= full.steps and quick.budget_s < full.budget_s and "reduced" in quick.note


def _e2e_result(steps_per_s: float) -> dict:
    status = {"VmHWM": 500.0, "VmRSS": 450.0, "RssAnon": 300.0, "RssShmem": 40.0}
    return {
        "steps_per_s": steps_per_s, "transport": "shared_memory", "shard_peak_rss_mb": 550.0, "shard_idle_rss_mb": 280.0,
        "shards_idle": [{"RssAnon": 150.0, "RssShmem": 0.0}] * 2, "shards_end": [status, status], "shard_numel": [4_000_000, 3_000_000],
        "worker_peak_rss_mb": 400.0, "worker_idle_rss_mb": 280.0, "worker_idle": {"RssAnon": 150.0, "RssShmem": 0.0},
        "worker_end": status, "bytes_per_step": None, "num_params": 7_000_000, "num_workers": 2,
    }


def test_the_checkpoint_rows():
    from benchmarks.__main__ import checkpoint_rows

    checkpointed = {**_e2e_result(16.0), "checkpoints": 4, "checkpoint_hold_s": 0.08, "stage_seconds": {"queued": 0.01, "update": 0.5}}
    rows = {r.name: r for r in checkpoint_rows(_e2e_result(20.0), checkpointed, 10, copy_ms=6.0)}
    # the steps' waits for the job's lock, 10 ms in all over 4 checkpoints, against a step without checkpoints
    assert rows["checkpoint_stall_ms"].value == pytest.approx(2.5) and rows["checkpoint_stall_ms"].ratio == pytest.approx(2.5 / 50)
    assert rows["checkpoint_hold_ms"].value == pytest.approx(20.0) and rows["checkpoint_copy_ms"].ratio == pytest.approx(6.0 / 50)
    assert rows["e2e_checkpointed_steps_per_s"].baseline == "e2e_steps_per_s" and rows["e2e_checkpointed_steps_per_s"].ratio == 0.8
    # 62.5 ms a step against 50: 12.5 ms more a step, 125 ms for each checkpoint of 10 steps
    assert rows["checkpoint_cost_ms"].value == pytest.approx(125.0) and rows["checkpoint_cost_ms"].baseline_value == 50.0


# A service on Ray with checkpoints on: with the Ray tests, not the fast ones.
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_e2e_job_runs_with_checkpoints(ray_cluster):
    result = service.e2e(2, 1, 4, 8, num_params=20_000, checkpoint_every=2)
    assert result["steps_per_s"] > 0 and result["transport"] == "shared_memory"
    # 2 warm-up steps, 4 timed ones and one on either side of them (for the byte counters): a checkpoint after
    # steps 1, 3, 5 and 7, each copy timed by the coordinator
    assert result["closed_steps"] == 8 and result["checkpoints"] == 4 and result["checkpoint_hold_s"] > 0
    assert {"queued", "aggregate", "clip", "update", "schedule"} <= set(result["stage_seconds"])


def test_the_e2e_and_memory_rows():
    from benchmarks.__main__ import e2e_rows, memory_rows, table_lines

    rows = e2e_rows(_e2e_result(10.0), _e2e_result(4.0), _e2e_result(9.0), local=20.0, ddp=6.0, ray_ps=5.0)
    pairs = {(r.name, r.baseline) for r in rows}
    for name in ("e2e_steps_per_s", "e2e_grpc_steps_per_s"):
        for base in ("ray_ps_steps_per_s", "ddp_gloo_steps_per_s", "local_steps_per_s"):
            assert (name, base) in pairs
    assert ("e2e_steps_per_s", "e2e_grpc_steps_per_s") in pairs and ("e2e_bf16_grads_steps_per_s", "e2e_steps_per_s") in pairs
    assert next(r for r in rows if r.name == "e2e_steps_per_s" and r.baseline == "ddp_gloo_steps_per_s").ratio == pytest.approx(10 / 6)

    # the small run: 1M parameters on its larger shard (11.4 MB of state), 40 MB over its idle shard
    small = {**_e2e_result(10.0), "shard_peak_rss_mb": 310.0, "shard_idle_rss_mb": 270.0, "shard_numel": [1_000_000, 900_000]}
    memory = {r.name: r for r in memory_rows(_e2e_result(10.0), small)}
    state, small_state = 4_000_000 * 12 / 2**20, 1_000_000 * 12 / 2**20  # the largest shard's weights and two moments
    # the line through (11.4 MB, 40 MB) and (45.8 MB, 270 MB): its slope is the goal row's ratio, its intercept the fixed overhead
    slope = (270.0 - 40.0) / (state - small_state)
    assert memory["shard_fixed_overhead_MB"].value == pytest.approx(40.0 - slope * small_state)
    goal = memory["shard_peak_rss_over_fixed_MB"]
    assert goal.baseline == "shard_state_MB" and goal.baseline_value == pytest.approx(state) and goal.ratio == pytest.approx(slope)
    # the workers' gradients the shard maps (2 workers x its 4M fp32 elements) are left out of its own memory
    own, floor = (r for r in memory_rows(_e2e_result(10.0), small) if r.name == "shard_own_peak_over_fixed_MB")
    assert own.value == pytest.approx(goal.value - 2 * 4_000_000 * 4 / 2**20) and own.baseline == "shard_state_MB"
    assert floor.baseline == "shard_state_and_mean_MB" and floor.baseline_value == pytest.approx(state * 4 / 3)
    assert memory["shard_peak_rss_MB"].baseline == "shard_state_plus_idle_MB"
    assert memory["shard_peak_rss_MB"].baseline_value == pytest.approx(state + 280.0)
    assert memory["shard_peak_rss_over_idle_MB"].value == 270.0 and memory["shard_peak_rss_over_idle_MB"].baseline_value == pytest.approx(state)
    assert memory["shard_rss_anon_end_over_idle_MB"].value == 150.0 and memory["shard_rss_shmem_end_MB"].value == 40.0
    assert memory["shard_idle_rss_MB"].value == 280.0 and memory["shard_idle_rss_MB"].ratio is None
    assert memory["worker_rss_shmem_end_MB"].baseline_value == pytest.approx(7_000_000 * 8 / 2**20)
    assert len(table_lines(rows)) == len(rows) + 1


def _run_json(quick: bool) -> dict:
    from dataclasses import asdict

    from benchmarks import scaling
    from benchmarks.__main__ import e2e_rows

    rows = e2e_rows(_e2e_result(10.0), _e2e_result(4.0), None, local=20.0, ddp=6.0, ray_ps=5.0)
    rows.append(Row("takeover_s", 0.8, "s", "e2e_step_s", 0.1))
    points = [
        {"model": "1M", "num_params": 999_562, "shards": 1, "workers": 2, "planned_bytes_per_step": 8e6, "steps_per_s": 30.0,
         "transport": "shared_memory", "measured": {"grpc_in": 0, "grpc_out": 0, "shm_in": 8e6, "shm_out": 8e6},
         "bytes_in_per_step": 8e6, "bytes_out_per_step": 8e6, "error": None},
        {"model": "50M", "num_params": 49_999_786, "shards": 4, "workers": 8, "planned_bytes_per_step": 1.6e9, "steps_per_s": None,
         "error": "skipped: the grid's time budget was spent"},
    ]
    return {
        "machine": {"date": "2026-11-25", "cpus": 2, "processor": "x86_64", "platform": "Linux", "python": "3.11", "torch": "2", "cuda": None},
        "quick": quick, "seconds": 300.0, "results": [{**asdict(r), "ratio": r.ratio} for r in rows],
        "scaling": {"grid": {**asdict(scaling.grid_for(quick))}, "points": points, "seconds": 100.0, "bytes_source": "measured"},
        "link": {"push_GBps": 2.0, "pull_GBps": 1.5, "link_GBps": 1.5},
        "multihost": scaling.multihost_table(1.5, {"1M": 999_562}, ns=(1, 2)),
        "rounds": {"ray_ps_steps_per_s": [5.0, 4.5, 5.5], "e2e_steps_per_s": [9.0, 10.0, 11.0]},
    }


def test_the_report_renders_every_table(tmp_path):
    from benchmarks import report

    text = report.render(_run_json(quick=True))
    assert "quick run" in text and "to be replaced" in text
    assert "| e2e_grpc_steps_per_s | 4 | steps/s | ray_ps_steps_per_s | 5 | 0.8 |" in text
    assert "| e2e (shared memory) ≥ 1.5 × DDP gloo | 1.667 (10 steps/s against 6) | yes |" in text
    assert "| e2e (shared memory) ≥ 2.5 × Ray object-store PS | 2 (10 steps/s against 5) | **no** |" in text
    assert "| in-service update ≥ 0.8 × standalone torch.optim | not in this run | |" in text
    assert "skipped: the grid's time budget was spent" in text and "| 1M | 1.00M | 1 | 2 | 30 | 8 | 8 | 8/8 | 8 |" in text
    assert "computed, not measured across machines" in text and "| 1M | 3.998 | 2 | 1 |" in text
    assert "to be replaced" not in report.render(_run_json(quick=False))
    assert ("Measured in 3 alternating rounds, the table holding the median of each (each round's figure, in the order they "
            "ran): ray_ps_steps_per_s 5, 4.5, 5.5; e2e_steps_per_s 9, 10, 11.") in text

    data = tmp_path / "run.json"
    data.write_text(json.dumps(_run_json(quick=False)))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# head\n\nprose\n\n{report.BEGIN}\nold figures\n{report.END}\n\nmore prose\n")
    assert report.main([str(data), "--write", str(doc)]) == 0
    written = doc.read_text()
    assert written.startswith("# head\n\nprose\n\n") and written.endswith(f"{report.END}\n\nmore prose\n")
    assert "old figures" not in written and "| e2e_steps_per_s | 10 |" in written
    with pytest.raises(ValueError, match="report:begin"):
        report.replace_generated("no markers", "x")


def test_alternating_rounds_interleave_and_the_middle_run_is_the_median():
    from benchmarks.rows import alternating_rounds, middle, middle_run

    order = []
    results = alternating_rounds(3, {"a": lambda: order.append("a") or len(order), "b": lambda: order.append("b") or len(order)})
    assert order == ["a", "b"] * 3 and results == {"a": [1, 3, 5], "b": [2, 4, 6]}
    assert middle([3.0, 1.0, 2.0]) == 2.0 and middle([4.0, 1.0]) == 1.0 and middle([7.0]) == 7.0
    runs = [{"steps_per_s": 9.0, "peak": "a"}, {"steps_per_s": 11.0, "peak": "b"}, {"steps_per_s": 10.0, "peak": "c"}]
    assert middle_run(runs) == {"steps_per_s": 10.0, "peak": "c"}  # the whole run, its other figures with it
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        alternating_rounds(0, {"a": lambda: 1})
    with pytest.raises(ValueError, match="no runs"):
        middle_run([])


def test_shard_bytes_reads_the_shards_counters():
    """The counters as a shard exposes them, read back over HTTP (this process's own metrics server)."""
    from prometheus_client import start_http_server

    from benchmarks.common import shard_bytes
    from paramserver.service import metrics

    server, thread = start_http_server(0, addr="127.0.0.1")
    try:
        address = f"127.0.0.1:{server.server_port}"
        before = shard_bytes([address], "bench-counters")
        metrics.BYTES_IN.labels("bench-counters", "0").inc(100)
        metrics.BYTES_OUT.labels("bench-counters", "1").inc(50)
        metrics.SHARED_MEMORY_BYTES.labels("bench-counters", "0", "in").inc(7)
        metrics.SHARED_MEMORY_BYTES.labels("bench-counters", "1", "out").inc(3)
        metrics.BYTES_IN.labels("another-job", "0").inc(1000)
        after = shard_bytes([address], "bench-counters")
    finally:
        server.shutdown()
        thread.join(10)
    assert {k: after[k] - before[k] for k in after} == {"grpc_in": 100, "grpc_out": 50, "shm_in": 7, "shm_out": 3}


def test_cpu_seconds_counts_this_process_and_another():
    import subprocess
    import sys
    import time

    from benchmarks.common import cpu_seconds

    before = cpu_seconds()
    assert sum(i * i for i in range(2_000_000)) > 0  # some CPU time in this process
    assert cpu_seconds() > before
    spin = "import time\nend = time.time() + 0.5\nwhile time.time() < end: pass\ninput()"  # spins, then waits
    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while cpu_seconds(child.pid) < 0.2:
            assert time.monotonic() < deadline, "the child's CPU time did not grow"
            time.sleep(0.05)
    finally:
        child.communicate("\n", timeout=10)
