"""The control lane: the step's two hot control calls between processes of one node, over a Unix socket.

Every synchronous step waits for two control calls: the report of the shard that completes the step (to the
coordinator, whose call closes it) and the coordinator's update call to each shard. As Ray actor calls between
the busy processes of the end-to-end job they took 1.6-2.2 ms each way (2 vCPUs, measured in the job), against
0.1-0.2 ms for the same message to a thread waiting on a Unix socket. The lane carries exactly those calls:
the same actor methods with the same arguments, another transport. Every other call, a peer on another node,
and a lane that broke stay on (or fall back to) Ray.

- Framing is the standard library's (``multiprocessing.connection``). A message is a pickle that may name no
  global but the service's ``Scalar`` and exception classes (``_LaneUnpickler``): plain values, as the step's
  control calls carry (``hosting/scalars.py``). A call whose arguments hold anything else is made over Ray. The
  address is in Linux's abstract socket namespace (this host only): no file to remove, and it is gone with its
  process, also after a SIGKILL.
- Both sides prove they hold the service's key (an HMAC of the other's random challenge) before anything is
  unpickled; the key is made by ``serve()`` and handed to the actors as a constructor argument.
- A server runs a call at a time per connection, each connection on its own thread; a client keeps a pool of
  connections, so calls to one peer can be under way at once.
- Every wait has a deadline. A call whose connection breaks after it was sent raises ``LaneBrokenError`` (the
  peer died: the caller treats it as Ray's actor error); one that cannot be sent is not made (``start`` returns
  None) and the caller makes it over Ray.
"""

from __future__ import annotations

import builtins
import hmac
import io
import logging
import os
import pickle
import secrets
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Collection
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from paramserver.core import errors
from paramserver.hosting.scalars import Scalar

log = logging.getLogger("paramserver")

HANDSHAKE_TIMEOUT_S = 5.0
_CHALLENGE_BYTES = 32


class LaneBrokenError(ConnectionError):
    """The lane's connection broke after the call was sent: the peer process died (or closed the lane)."""


class LaneAddress(NamedTuple):
    node_id: str  # the Ray node the listening process runs on: a lane joins processes of one node only
    name: str  # the abstract socket address (it starts with a NUL byte)


def supported() -> bool:
    """Abstract Unix socket addresses are Linux's."""
    return sys.platform.startswith("linux")


def _digest(key: bytes, challenge: bytes) -> bytes:
    return hmac.new(key, challenge, "sha256").digest()


def _recv_bytes(conn: Connection, timeout: float) -> bytes:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer on the control lane within {timeout:.1f}s")
    return conn.recv_bytes(256)


class _LaneUnpickler(pickle.Unpickler):
    """Loads plain values (numbers, strings, bytes, None, lists, tuples, dicts, sets), ``Scalar`` and exceptions
    of the builtins and of ``paramserver.core.errors``; any other global a message names is refused, so a message
    can call nothing but those classes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (Scalar.__module__, Scalar.__name__):
            return Scalar
        found = getattr(builtins if module == "builtins" else errors if module == errors.__name__ else None, name, None)
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
        raise pickle.UnpicklingError(f"a control-lane message may not name {module}.{name}")


def _loads(data: bytes) -> Any:
    return _LaneUnpickler(io.BytesIO(data)).load()


def _dumps(obj: Any) -> bytes:
    """``obj`` as a lane message; ``pickle.UnpicklingError`` if it holds what the receiver would refuse (checked
    by loading it here: the sender finds out, not the peer). Plain pickle, not ``Connection.send``'s pickler,
    which with torch.multiprocessing loaded moves a tensor's storage into shared memory."""
    data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    _loads(data)
    return data


def _recv(conn: Connection) -> Any:
    return _loads(conn.recv_bytes())


def _prove(conn: Connection, key: bytes, timeout: float) -> None:
    """Answer the peer's challenge with the key's HMAC of it."""
    conn.send_bytes(_digest(key, _recv_bytes(conn, timeout)))


def _check(conn: Connection, key: bytes, timeout: float) -> None:
    """Challenge the peer; it must answer with the key's HMAC of the challenge."""
    challenge = secrets.token_bytes(_CHALLENGE_BYTES)
    conn.send_bytes(challenge)
    if not hmac.compare_digest(_recv_bytes(conn, timeout), _digest(key, challenge)):
        raise PermissionError("a control-lane peer does not hold the service's key")


