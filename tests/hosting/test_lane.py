"""The control lane (``paramserver.hosting.lane``) without Ray: calls, errors, deadlines, a peer killed mid-call,
keys, and the book that finds a peer's lane. The Ray suites run the real thing (lanes are on by default)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from paramserver.core.errors import StaleStepError
from paramserver.hosting import lane
from paramserver.hosting.lane import LaneAddress, LaneBook, LaneBrokenError, LaneClient, LaneServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(not lane.supported(), reason="abstract Unix sockets are Linux's")]

KEY = b"k" * 32
NODE = "node-a"


class PeerError(Exception):
    """An exception class the lane does not carry (not a builtin's, not the service's)."""


class Target:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.gate = threading.Event()

    def apply(self, name: str, step: int, extra: dict | None = None) -> tuple[str, int]:
        self.calls.append((name, step, extra))
        return name, step + 1

    def stale(self, step: int) -> None:
        raise StaleStepError(f"step {step} has already closed", step + 1)

    def wait_gate(self, value: int) -> int:
        assert self.gate.wait(10), "the test never opened the gate"
        return value

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def secret(self) -> str:
        return "not served"

    def unpicklable(self):
        return lambda: None

    def peer_error(self):
        raise PeerError("the peer's own error")


@pytest.fixture
def served():
    target = Target()
    server = LaneServer(target, ("apply", "stale", "wait_gate", "sleep", "unpicklable", "peer_error"), KEY, NODE)
    yield target, server
    server.close()


def test_a_call_runs_the_method_and_returns_its_result(served):
    target, server = served
    client = LaneClient(server.address, KEY)
    call = client.start("apply", "job", 3, {"lr": 0.1})
    assert call is not None
    assert call.result(5) == ("job", 4)
    assert client.start("apply", "job", 4).result(5) == ("job", 5)  # the connection is used again
    assert target.calls == [("job", 3, {"lr": 0.1}), ("job", 4, None)]
    assert server.served == 2
    client.close()


def test_a_call_whose_arguments_hold_more_than_plain_values_is_not_sent_and_goes_elsewhere(served):
    """A tensor (or any object but a ``Scalar``) is not carried: ``start`` returns None and nothing reaches the
    peer (the caller makes the call over Ray); the lane goes on. ``Scalar`` is what the step's calls carry."""
    import torch

    from paramserver.hosting.scalars import Scalar

    target, server = served
    client = LaneClient(server.address, KEY)
    assert client.start("apply", "job", 1, {"coef": torch.tensor(0.5)}) is None
    assert client.start("apply", "job", 1, {"where": LaneAddress(NODE, "x")}) is None
    assert not client.broken and target.calls == []
    assert client.start("apply", "job", 1, {"coef": Scalar(0.5, "float32")}).result(5) == ("job", 2)
    assert target.calls == [("job", 1, {"coef": Scalar(0.5, "float32")})]


def test_a_message_naming_any_other_global_is_refused_unloaded(served, tmp_path):
    """An authenticated peer that sends a pickle naming a function (here one that would write a file) gets a
    refusal; nothing is called."""
    import pickle

    target, server = served
    marker = tmp_path / "ran"
    conn = LaneClient(server.address, KEY)._connect()  # noqa: SLF001 - a connection past the client's own check
    try:
        conn.send_bytes(pickle.dumps(("apply", (open, (str(marker), "w")))))
        ok, error = pickle.loads(conn.recv_bytes())
    finally:
        conn.close()
    assert not ok and isinstance(error, ValueError) and "may not name io.open" in str(error)
    assert not marker.exists() and target.calls == []


def test_an_exception_of_another_kind_comes_back_as_a_runtime_error_naming_it(served):
    _, server = served
    client = LaneClient(server.address, KEY)
    with pytest.raises(RuntimeError, match=r"test_lane\.PeerError: the peer's own error"):
        client.start("peer_error").result(5)
    assert client.start("apply", "job", 0).result(5) == ("job", 1)


def test_the_methods_exception_reaches_the_caller_with_its_type_and_fields(served):
    _, server = served
    client = LaneClient(server.address, KEY)
    with pytest.raises(StaleStepError, match="step 7 has already closed") as caught:
        client.start("stale", 7).result(5)
    assert caught.value.version == 8
    assert client.start("apply", "job", 0).result(5) == ("job", 1)  # the lane goes on


