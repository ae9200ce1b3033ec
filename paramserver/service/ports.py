"""Picking a port to bind later: for an address that must stay the same across restarts (the coordinator on
Ray) and for tests of fixed shard ports.

``bind(0)`` hands out a port from the ephemeral range, where any outgoing connection of the machine (Ray's,
gRPC's) may take it between the pick and the bind, or before a restart binds it again. Ports below that range
are taken only by a listener that asks for the number, so they are drawn from there."""

from __future__ import annotations

import random
import socket

LOWEST_PORT = 20000  # Ray's worker processes listen on 10002-19999 by default (min/max_worker_port)
LINUX_EPHEMERAL_START = 32768  # Linux's default, where /proc does not say


def ephemeral_start() -> int:
    """The first port of this machine's ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            return int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return LINUX_EPHEMERAL_START


def _is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        try:
            sock.bind((host or "0.0.0.0", port))
            return True
        except OSError:
            return False


def free_port_base(host: str = "127.0.0.1", span: int = 1, attempts: int = 200) -> int:
    """A port on ``host`` with ``span`` consecutive ports from it free now, below the ephemeral range."""
    top = ephemeral_start() - span
    if top <= LOWEST_PORT:
        raise RuntimeError(f"the ephemeral range starts at {top + span}: no room below it for a fixed port")
    for _ in range(attempts):
        base = random.randrange(LOWEST_PORT, top)
        if all(_is_free(host, base + i) for i in range(span)):
            return base
    raise RuntimeError(f"no {span} consecutive free ports on {host} in {attempts} attempts")