class LaneServer:
    """Serves ``target``'s ``methods`` on an abstract Unix socket of this process: ``getattr(target, m)(*args)``
    for each call, its result or exception sent back (pickled)."""

    def __init__(self, target: Any, methods: Collection[str], key: bytes, node_id: str) -> None:
        assert supported() and key, "a lane needs Linux and a key"
        self._target = target
        self._methods = frozenset(methods)
        self._key = key
        self.address = LaneAddress(node_id, f"\0paramserver-lane-{uuid.uuid4().hex}")
        self.served = 0  # calls answered (the lane is in use: status and tests read it)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.address.name)
        self._listener.listen(64)
        self._closed = threading.Event()
        self._connections: set[Connection] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="paramserver-lane-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            conn = Connection(sock.detach())
            threading.Thread(target=self._serve, args=(conn,), name="paramserver-lane", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            _check(conn, self._key, HANDSHAKE_TIMEOUT_S)
            _prove(conn, self._key, HANDSHAKE_TIMEOUT_S)
        except (OSError, EOFError, TimeoutError, PermissionError) as exc:
            log.warning("a control-lane connection was refused: %s: %s", type(exc).__name__, exc)
            conn.close()
            return
        with self._lock:
            if self._closed.is_set():
                conn.close()
                return
            self._connections.add(conn)
        try:
            while True:
                try:
                    method, args = _recv(conn)
                except (EOFError, OSError):
                    return  # the client went
                except pickle.UnpicklingError as exc:  # (a client of this service checks before it sends)
                    conn.send_bytes(_dumps((False, ValueError(f"refused: {exc}"))))
                    continue
                conn.send_bytes(_answer(method, self._call(method, args)))
        except OSError:
            return  # the client went before its answer
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def _call(self, method: str, args: tuple[Any, ...]) -> tuple[bool, Any]:
        if method not in self._methods:
            return False, ValueError(f"the control lane serves {sorted(self._methods)}, not {method!r}")
        try:
            result = (True, getattr(self._target, method)(*args))
        except Exception as exc:  # noqa: BLE001 - the caller gets it, as Ray would hand it over
            result = (False, exc)
        with self._lock:
            self.served += 1
        return result

    def close(self) -> None:
        """Stop accepting and end every connection (their callers see ``LaneBrokenError``)."""
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread (a close alone would not)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for conn in self._connections:
                # a shutdown (not a close) wakes the thread blocked reading it, which then closes it
                try:
                    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile


def _answer(method: str, answer: tuple[bool, Any]) -> bytes:
    """``answer`` as a message; an exception of another kind as a ``RuntimeError`` naming it, a result the lane
    cannot carry as a ``RuntimeError`` saying so."""
    try:
        return _dumps(answer)
    except (pickle.PicklingError, pickle.UnpicklingError, TypeError, AttributeError) as exc:
        ok, value = answer
        if not ok:
            error = RuntimeError(f"{type(value).__module__}.{type(value).__name__}: {value}")
        else:
            error = RuntimeError(f"{method}'s answer cannot be sent: {type(exc).__name__}: {exc}")
        return _dumps((False, error))


class LaneCall:
    """A call under way on a lane: ``result(timeout)`` waits for its answer."""

    def __init__(self, client: LaneClient, conn: Connection) -> None:
        self._client = client
        self._conn = conn

    def result(self, timeout: float) -> Any:
        """The call's result, or the exception the method raised; ``LaneBrokenError`` if the peer went, and
        ``TimeoutError`` after ``timeout`` seconds (the connection is dropped: a late answer cannot be mistaken
        for another call's)."""
        conn = self._conn
        try:
            answered = conn.poll(max(0.0, timeout))
            if answered:
                ok, value = _recv(conn)
        except (EOFError, OSError) as exc:
            conn.close()
            self._client.broken = True
            raise LaneBrokenError(f"the control lane's peer went during the call ({type(exc).__name__})") from None
        if not answered:
            conn.close()
            raise TimeoutError(f"no answer on the control lane within {timeout:.1f}s")
        self._client.give_back(conn)
        if not ok:
            raise value
        return value


class LaneClient:
    """Calls on one peer's ``LaneServer``. ``broken`` once a connection failed: the peer is gone (a process
    that Ray restarts listens on a new address)."""

    def __init__(self, address: LaneAddress, key: bytes) -> None:
        self.address = address
        self._key = key
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self.broken = False

    def _connect(self) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            sock.connect(self.address.name)
            sock.settimeout(None)
        except OSError:
            sock.close()
            raise
        conn = Connection(sock.detach())
        try:
            _prove(conn, self._key, HANDSHAKE_TIMEOUT_S)
            _check(conn, self._key, HANDSHAKE_TIMEOUT_S)
        except BaseException:
            conn.close()
            raise
        return conn

    def start(self, method: str, *args: Any) -> LaneCall | None:
        """Send ``method(*args)``; None if the lane cannot take it (nothing was sent: make the call another way)."""
        if self.broken:
            return None
        try:
            message = _dumps((method, args))
        except (pickle.PicklingError, pickle.UnpicklingError, TypeError, AttributeError) as exc:
            log.debug("the control lane does not carry this %s call (%s): over Ray", method, exc)
            return None
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        try:
            if conn is None:
                conn = self._connect()
            conn.send_bytes(message)
        except (OSError, EOFError, TimeoutError, PermissionError) as exc:
            if conn is not None:
                conn.close()
            self.broken = True
            log.debug("the control lane to %r is not usable: %s: %s", self.address.name, type(exc).__name__, exc)
            return None
        return LaneCall(self, conn)

    def give_back(self, conn: Connection) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


class LaneBook:
    """A process's lanes to its peer actors, found as they are needed: each peer is asked for its lane address
    once (a Ray call whose answer is picked up later, so no call waits for it); until it is known, for a peer on
    another node or without a lane, and after a lane broke (until the peer's new address is known), calls go
    over Ray. ``ask(actor)`` starts the actor's ``lane_address`` call."""

    def __init__(self, key: bytes | None, node_id: str, ask: Callable[[Any], Any], ready: Callable[[Any], Any]) -> None:
        self.key = key
        self.node_id = node_id
        self._ask = ask  # actor -> the pending answer (a Ray ObjectRef)
        self._ready = ready  # pending answer -> (True, LaneAddress | None) when answered, (False, None) before
        self._peers: dict[Any, LaneClient | Any | None] = {}  # actor -> its client, the pending answer, or None
        self._lock = threading.Lock()

    def start(self, actor: Any, method: str, *args: Any) -> LaneCall | None:
        """``method(*args)`` on ``actor`` over its lane; None where it has none (yet): make the call over Ray."""
        if self.key is None:
            return None
        client = self._client(actor)
        return None if client is None else client.start(method, *args)

    def _client(self, actor: Any) -> LaneClient | None:
        with self._lock:
            peer = self._peers.get(actor, _UNASKED)
            if isinstance(peer, LaneClient):
                if not peer.broken:
                    return peer
                peer.close()
                peer = _UNASKED  # a process that Ray restarts listens on a new address: ask again
            if peer is _UNASKED:
                try:
                    self._peers[actor] = self._ask(actor)
                except Exception as exc:  # noqa: BLE001 - over Ray meanwhile
                    log.debug("asking a peer for its control lane failed: %s", exc)
                    self._peers.pop(actor, None)
                return None
            if peer is None:
                return None  # no lane to this peer
            try:
                answered, address = self._ready(peer)
            except Exception:  # noqa: BLE001 - the peer died before it answered: ask its next process
                self._peers.pop(actor, None)
                return None
            if not answered:
                return None
            if address is None or address.node_id != self.node_id:
                self._peers[actor] = None  # no lane, or on another node
                return None
            self._peers[actor] = client = LaneClient(address, self.key)
            return client

    def close(self) -> None:
        with self._lock:
            for peer in self._peers.values():
                if isinstance(peer, LaneClient):
                    peer.close()
            self._peers.clear()


_UNASKED = object()


def ray_lane_book(key: bytes | None) -> LaneBook:
    """A ``LaneBook`` of this Ray actor process: peers are actors with a ``lane_address`` method."""
    import ray

    def ready(ref: Any) -> tuple[bool, LaneAddress | None]:
        done, _ = ray.wait([ref], timeout=0)
        return (True, ray.get(ref, timeout=HANDSHAKE_TIMEOUT_S)) if done else (False, None)  # done: no wait

    return LaneBook(key, ray.get_runtime_context().get_node_id(), lambda actor: actor.lane_address.remote(), ready)


def new_key() -> bytes | None:
    """A service's lane key (None where lanes are not supported)."""
    return os.urandom(32) if supported() else None
