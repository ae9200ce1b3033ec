"""One reachable port (issue 12) on the two-node loopback cluster: the shards listen on fixed ports (a base per
node; standbys after the primaries), and workers that go through the front door's relay train exactly as local
torch.optim, through a primary's takeover too (the relay follows the shard to its new address)."""

from __future__ import annotations

import os
import signal

import pytest

import paramserver as ps
from paramserver.service.ports import free_port_base
from tests.helpers.training import train_and_compare, wait_until

pytestmark = pytest.mark.ray

RAY = {"cpus_per_shard": 0.25, "placement": "SPREAD", "placement_timeout": 60.0}


def test_relayed_workers_train_exactly_on_fixed_shard_ports(ray_cluster):
    base = free_port_base(span=4)
    service = ps.serve(2, replicas=1, shard_port_base=base, **RAY)
    try:
        ports = {(p["role"], p["shard"]): int(p["address"].rsplit(":", 1)[1]) for p in service.placements() if p["shard"] is not None}
        assert ports == {("primary", 0): base, ("primary", 1): base + 1, ("standby", 0): base + 2, ("standby", 1): base + 3}
        routes = train_and_compare(service.address, "relay-ray", route="relay", transport="auto", steps=4)
        assert routes == [["relay", "relay"]] * 2

        # a primary dies: its standby takes over at its own port, and the relay follows it there
        [primary] = [p for p in service.placements() if p["role"] == "primary" and p["shard"] == 0]
        os.kill(primary["pid"], signal.SIGKILL)

        def settled() -> bool:  # the standby (at its own port) is primary, the restarted process its standby again
            now = {(p["role"], p["shard"]): p["address"] for p in service.placements() if p["shard"] == 0}
            return now.get(("primary", 0), "").endswith(f":{base + 2}") and now.get(("standby", 0), "").endswith(f":{base}")

        wait_until(settled, "shard 0's takeover", timeout=90.0, poll=0.5)
        routes = train_and_compare(service.address, "relay-ray-after-takeover", route="relay", steps=3, timeout=60.0)
        assert routes == [["relay", "relay"]] * 2
    finally:
        service.shutdown()
