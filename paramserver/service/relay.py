"""The front door's relay of the Shard service, for workers that can reach only the front door.

A call to ``/paramserver.v1.Shard/<Method>`` on the coordinator's server names its shard in the metadata
``x-paramserver-shard: <j>``; the relay forwards it to shard j's current address (read at every call: on Ray a
takeover moves a shard) and forwards the answer back. Messages pass as raw bytes, never decoded nor re-encoded:
the handlers' (de)serializers are the identity. The caller's deadline and token go along; the shard's status
(code, details, trailing metadata with the rich status) comes back unchanged.

Shared memory needs the worker on the shard's host, which a relayed worker is not: AttachSharedMemory through
the relay is refused (FAILED_PRECONDITION), so the worker keeps to gRPC chunks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from paramserver.core.config import TLSConfig
from paramserver.service.status import rpc_status
from paramserver.wire.protocol import SHARD_METADATA_KEY, SHARD_SERVICE

log = logging.getLogger("paramserver")

STREAM_UNARY = ("PushGradients", "PushParameters")
UNARY_STREAM = ("PullParameters",)
UNARY_UNARY = ("PushShared", "PullShared", "DetachSharedMemory")
REFUSED = ("AttachSharedMemory",)
# Call metadata the relay passes on to the shard (the shard checks the same token as the front door).
FORWARDED_METADATA = ("authorization",)
STALE_GRACE_S = 30.0  # how long calls on the channel of a shard's old address may go on
NO_SHARED_MEMORY = "shared memory is not available through the front door's relay: this worker moves its bytes as gRPC chunks"


class ShardRelay:
    """Forwards Shard calls to ``addresses()[j]``; one ``grpc.aio`` channel per shard address, made on the
    server's event loop at the first call to it. ``options``: the channels' arguments (message limits)."""

    def __init__(self, addresses: Callable[[], Sequence[str]], options: Sequence[tuple[str, Any]] = (), tls: TLSConfig | None = None) -> None:
        self._addresses = addresses
        self._options = list(options)
        self._tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()

    # -- where a call goes -----------------------------------------------------------------------------------

    def _channel(self, address: str, addresses: Sequence[str]) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            self._drop_stale(addresses)
            if self._tls is not None:
                # the shards serve the front door's certificate: the relay trusts its CA (with mTLS, client_ca,
                # which signs the service's certificates; else the certificate itself, as a self-signed one)
                # and, with mTLS, shows that certificate as its client certificate
                mtls = self._tls.client_ca is not None
                creds = grpc.ssl_channel_credentials(self._tls.client_ca or self._tls.certificate_chain,
                                                     self._tls.private_key if mtls else None, self._tls.certificate_chain if mtls else None)
                channel = grpc.aio.secure_channel(address, creds, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            self._channels[address] = channel
        return channel

    def _drop_stale(self, addresses: Sequence[str]) -> None:
        """Close the channels of addresses no shard has any more (a shard moved); calls on them may finish."""
        for address in [a for a in self._channels if a not in addresses]:
            channel = self._channels.pop(address)
            task = asyncio.get_running_loop().create_task(channel.close(grace=STALE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _target(self, method: str, context: grpc.aio.ServicerContext) -> tuple[grpc.aio.Channel, dict[str, Any]]:
        """The channel of the shard the call names and the call's options (deadline, forwarded metadata)."""
        metadata = dict(context.invocation_metadata() or ())
        addresses = self._addresses()
        given = metadata.get(SHARD_METADATA_KEY)
        try:
            shard = int(given)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            shard = -1
        if not 0 <= shard < len(addresses):
            await _abort(context, rpc_status(ValueError(
                f"a Shard call to the front door names its shard in the metadata {SHARD_METADATA_KEY!r} "
                f"(0..{len(addresses) - 1}); got {given!r}")))
        forwarded = tuple((k, v) for k, v in metadata.items() if k in FORWARDED_METADATA)
        remaining = context.time_remaining()
        log.debug("relay: %s to shard %d at %s", method, shard, addresses[shard])
        return self._channel(addresses[shard], addresses), {"timeout": remaining, "metadata": forwarded}

    # -- the handlers ----------------------------------------------------------------------------------------

    def _stream_unary(self, method: str) -> Callable[..., Any]:
        path = f"/{SHARD_SERVICE}/{method}"

        async def forward(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            channel, options = await self._target(method, context)
            try:
                return await channel.stream_unary(path)(request_iterator, **options)
            except grpc.aio.AioRpcError as exc:
                await _abort_with(context, exc)
                raise  # not reached: abort raises

        return forward

    def _unary_stream(self, method: str) -> Callable[..., Any]:
        path = f"/{SHARD_SERVICE}/{method}"

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            channel, options = await self._target(method, context)
            call = channel.unary_stream(path)(request, **options)
            try:
                async for message in call:
                    yield message
            except grpc.aio.AioRpcError as exc:
                await _abort_with(context, exc)

        return forward

    def _unary_unary(self, method: str) -> Callable[..., Any]:
        path = f"/{SHARD_SERVICE}/{method}"

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            channel, options = await self._target(method, context)
            try:
                return await channel.unary_unary(path)(request, **options)
            except grpc.aio.AioRpcError as exc:
                await _abort_with(context, exc)
                raise

        return forward

    @staticmethod
    async def _refuse(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION, NO_SHARED_MEMORY)
        raise AssertionError("not reached")

    def handler(self) -> grpc.GenericRpcHandler:
        """The Shard service's methods, each forwarded as bytes (no (de)serializer: gRPC hands the raw bytes)."""
        methods = {
            **{m: grpc.stream_unary_rpc_method_handler(self._stream_unary(m)) for m in STREAM_UNARY},
            **{m: grpc.unary_stream_rpc_method_handler(self._unary_stream(m)) for m in UNARY_STREAM},
            **{m: grpc.unary_unary_rpc_method_handler(self._unary_unary(m)) for m in UNARY_UNARY},
            **{m: grpc.unary_unary_rpc_method_handler(self._refuse) for m in REFUSED},
        }
        return grpc.method_handlers_generic_handler(SHARD_SERVICE, methods)

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


async def _abort(context: grpc.aio.ServicerContext, status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _abort_with(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError) -> None:
    """End the relayed call as the shard ended it: same code, details and trailing metadata (rich status)."""
    await context.abort(exc.code(), exc.details() or "", tuple(exc.trailing_metadata() or ()))
