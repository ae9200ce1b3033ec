"""A service's identity and a job's life (issue 12), on ``serve_local``:

* ``GetServiceInfo`` reports a random id per start of the service; ``Stop`` stops only the instance it names
  (an empty or random payload, or another id, stops nothing), and needs the token when one is set;
* status says "waiting for workers", "running" or "finished" (every worker left after the job trained);
* a finished job is not silently continued: creating it again is refused (``JobFinishedError``) until it is
  deleted or rank 0 joins it to continue it; the other ranks' joins wait for that;
* ``DeleteJob`` removes the job from the coordinator and every shard, and frees its name;
* creating a job whose name is taken with another configuration names the difference, in one line.
"""

from __future__ import annotations

import os
import re
import threading

import grpc
import pytest
import torch

from paramserver.core.errors import (
    JobExistsError,
    JobFinishedError,
    JobNotFoundError,
    UnauthenticatedError,
    WrongServiceError,
)
from paramserver.service.local import serve_local
from paramserver.wire import errors as wire_errors
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from workers.client import ServiceClient
from workers.remote_optimizer import RemoteOptimizer

T = 5.0
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def svc():
    service = serve_local(2, host="127.0.0.1")
    yield service
    service.shutdown()


@pytest.fixture
def job_name(request):
    return re.sub(r"\W", "_", request.node.name)[:60]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _opt(svc, job: str, rank: int = 0, num_workers: int = 1, lr: float = 0.1, timeout: float = T, **kw) -> RemoteOptimizer:
    return RemoteOptimizer(_model().named_parameters(), "SGD", lr=lr, address=svc.address, job=job, rank=rank,
                           num_workers=num_workers, timeout=timeout, transport="grpc", **kw)


def _step(opt: RemoteOptimizer) -> None:
    for p in opt._tensors:  # noqa: SLF001 - the model's parameters
        p.grad = torch.ones_like(p)
    opt.step()


def _reason(exc: grpc.RpcError) -> str | None:
    info = wire_errors.error_info(exc.code(), exc.trailing_metadata())
    return None if info is None else info.reason


# -- the service's identity and Stop -----------------------------------------------------------------------------


def test_stop_names_the_service_instance():
    service = serve_local(1, host="127.0.0.1")
    other = serve_local(1, host="127.0.0.1")
    client = ServiceClient(service.address, timeout=T)
    try:
        info = client.service_info()
        assert re.fullmatch(r"[0-9a-f]{32}", info.service_id), info.service_id
        assert info.service_id == service.service_id != other.service_id
        assert list(info.shard_addresses) == service.coordinator.shard_addresses

        channel = grpc.insecure_channel(service.address)
        raw_stop = channel.unary_unary("/paramserver.v1.Coordinator/Stop", request_serializer=None, response_deserializer=None)
        # an empty Stop (what any payload without field 1 parses as) and random payloads stop nothing
        with pytest.raises(grpc.RpcError) as empty:
            raw_stop(b"", timeout=T)
        assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "service_id" in empty.value.details()
        rng = torch.Generator().manual_seed(12)
        for n in (1, 7, 33, 200):
            payload = bytes(torch.randint(0, 256, (n,), generator=rng, dtype=torch.uint8).tolist())
            with pytest.raises(grpc.RpcError):
                raw_stop(payload, timeout=T)
        # a payload that parses as a Stop naming some other instance
        with pytest.raises(grpc.RpcError) as wrong:
            raw_stop(pb.StopRequest(service_id=os.urandom(16).hex()).SerializeToString(), timeout=T)
        assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION and _reason(wrong.value) == "WRONG_SERVICE"
        channel.close()
        # the client's error: another service's id (the stop was meant for `other`)
        with pytest.raises(WrongServiceError, match=f"this is service {service.service_id}"):
            client.stop(other.service_id)
        assert not service.stop_requested()

        assert client.stop() == service.service_id  # the id asked for first
        assert service.stop_requested() and not other.stop_requested()
    finally:
        client.close()
        service.shutdown()
        other.shutdown()


def test_stop_needs_the_token():
    service = serve_local(1, host="127.0.0.1", auth_token=TOKEN)
    anonymous = ServiceClient(service.address, timeout=T)
    wrong = ServiceClient(service.address, timeout=T, auth_token="nope")
    right = ServiceClient(service.address, timeout=T, auth_token=TOKEN)
    try:
        for client in (anonymous, wrong):
            with pytest.raises(UnauthenticatedError):
                client.stop(service.service_id)  # the right id, no token: refused
            with pytest.raises(UnauthenticatedError):
                client.service_info()
        assert not service.stop_requested()
        right.stop()
        assert service.stop_requested()
    finally:
        for client in (anonymous, wrong, right):
            client.close()
        service.shutdown()


# -- a job's state, finished jobs, deletion ------------------------------------------------------------------------


