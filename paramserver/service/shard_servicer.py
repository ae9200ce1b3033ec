"""The Shard service: workers push gradients and pull weights; raw chunks in, raw chunks out."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import grpc

from paramserver.service import metrics
from paramserver.service.shard_host import ShardHost
from paramserver.service.status import translate_errors
from paramserver.wire import codec
from paramserver.wire.proto.v1 import paramserver_pb2 as pb
from paramserver.wire.proto.v1 import paramserver_pb2_grpc as pb_grpc
from paramserver.wire.protocol import SHARD_SERVICE

log = logging.getLogger("paramserver")


class ShardServicer(pb_grpc.ShardServicer):
    def __init__(self, host: ShardHost, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> None:
        self.host = host
        self.chunk_bytes = chunk_bytes
        self.pool = codec.BufferPool()

    def _receive(self, request_iterator: Iterator[codec.Chunk], context: grpc.ServicerContext, check_step: bool) -> tuple[pb.ChunkHeader, list]:
        first = next(request_iterator, None)
        if first is None:
            raise ValueError("empty stream: no chunks")
        head = first.header
        if head.shard != self.host.shard_id:
            raise ValueError(f"this is shard {self.host.shard_id}, the chunks are for shard {head.shard}")
        shard = self.host.shard(head.job)
        if check_step and not shard.is_late_retry(head.worker, head.step):
            shard.check_step(head.step)  # fail a stale or future push before its bytes stream in
        layouts = shard.layouts
        assembler = codec.Assembler([layout.numel for layout in layouts], [layout.dtype for layout in layouts], allocate=self.pool.take)
        try:
            for chunk in itertools.chain([first], request_iterator):
                h = chunk.header
                if (h.job, h.worker, h.step, h.shard) != (head.job, head.worker, head.step, head.shard):
                    raise ValueError("chunks of one stream disagree on job, worker, step or shard")
                assembler.add(chunk)
            return head, assembler.result()
        except BaseException:
            self.pool.give_back([b for b in assembler.buffers if b is not None])
            raise

    @translate_errors
    def PushGradients(self, request_iterator: Iterator[codec.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        head, grads = self._receive(request_iterator, context, check_step=True)
        try:
            applied, version = self.host.push(head.job, head.worker, head.step, grads, list(head.missing_params))
        finally:
            # folded into the sum (or refused): the receive buffers can take the next push
            if not self.host.shard(head.job).holds(grads):
                self.pool.give_back(grads)
        metrics.BYTES_IN.labels(head.job, str(head.shard)).inc(sum(g.numel() * g.element_size() for g in grads))
        log.debug("job %s step %d: worker %d pushed to shard %d%s", head.job, head.step, head.worker, head.shard,
                  "" if applied else " (already applied)")
        return pb.PushReply(already_applied=not applied, version=version)

    @translate_errors
    def PushParameters(self, request_iterator: Iterator[codec.Chunk], context: grpc.ServicerContext) -> pb.PushReply:
        head, weights = self._receive(request_iterator, context, check_step=False)
        if head.worker != 0:
            raise ValueError(f"initial weights come from rank 0, not rank {head.worker}")
        try:
            self.host.initial_weights(head.job, weights)  # copied into the shard's weights
        finally:
            self.pool.give_back(weights)
        metrics.BYTES_IN.labels(head.job, str(head.shard)).inc(sum(w.numel() * w.element_size() for w in weights))
        log.info("job %s: shard %d has its initial weights", head.job, head.shard)
        return pb.PushReply(version=0)

    @translate_errors
    def PullParameters(self, request: pb.PullRequest, context: grpc.ServicerContext) -> Iterator[codec.Chunk]:
        if request.shard != self.host.shard_id:
            raise ValueError(f"this is shard {self.host.shard_id}, the pull is for shard {request.shard}")
        version, weights = self.host.pull(request.job, request.min_version, context.time_remaining())
        yield from codec.encode(weights, self.chunk_bytes, job=request.job, worker=request.worker, step=version, shard=self.host.shard_id)
        metrics.BYTES_OUT.labels(request.job, str(self.host.shard_id)).inc(sum(w.numel() * w.element_size() for w in weights))


def shard_handler(servicer: ShardServicer) -> grpc.GenericRpcHandler:
    """The Shard service with the data path's own chunk codec (wire-compatible with the generated code)."""
    return grpc.method_handlers_generic_handler(
        SHARD_SERVICE,
        {
            "PushGradients": grpc.stream_unary_rpc_method_handler(
                servicer.PushGradients, request_deserializer=codec.decode_chunk, response_serializer=pb.PushReply.SerializeToString
            ),
            "PushParameters": grpc.stream_unary_rpc_method_handler(
                servicer.PushParameters, request_deserializer=codec.decode_chunk, response_serializer=pb.PushReply.SerializeToString
            ),
            "PullParameters": grpc.unary_stream_rpc_method_handler(
                servicer.PullParameters, request_deserializer=pb.PullRequest.FromString, response_serializer=codec.encode_chunk
            ),
        },
    )
