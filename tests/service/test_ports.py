"""Picking a port to bind later (paramserver.service.ports): below the ephemeral range, free, ``span`` in a row."""

from __future__ import annotations

import socket

import pytest

from paramserver.service import ports


def test_a_picked_base_lies_below_the_ephemeral_range_with_its_span_free():
    for span in (1, 2, 4):
        base = ports.free_port_base(span=span)
        assert ports.LOWEST_PORT <= base and base + span <= ports.ephemeral_start()
        for port in range(base, base + span):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port))  # raises if taken


def test_a_taken_port_is_never_picked(monkeypatch):
    free = ports.free_port_base()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        draws = iter([taken, free])  # the first draw is taken; the second is what comes back
        monkeypatch.setattr(ports, "ephemeral_start", lambda: 65535)
        monkeypatch.setattr(ports.random, "randrange", lambda low, high: next(draws))
        assert ports.free_port_base() == free


def test_no_room_below_the_ephemeral_range_is_an_error(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_start", lambda: ports.LOWEST_PORT + 1)
    with pytest.raises(RuntimeError, match="no room"):
        ports.free_port_base(span=2)


def test_the_ephemeral_start_is_read_from_the_kernel():
    start = ports.ephemeral_start()
    assert 1024 <= start <= 65535