def test_an_answer_that_cannot_be_pickled_is_an_error_and_the_lane_goes_on(served):
    _, server = served
    client = LaneClient(server.address, KEY)
    with pytest.raises(RuntimeError, match="unpicklable's answer cannot be sent"):
        client.start("unpicklable").result(5)
    assert client.start("apply", "job", 0).result(5) == ("job", 1)


@pytest.mark.parametrize("method", ["secret", "__init__", "no_such_method"])
def test_a_method_the_lane_does_not_serve_is_refused_and_not_called(served, method):
    target, server = served
    with pytest.raises(ValueError, match=f"not '{method}'"):
        LaneClient(server.address, KEY).start(method).result(5)
    assert target.calls == []


def test_a_client_with_another_key_is_refused_before_any_call(served, caplog):
    target, server = served
    client = LaneClient(server.address, b"x" * 32)
    assert client.start("apply", "job", 0) is None
    assert client.broken
    assert target.calls == [] and server.served == 0
    deadline = time.monotonic() + 5
    while "refused" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "does not hold the service's key" in caplog.text


def test_a_server_with_another_key_gets_no_call(served):
    """The client checks the server too: a process listening on the address without the key is not called."""
    target, server = served
    impostor = LaneServer(target, ("apply",), b"x" * 32, NODE)
    try:
        assert LaneClient(impostor.address, KEY).start("apply", "job", 0) is None
        assert target.calls == []
    finally:
        impostor.close()


def test_calls_to_one_peer_can_be_under_way_at_once(served):
    target, server = served
    client = LaneClient(server.address, KEY)
    first, second = client.start("wait_gate", 1), client.start("wait_gate", 2)
    assert first is not None and second is not None
    target.gate.set()
    assert (second.result(5), first.result(5)) == (2, 1)


