"""Shared fixtures. Ray tests share one two-node Ray cluster on 127.0.0.1 for the whole session."""

from __future__ import annotations

import os

# Every Ray process stays on 127.0.0.1; this must be set before Ray starts.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_cluster():
    """A head node and a second node, each with 2 CPUs and a custom resource naming it."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"node_head": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={"node_second": 1})
    cluster.wait_for_nodes(timeout=60)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """After the whole session (its Ray cluster is gone by then: this fixture is set up first, so it ends last),
    no shared-memory segment of the service may be left in /dev/shm: every segment a test made was unlinked by
    its owner, or, where a test SIGKILLed the owner, by the sweep of the shard process that replaced it or of
    the service's shutdown."""
    from paramserver.dataplane.segments import alive, creator, leftover_names

    before = set(leftover_names())
    yield
    # this session's: made in this process (serve_local) or by a process that is gone (its Ray workers); a name
    # whose creator lives on belongs to something else running on the machine
    left = sorted(n for n in set(leftover_names()) - before if creator(n) == os.getpid() or not alive(creator(n) or 0))
    assert not left, f"shared memory left in /dev/shm after the tests: {left}"
