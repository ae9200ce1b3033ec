"""Names both ends of the wire agree on: service names, metadata keys, default limits."""

from __future__ import annotations

from paramserver.core.config import DEFAULT_MAX_MESSAGE_BYTES
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

SHARD_SERVICE = pb.DESCRIPTOR.services_by_name["Shard"].full_name
# The metadata key that names the shard of a Shard call made to the front door, which relays it (service/relay.py).
SHARD_METADATA_KEY = "x-paramserver-shard"
COORDINATOR_SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"].full_name

# Trailing metadata of a stale or future step: the server's version.
VERSION_METADATA_KEY = "ps-version"

__all__ = ["COORDINATOR_SERVICE", "DEFAULT_MAX_MESSAGE_BYTES", "SHARD_METADATA_KEY", "SHARD_SERVICE", "VERSION_METADATA_KEY"]
