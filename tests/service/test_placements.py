"""``Service.placements()`` of ``serve_local``: the same shape as on Ray, every part in this one process."""

from __future__ import annotations

import os

from paramserver.service.local import serve_local


def test_local_placements_list_the_coordinator_and_every_shard():
    with serve_local(2) as service:
        placements = service.placements()
    assert [(p["role"], p["shard"]) for p in placements] == [("coordinator", None), ("primary", 0), ("primary", 1)]
    for p in placements:
        assert set(p) == {"role", "shard", "pid", "node_id", "address", "device", "metrics"}
        assert p["pid"] == os.getpid() and p["node_id"] is None and p["device"] == "cpu" and p["metrics"] is None
        os.kill(p["pid"], 0)
    assert placements[0]["address"] == service.address
    assert len({p["address"] for p in placements}) == 3
