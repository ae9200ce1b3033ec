"""The front door's relay of the Shard service (issue 12): a worker that reaches only the front door trains
through it exactly as over direct routes; the shards' errors, deadlines and token checks come through it."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from paramserver.core.errors import StaleStepError
from paramserver.service.local import serve_local
from paramserver.service.ports import free_port_base
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from tests.helpers.training import train_and_compare
from workers.client import ServiceClient, reachable
from workers.remote_optimizer import RemoteOptimizer

TOKEN = "relay-secret"


@pytest.fixture(scope="module")
def service():
    svc = serve_local(2, auth_token=TOKEN)
    yield svc
    svc.shutdown()


def test_workers_train_through_the_relay_exactly_as_torch_optim(service):
    routes = train_and_compare(service.address, "relay-parity", route="relay", auth_token=TOKEN, transport="auto")
    assert routes == [["relay", "relay"]] * 2


def test_auto_route_is_direct_where_the_shards_answer(service):
    routes = train_and_compare(service.address, "auto-parity", route="auto", auth_token=TOKEN, transport="grpc", steps=2)
    assert routes == [["direct", "direct"]] * 2


def _one_worker(service, job, **options):
    model = torch.nn.Linear(4, 3)
    return model, RemoteOptimizer(model.named_parameters(), "SGD", lr=0.1, address=service.address, job=job, num_workers=1, rank=0,
                                  timeout=10.0, auth_token=TOKEN, route="relay", **options)


def test_a_relayed_worker_keeps_to_grpc_chunks(service):
    _, opt = _one_worker(service, "relay-transport")
    with opt:
        assert opt.client.routes == ["relay", "relay"]
        assert opt.client.transport_in_use == "grpc"


def test_the_shards_errors_come_back_through_the_relay_with_their_reason(service):
    model, opt = _one_worker(service, "relay-errors")
    with opt:
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        opt.step()
        client = opt.client
        grads = [[torch.zeros(layout.numel, dtype=layout.dtype) for layout in client.plan.buffers(j)] for j in range(2)]
        with pytest.raises(StaleStepError) as caught:
            client.push(0, 0, grads)  # step 0 closed long ago
        assert caught.value.version == 2  # carried by the rich status in the trailing metadata
        # the caller's deadline goes to the shard: a pull of a version that never comes ends at it
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            client.pull(0, min_version=100, timeout=0.5)
        assert time.monotonic() - start < 5.0
        # shared memory makes no sense through a relay: refused with the reason
        with pytest.raises(grpc.RpcError) as refused:
            client.shards[0].AttachSharedMemory(pb.AttachRequest(job="relay-errors", worker=0, shard=0, host="x"),
                                               timeout=5.0, metadata=client._metadata)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "relay" in refused.value.details()


def test_the_relay_needs_the_token_and_a_shard(service):
    channel = grpc.insecure_channel(service.address)
    pull = channel.unary_stream("/paramserver.v1.Shard/PullParameters")
    request = pb.PullRequest(job="x", shard=0).SerializeToString()
    try:
        with pytest.raises(grpc.RpcError) as denied:
            list(pull(request, timeout=5.0, metadata=(("x-paramserver-shard", "0"),)))
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as unnamed:
            list(pull(request, timeout=5.0, metadata=(("authorization", f"Bearer {TOKEN}"),)))
        assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "x-paramserver-shard" in unnamed.value.details()
        with pytest.raises(grpc.RpcError) as wrong:
            list(pull(request, timeout=5.0, metadata=(("authorization", f"Bearer {TOKEN}"), ("x-paramserver-shard", "7"))))
        assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()


def test_shards_listen_on_fixed_ports_and_auto_relays_where_they_are_closed():
    base = free_port_base(span=2)
    with serve_local(2, shard_port_base=base) as svc:
        assert svc.coordinator.shard_addresses == [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
        with pytest.raises(OSError):  # a fixed port is not shared with another server (no SO_REUSEPORT)
            serve_local(1, shard_port_base=base)
        assert reachable(svc.coordinator.shard_addresses[0])
        with pytest.raises(ValueError, match="shard_port_base"):
            serve_local(2, shard_port_base=65535)
        # an address nothing listens on (a firewall's view of a shard): "auto" relays that shard, once probed
        closed = f"127.0.0.1:{free_port_base()}"
        client = ServiceClient(svc.address, "fixed", route="auto")
        try:
            assert [client._route(a) for a in (svc.coordinator.shard_addresses[0], closed)] == ["direct", "relay"]
        finally:
            client.close()


def test_the_relay_under_tls():
    """The relay dials the shards over TLS too, trusting the service's certificate."""
    from paramserver.core.config import TLSConfig
    from tests.helpers.tls_certs import make_tls_material

    tls = make_tls_material()
    with serve_local(2, tls=TLSConfig(tls.server_chain, tls.server_key)) as svc:
        routes = train_and_compare(svc.address, "relay-tls", route="relay", root_certificates=tls.ca, steps=2)
    assert routes == [["relay", "relay"]] * 2
