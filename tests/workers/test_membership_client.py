"""Membership from the client's side (issue 10): RemoteOptimizer renews its lease in the background, leaves
at once (idempotently), rejoins, and reports what the last step averaged; the job's membership options reach
the job. serve_local, no Ray; every wait has a deadline."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from paramserver.core.errors import NotAMemberError
from paramserver.service.local import serve_local
from workers.client import ServiceClient
from workers.remote_optimizer import RemoteOptimizer

T = 30.0  # every wait's deadline
_jobs = itertools.count()


@pytest.fixture(scope="module")
def service():
    with serve_local(num_shards=2, host="127.0.0.1") as server:
        yield server


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def backward(model: torch.nn.Module, t: int, rank: int = 0) -> None:
    g = torch.Generator().manual_seed(100 * rank + t)
    model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()


def one_step(opt: RemoteOptimizer, model: torch.nn.Module, t: int, rank: int = 0) -> None:
    opt.zero_grad()
    backward(model, t, rank)
    opt.step()


def optimizer(service, model: torch.nn.Module, job: str, **options) -> RemoteOptimizer:
    return RemoteOptimizer(model.parameters(), "SGD", lr=0.1, address=service.address, job=job, timeout=T, join_timeout=T, **options)


def status(service, job: str):
    client = ServiceClient(service.address, job, timeout=T)
    try:
        return client.status()
    finally:
        client.close()


def test_the_membership_keywords_reach_the_job(service):
    job = f"options-{next(_jobs)}"
    model = make_model()
    with optimizer(service, model, job, num_workers=2, max_workers=4, min_workers=2, lease_timeout=7.5) as opt:
        config = opt.client.info.config
        assert (config.lease_timeout, config.min_workers, config.max_workers, config.num_workers) == (7.5, 2, 4, 2)
    # the defaults are written out on the job: lease_timeout 30 s, min_workers 1, max_workers absent (= num_workers)
    job = f"options-{next(_jobs)}"
    with optimizer(service, make_model(), job) as opt:
        config = opt.client.info.config
        assert config.lease_timeout == 30.0 and config.min_workers == 1 and not config.HasField("max_workers")


def test_a_rank_up_to_max_workers_is_accepted_and_beyond_it_refused(service):
    with pytest.raises(ValueError, match=r"rank must be in \[0, max_workers=3\)"):
        optimizer(service, make_model(), "never", num_workers=2, max_workers=3, rank=3)
    with pytest.raises(ValueError, match=r"rank must be in \[0, num_workers=2\)"):
        optimizer(service, make_model(), "never", num_workers=2, rank=2)


def test_renew_lease_over_the_wire(service):
    job = f"renew-{next(_jobs)}"
    model = make_model()
    with optimizer(service, model, job, lease_timeout=5.0) as opt:
        client = ServiceClient(service.address, job, timeout=T)
        try:
            assert client.renew_lease(0) == status(service, job).epoch
            with pytest.raises(ValueError):
                client.renew_lease(7)  # no such rank
            opt.leave()
            with pytest.raises(NotAMemberError, match="not a member"):
                client.renew_lease(0)  # FAILED_PRECONDITION / NOT_A_MEMBER, rebuilt as the class
        finally:
            client.close()
    other = ServiceClient(service.address, "no-such-job", timeout=T)
    try:
        with pytest.raises(LookupError):
            other.renew_lease(0)
    finally:
        other.close()


def test_lease_renewal_keeps_a_sleeping_worker_a_member(service):
    job = f"sleepy-{next(_jobs)}"
    model = make_model()
    with optimizer(service, model, job, num_workers=1, lease_timeout=1.0) as opt:
        one_step(opt, model, 0)
        time.sleep(2.5)  # a long forward/backward: 2.5 leases without a call of this worker's own
        st = status(service, job)
        assert list(st.members) == [0]
        assert not any(c.reason == "lease expired" for c in st.changes), list(st.changes)
        one_step(opt, model, 1)
        assert opt.step_count == 2
        assert opt.last_step["contributors"] == [0]


def test_without_renewals_the_lease_expires_and_the_push_is_refused(service):
    """The control of the test above: the same sleep without the renewals drops the worker; its next push is
    refused by the shards and step() raises NotAMemberError at once (no retry); rejoin() goes on."""
    job = f"expired-{next(_jobs)}"
    model = make_model()
    with optimizer(service, model, job, num_workers=1, lease_timeout=1.0) as opt:
        one_step(opt, model, 0)
        opt._stop_renewal()
        time.sleep(2.5)
        st = status(service, job)
        assert list(st.members) == []
        assert [(c.rank, c.reason, c.step) for c in st.changes][-1] == (0, "lease expired", 1)
        assert opt._not_a_member is None  # the renewals were stopped: the refusal comes from the push
        opt.zero_grad()
        backward(model, 1)
        started = time.monotonic()
        with pytest.raises(NotAMemberError):
            opt.step()
        assert time.monotonic() - started < 5.0 and opt.step_count == 1
        assert opt.rejoin() == 1
        one_step(opt, model, 1)
        assert opt.step_count == 2 and opt.last_step["contributors"] == [0]


def test_leave_is_idempotent_then_step_refuses_and_rejoin_goes_on(service):
    job = f"leave-{next(_jobs)}"
    model = make_model()
    opt = optimizer(service, model, job, num_workers=1, lease_timeout=3.0)
    try:
        one_step(opt, model, 0)
        opt.leave()
        opt.leave()  # nothing more
        assert list(status(service, job).members) == []
        assert opt._renewal is None  # no renewals after leaving
        opt.zero_grad()
        backward(model, 1)
        with pytest.raises(NotAMemberError, match="left"):
            opt.step()
        assert opt.rejoin() == 1 and opt.step_count == 1
        assert list(status(service, job).members) == [0]
        one_step(opt, model, 1)
        assert opt.step_count == 2
        reasons = [(c.rank, c.reason) for c in status(service, job).changes]
        assert (0, "left") in reasons and reasons[-1] == (0, "joined"), reasons
        opt.leave()
    finally:
        opt.close()  # after leave(): closes the channels, no error
        opt.close()


def test_a_worker_dropped_while_it_computes_gets_not_a_member_from_step(service):
    job = f"dropped-{next(_jobs)}"
    model = make_model()
    opt = optimizer(service, model, job, num_workers=1, lease_timeout=0.6)
    other = ServiceClient(service.address, job, timeout=T)
    try:
        one_step(opt, model, 0)
        other.leave(0)  # the job drops worker 0 (as an expired lease would); its renewals are refused
        deadline = time.monotonic() + T
        while opt._not_a_member is None and time.monotonic() < deadline:
            time.sleep(0.05)
        opt.zero_grad()
        backward(model, 1)
        with pytest.raises(NotAMemberError):
            opt.step()
        assert opt.step_count == 1  # nothing was applied
        assert opt.rejoin() == 1
        one_step(opt, model, 1)
        assert opt.step_count == 2
    finally:
        other.close()
        opt.close()


def test_renewal_errors_are_logged_never_raised(service, monkeypatch, caplog):
    job = f"flaky-{next(_jobs)}"
    model = make_model()
    with optimizer(service, model, job, num_workers=1, lease_timeout=0.3) as opt:
        calls = []
        real = opt.client.renew_lease

        def flaky(worker: int, timeout: float | None = None) -> int:
            calls.append(worker)
            real(worker, timeout)  # the lease is renewed, but the reply is lost
            raise ConnectionError("UNAVAILABLE: the reply was lost")

        monkeypatch.setattr(opt.client, "renew_lease", flaky)
        deadline = time.monotonic() + T
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3  # the thread goes on after an error
        assert opt._renewal is not None and opt._renewal._thread.is_alive()
        assert "could not renew its lease" in caplog.text
        monkeypatch.undo()
        assert opt._not_a_member is None
        one_step(opt, model, 0)
        assert opt.step_count == 1


def test_last_step_says_which_ranks_the_step_averaged(service):
    job = f"last-{next(_jobs)}"
    models = [make_model(), make_model()]
    opts: list[RemoteOptimizer] = []
    try:
        opts.append(optimizer(service, models[0], job, num_workers=2, rank=0))
        opts.append(optimizer(service, models[1], job, num_workers=2, rank=1))
        assert opts[0].last_step is None  # no step has closed yet
        errors: list[BaseException] = []

        def run(rank: int) -> None:
            try:
                one_step(opts[rank], models[rank], 0, rank)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=T)
        assert not any(th.is_alive() for th in threads) and not errors, errors
        for opt in opts:
            last = opt.last_step
            assert last is not None
            assert last["step"] == 0 and last["contributors"] == [0, 1] and last["skipped"] is False
            assert last["total_norm"] > 0 and last["lrs"] == [0.1]
    finally:
        for opt in opts:
            opt.close()