def test_status_says_waiting_running_finished(svc, job_name):
    opt0 = _opt(svc, job_name, 0, num_workers=2)
    client = ServiceClient(svc.address, job_name, timeout=T)
    opt1 = None
    try:
        assert client.status().state == "waiting for workers"  # rank 1 has not joined yet
        opt1 = _opt(svc, job_name, 1, num_workers=2)
        assert client.status().state == "running"
        threads = [threading.Thread(target=_step, args=(o,)) for o in (opt0, opt1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert client.status().version == 1
        opt1.close()
        assert client.status().state == "running"  # rank 0 still trains
        opt0.close()
        st = client.status()
        assert (st.state, list(st.members), st.version) == ("finished", [], 1)
    finally:
        for o in (opt0, opt1):
            if o is not None:
                o.close()
        client.close()


def test_a_job_whose_workers_left_before_any_step_is_not_finished(svc, job_name):
    opt = _opt(svc, job_name)
    opt.close()
    client = ServiceClient(svc.address, job_name, timeout=T)
    try:
        assert client.status().state == "waiting for workers"
    finally:
        client.close()
    _opt(svc, job_name).close()  # nothing trained: rank 0 may create it again


def test_a_finished_job_is_not_silently_continued(svc, job_name):
    opt = _opt(svc, job_name, 0, num_workers=1, max_workers=2)  # rank 1 may join, and need not
    _step(opt)
    opt.close()
    client = ServiceClient(svc.address, job_name, timeout=T)
    try:
        st = client.status()
        assert st.state == "finished", st
        step = st.version
        # a trainer run again under the name: rank 0 is refused in one line, saying what to do
        with pytest.raises(JobFinishedError) as refused:
            _opt(svc, job_name, 0, num_workers=1, max_workers=2)
        message = str(refused.value)
        assert "\n" not in message
        assert f"job {job_name!r} finished at step {step}" in message and f"paramserver delete --job {job_name}" in message
        assert "join it as rank 0 to continue it" in message
        # the other ranks wait for rank 0 as for a job not created, then say why
        with pytest.raises(JobFinishedError, match="finished at step"):
            client.join_job(1, timeout=2.0)  # answered 0.1 x the wait before its deadline: room on a busy machine
        # continuing is asked for by joining as rank 0: a rank 1 that waits goes on then
        rank0, rank1 = ServiceClient(svc.address, job_name, timeout=T), ServiceClient(svc.address, job_name, timeout=T)
        joined: list[pb.JobInfo] = []
        waiter = threading.Thread(target=lambda: joined.append(rank1.join_job(1, timeout=10)))
        waiter.start()
        info = rank0.join_job(0)
        waiter.join(15)
        assert joined and joined[0].version == info.version == step
        assert client.status().state == "running"
        # a trainer's rank 0 now continues the job (its weights come from the server)
        with _opt(svc, job_name, 0, num_workers=1, max_workers=2) as again:
            assert again.step_count == step
        rank0.leave(0)
        rank1.leave(1)
        rank0.close()
        rank1.close()
    finally:
        client.close()


def test_delete_job_frees_its_name_on_every_shard(svc, job_name):
    with _opt(svc, job_name) as opt:
        _step(opt)
    client = ServiceClient(svc.address, job_name, timeout=T)
    try:
        hosts = svc.coordinator.fleet.hosts
        assert all(host.shard(job_name) is not None for host in hosts)
        client.delete_job()
        with pytest.raises(JobNotFoundError, match=f"no job {job_name!r}"):
            client.status()
        for host in hosts:
            with pytest.raises(JobNotFoundError):
                host.shard(job_name)
        with pytest.raises(JobNotFoundError):
            client.delete_job()
        # the name is free: a job with another configuration takes it, from step 0
        with _opt(svc, job_name, lr=0.5) as opt:
            assert opt.step_count == 0
            _step(opt)
        assert client.status().version == 1
        client.delete_job()
    finally:
        client.close()


def test_another_configuration_names_the_difference_in_one_line(svc, job_name):
    with _opt(svc, job_name, lr=0.1):
        with pytest.raises(JobExistsError) as lr:
            _opt(svc, job_name, lr=0.01)
        message = str(lr.value)
        assert "\n" not in message, message
        assert f"job {job_name!r} exists already with another configuration (the job's -> this one's: optimizer_kwargs_json: " in message, message
        assert "0.1" in message and "0.01" in message and f"paramserver delete --job {job_name}" in message
        with pytest.raises(JobExistsError, match=r"num_workers: 1 -> 3"):
            _opt(svc, job_name, num_workers=3)
        with pytest.raises(JobExistsError, match=r"params: 4 -> 2 entries"):
            RemoteOptimizer(torch.nn.Linear(3, 1).named_parameters(), "SGD", lr=0.1, address=svc.address, job=job_name, timeout=T)


def test_an_unknown_job_names_the_jobs_there_are(svc, job_name):
    client = ServiceClient(svc.address, "nothing-" + job_name, timeout=T)
    try:
        with _opt(svc, job_name):
            with pytest.raises(JobNotFoundError, match=rf"no job 'nothing-{job_name}' on this service \(its jobs: .*'{job_name}'"):
                client.status()
    finally:
        client.close()


# -- on Ray ------------------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_on_ray_the_service_id_survives_a_coordinator_restart_and_delete_reaches_the_shard_actors(ray_cluster):
    import signal
    import time

    import paramserver as ps

    service = ps.serve(1, cpus_per_shard=0.5)
    client = ServiceClient(service.address, "ray-lifecycle", timeout=30.0)
    try:
        assert re.fullmatch(r"[0-9a-f]{32}", service.service_id)
        assert client.service_info().service_id == service.service_id
        with _opt(service, "ray-lifecycle", timeout=30.0) as opt:
            _step(opt)
        assert client.status().state == "finished"
        client.delete_job()
        shard = next(p for p in service.placements() if p["role"] == "primary")
        assert shard["jobs"] == []  # gone from the shard actor too
        coordinator = service.placements()[0]
        os.kill(coordinator["pid"], signal.SIGKILL)  # Ray restarts it on the same address
        deadline = time.monotonic() + 60
        while True:
            try:
                info = client.service_info()
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "the coordinator did not come back"
                time.sleep(0.5)
        assert info.service_id == service.service_id
        with pytest.raises(JobNotFoundError):  # a deleted job does not come back from the shards
            client.status()
        with pytest.raises(WrongServiceError):
            client.stop("f" * 32)
        client.stop()
        assert service.stop_requested()
    finally:
        client.close()
        service.shutdown()
