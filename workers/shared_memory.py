"""A worker's side of the shared-memory data plane: the segments a shard on this host handed it, mapped.

``attach`` asks one shard for segments; it gets them only when the shard's host identity is this process's
(a hint), and the attachment counts only once the segments actually open here (the proof). Otherwise the
worker keeps to gRPC chunks for that shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paramserver.dataplane.segments import Segment, layout_offsets
from paramserver.wire.proto.v1 import paramserver_pb2 as pb


@dataclass
class SharedShard:
    """One shard's buffers in shared memory: ``grads`` this worker writes and the shard reduces from,
    ``weights`` the shard's weights once a pull returns (``weights_shared``: the job's live weights, the same
    memory for every worker of this host; else this worker's own copy)."""

    grads: list[torch.Tensor]
    weights: list[torch.Tensor]
    weights_shared: bool


def open_attachment(reply: pb.AttachReply, sizes: list[tuple[int, torch.dtype]]) -> SharedShard:
    """Map the segments of an attach reply, laid out as ``sizes`` (the shard's flat buffers). ``OSError`` when
    they cannot be opened here (another host or container after all); ``ValueError`` when the reply's layout
    is not the one this worker computes from the job's plan."""
    offsets, size = layout_offsets(sizes)
    if list(reply.offsets) != offsets or reply.size != size:
        raise ValueError(f"the shard's shared-memory layout {list(reply.offsets)} ({reply.size} bytes) is not the plan's {offsets} ({size} bytes)")
    grads = Segment.open(reply.grads_segment, size, claim=True)
    weights = Segment.open(reply.weights_segment, size, claim=not reply.weights_shared)
    return SharedShard(grads.tensors(sizes), weights.tensors(sizes), reply.weights_shared)