def test_a_call_past_its_deadline_raises_timeout_and_the_next_call_works(served):
    _, server = served
    client = LaneClient(server.address, KEY)
    call = client.start("sleep", 1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call.result(0.2)
    assert time.monotonic() - started < 0.9
    assert client.start("apply", "job", 1).result(5) == ("job", 2)  # on a fresh connection: no late answer mixed in


def test_a_peer_that_never_answers_the_handshake_costs_one_deadline(monkeypatch):
    monkeypatch.setattr(lane, "HANDSHAKE_TIMEOUT_S", 0.3)
    name = f"\0paramserver-test-mute-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(name)
        mute.listen(1)
        started = time.monotonic()
        assert LaneClient(LaneAddress(NODE, name), KEY).start("apply", "job", 0) is None
        assert time.monotonic() - started < 2


def test_a_client_stuck_in_the_handshake_does_not_hold_other_clients(served):
    _, server = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck:
        stuck.connect(server.address.name)  # says nothing
        assert LaneClient(server.address, KEY).start("apply", "job", 0).result(5) == ("job", 1)


def test_no_address_is_not_a_lane():
    assert LaneClient(LaneAddress(NODE, f"\0paramserver-test-nobody-{os.getpid()}"), KEY).start("apply") is None


_SERVER_PROCESS = """
import sys, time
from paramserver.hosting.lane import LaneServer
class Target:
    def sleep(self, seconds):
        time.sleep(seconds)
server = LaneServer(Target(), ("sleep",), b"k" * 32, "node-a")
print(server.address.name[1:], flush=True)
time.sleep(60)
"""


def test_a_peer_killed_during_a_call_is_a_broken_lane_and_later_calls_go_elsewhere():
    process = subprocess.Popen([sys.executable, "-c", _SERVER_PROCESS], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        name = "\0" + process.stdout.readline().strip()
        client = LaneClient(LaneAddress(NODE, name), KEY)
        call = client.start("sleep", 30)
        assert call is not None
        time.sleep(0.2)
        os.kill(process.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(LaneBrokenError):
            call.result(20)
        assert time.monotonic() - started < 5
        assert client.broken
        assert client.start("sleep", 0) is None  # not sent: the caller makes it over Ray
    finally:
        process.kill()
        process.wait(10)


def test_a_closed_server_breaks_its_lanes(served):
    _, server = served
    client = LaneClient(server.address, KEY)
    call = client.start("sleep", 2)
    time.sleep(0.1)
    server.close()
    with pytest.raises(LaneBrokenError):
        call.result(5)
    assert client.start("apply", "job", 0) is None


class Peers:
    """A stand-in for Ray in the book: each actor answers its lane address when the test says so."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answers: dict[str, LaneAddress | None | Exception] = {}

    def ask(self, actor: str) -> str:
        self.asked.append(actor)
        return actor

    def ready(self, actor: str):
        if actor not in self.answers:
            return False, None
        answer = self.answers[actor]
        if isinstance(answer, Exception):
            raise answer
        return True, answer


def test_the_book_uses_a_peers_lane_once_it_answered_and_asks_again_after_the_lane_broke(served):
    _, server = served
    peers = Peers()
    book = LaneBook(KEY, NODE, peers.ask, peers.ready)
    assert book.start("shard0", "apply", "job", 0) is None  # asked: over Ray meanwhile
    assert book.start("shard0", "apply", "job", 0) is None  # no answer yet
    assert peers.asked == ["shard0"]
    peers.answers["shard0"] = server.address
    assert book.start("shard0", "apply", "job", 0).result(5) == ("job", 1)
    server.close()  # the process went: Ray restarts it with a new lane
    assert book.start("shard0", "apply", "job", 1) is None
    assert book.start("shard0", "apply", "job", 1) is None
    assert peers.asked == ["shard0", "shard0"]


def test_the_book_keeps_peers_on_another_node_or_without_a_lane_on_ray(served):
    _, server = served
    peers = Peers()
    book = LaneBook(KEY, NODE, peers.ask, peers.ready)
    peers.answers = {"far": LaneAddress("node-b", server.address.name), "plain": None}
    for actor in ("far", "plain"):
        for _ in range(3):
            assert book.start(actor, "apply", "job", 0) is None
    assert sorted(peers.asked) == ["far", "plain"]  # asked once each


def test_the_book_asks_a_peer_again_that_died_before_it_answered():
    peers = Peers()
    book = LaneBook(KEY, NODE, peers.ask, peers.ready)
    book.start("shard0", "apply")
    peers.answers["shard0"] = RuntimeError("the actor died")
    assert book.start("shard0", "apply") is None
    book.start("shard0", "apply")
    assert peers.asked == ["shard0", "shard0"]


def test_without_a_key_the_book_has_no_lanes():
    peers = Peers()
    assert LaneBook(None, NODE, peers.ask, peers.ready).start("shard0", "apply") is None
    assert peers.asked == []


# -- the lane in the control plane's calls (hosting/replicas.py, hosting/actors.py), without a cluster -----------


class ShardTarget:
    """What a shard process serves on its lane: ``apply`` (here: records it, or dies in it)."""

    def __init__(self, server_box: list, die: bool = False, hang_s: float = 0.0) -> None:
        self.applied: list[tuple] = []
        self.server_box = server_box
        self.die = die
        self.hang_s = hang_s

    def apply(self, name: str, step: int, *scalars) -> str:
        time.sleep(self.hang_s)
        if self.die:
            self.server_box[0].close()  # the process goes during the update
            time.sleep(0.5)
        self.applied.append((name, step))
        return f"applied {step}"


def _lane_to(target_cls_args: dict) -> tuple[LaneServer, ShardTarget]:
    box: list = []
    target = ShardTarget(box, **target_cls_args)
    server = LaneServer(target, ("apply",), KEY, NODE)
    box.append(server)
    return server, target


def _fleet(primary: LaneServer, standby: LaneServer | None, standby_timeout: float = 30.0):
    from paramserver.hosting.replicas import RayFleet

    actors = {"primary": primary.address, "standby": None if standby is None else standby.address}
    book = LaneBook(KEY, NODE, lambda actor: actor, lambda actor: (True, actors[actor]))
    fleet = RayFleet(["primary"], ["standby" if standby is not None else None], lanes=book, standby_timeout=standby_timeout)
    for actor in ("primary", "standby"):
        book.start(actor, "apply")  # looked up: the next call takes the lane
    if standby is not None:
        fleet.in_sync.add((0, "job"))
    return fleet


def _not_over_ray(actor):
    raise AssertionError(f"the call to {actor} went over Ray, not its lane")


def test_a_write_takes_both_replicas_lanes_and_a_primary_that_dies_in_it_leaves_the_standbys_result():
    from paramserver.hosting.replicas import ActorShard

    primary, _ = _lane_to({"die": True})
    standby, standby_target = _lane_to({})
    fleet = _fleet(primary, standby)
    try:
        shard = ActorShard(fleet, 0, "job")
        assert shard._write(_not_over_ray, lane=("apply", ("job", 3))) == "applied 3"  # the standby's
        assert standby_target.applied == [("job", 3)]
        assert (0, "job") in fleet.in_sync
    finally:
        fleet.close()
        standby.close()


def test_a_write_whose_only_replica_dies_in_it_is_a_lost_shard():
    from paramserver.core.errors import ShardLostError
    from paramserver.hosting.replicas import ActorShard

    primary, _ = _lane_to({"die": True})
    fleet = _fleet(primary, None)
    try:
        with pytest.raises(ShardLostError, match="shard 0's process died"):
            ActorShard(fleet, 0, "job")._write(_not_over_ray, lane=("apply", ("job", 3)))
    finally:
        fleet.close()


def test_a_standby_whose_lane_breaks_in_a_write_falls_out_of_sync_and_the_primarys_result_stands():
    from paramserver.hosting.replicas import ActorShard

    primary, primary_target = _lane_to({})
    standby, _ = _lane_to({"die": True})
    fleet = _fleet(primary, standby)
    try:
        assert ActorShard(fleet, 0, "job")._write(_not_over_ray, lane=("apply", ("job", 1))) == "applied 1"
        assert primary_target.applied == [("job", 1)]
        assert (0, "job") not in fleet.in_sync  # it is rebuilt from the primary
    finally:
        fleet.close()
        primary.close()


def test_a_write_waits_for_a_hung_standby_only_standby_timeout_beyond_its_primary():
    from paramserver.hosting.replicas import ActorShard

    primary, primary_target = _lane_to({})
    standby, _ = _lane_to({"hang_s": 3.0})
    fleet = _fleet(primary, standby, standby_timeout=0.3)
    try:
        started = time.monotonic()
        assert ActorShard(fleet, 0, "job")._write(_not_over_ray, lane=("apply", ("job", 1))) == "applied 1"
        assert time.monotonic() - started < 2.0
        assert (0, "job") not in fleet.in_sync  # the steps go on without it; it is rebuilt once it answers
        assert primary_target.applied == [("job", 1)]
    finally:
        fleet.close()
        primary.close()
        standby.close()


def test_a_standby_whose_primary_died_gets_the_whole_deadline():
    from paramserver.hosting.replicas import ActorShard

    primary, _ = _lane_to({"die": True})
    standby, _ = _lane_to({"hang_s": 1.0})
    fleet = _fleet(primary, standby, standby_timeout=0.1)
    try:
        assert ActorShard(fleet, 0, "job")._write(_not_over_ray, lane=("apply", ("job", 2))) == "applied 2"
        assert (0, "job") in fleet.in_sync
    finally:
        fleet.close()
        standby.close()


class Coordinator:
    def __init__(self, error: Exception | None = None, server_box: list | None = None) -> None:
        self.reports: list[tuple] = []
        self.error = error
        self.server_box = server_box

    def shard_ready(self, name, shard, step, generation, holds, reduced) -> None:
        if self.server_box:
            self.server_box[0].close()
            time.sleep(0.5)
        self.reports.append((name, shard, step))
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("case", ["closes", "closed already", "dies"])
def test_a_shards_report_over_the_coordinators_lane(case, caplog):
    from paramserver.hosting.actors import RemoteCoordinator

    box: list = []
    coordinator = Coordinator(StaleStepError("step 2 has already closed", 3) if case == "closed already" else None, box if case == "dies" else None)
    server = LaneServer(coordinator, ("shard_ready",), KEY, NODE)
    box.append(server)
    book = LaneBook(KEY, NODE, lambda actor: actor, lambda actor: (True, server.address))
    book.start("coordinator", "shard_ready")  # looked up
    try:
        RemoteCoordinator("coordinator", "job", book).shard_ready(1, 2, 0, frozenset({0, 1}), None)  # returns in each case
        if case == "dies":
            assert "step 2's report did not reach the coordinator (its control lane broke)" in caplog.text
        else:
            assert coordinator.reports == [("job", 1, 2)]
    finally:
        server.close()
        book.close()
