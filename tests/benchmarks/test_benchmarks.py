"""The benchmark harness runs (small sizes); it asserts what it measures exists, never how fast it is."""

from __future__ import annotations

import json

import pytest

from benchmarks import checkpoint, failover, peers, service
from benchmarks.__main__ import Row


def test_transfer_and_update_measurements_run():
    push, pull = service.push_pull_gbps(2 * 2**20, 2**20, 1)
    assert push > 0 and pull > 0
    assert peers.raw_grpc_gbps(2 * 2**20, 2**20, 1, "push") > 0
    assert peers.raw_socket_gbps(2 * 2**20, 2**20, 1) > 0
    in_service, standalone = service.update_mparams_per_s(100_000, 2)
    assert in_service > 0 and standalone > 0


def test_rows_carry_their_ratio_and_serialize():
    row = Row("push_GBps", 1.0, "GB/s", "raw_grpc_GBps", 2.0)
    assert row.ratio == 0.5
    assert Row("raw_socket_GBps", 3.0, "GB/s").ratio is None
    json.dumps({"name": row.name, "value": row.value, "ratio": row.ratio})


def test_checkpoint_stall_measurement_runs():
    assert checkpoint.checkpoint_stall_ms(1) > 0


# About 30 s on 2 cores (a service per measurement, a kill each): with the Ray tests, not the fast ones.
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failover_measurements_run(ray_cluster):
    assert 0 < failover.takeover_s(1) < failover.WAIT_S
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
        assert run.slow_worker_steps > 0
    names = [r[0] for r in straggler.target_rows(result)]
    assert "straggler_sync_s_to_95" in names and "straggler_backup_s_to_95" in names
    if result["plot"] is not None:
        assert result["plot"].exists()
