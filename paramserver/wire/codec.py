"""Codec: tensors to wire chunks and back; the only place that knows the byte layout.

A shard's flat buffer travels as raw little-endian bytes cut into chunks of at most ``chunk_bytes``; each
chunk's header says which buffer, its dtype, the element offset and the buffer's total length, so a
receiver checks every chunk against what it expects before a byte lands in its preallocated buffer.
A chunk carries the buffer's own dtype (a job's ``grad_dtype`` for the gradients of its floating-point
buffers: ``gradient_dtypes``); nothing is converted on receipt. A shard without buffers (it holds no
parameter) sends and takes exactly one header-only chunk, which carries the stream's header. The rules are
written for clients in protos/PROTOCOL.md.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from paramserver.core.config import DEFAULT_CHUNK_BYTES  # the tree's default; re-exported for the wire's users
from paramserver.wire.proto.v1 import paramserver_pb2 as pb

assert sys.byteorder == "little", "the wire format is little-endian and so must this host be"


DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    # integer and boolean tensors appear in some optimizer and scheduler states, never as gradients
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype} cannot travel on the wire (supported: {', '.join(DTYPES)})")
    return DTYPE_NAMES[dtype]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


def gradient_dtypes(buffer_dtypes: Sequence[torch.dtype], grad_dtype: torch.dtype | None) -> list[torch.dtype]:
    """The dtype the gradient chunks of each buffer carry: the job's ``grad_dtype`` for a real floating-point
    buffer when the job sets one, else the buffer's own (complex buffers always travel as themselves)."""
    return [grad_dtype if grad_dtype is not None and d.is_floating_point else d for d in buffer_dtypes]


def is_header_only(chunk: Chunk | pb.TensorChunk) -> bool:
    """The one chunk of a stream for a shard without buffers: no payload, buffer 0, offset 0, total 0, no dtype."""
    h = chunk.header
    return not len(chunk.data) and (h.buffer, h.offset, h.total, h.dtype) == (0, 0, 0, "")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


class Chunk(NamedTuple):
    """A ``TensorChunk`` as the data path holds it: the header, and the payload as a view (no copy)."""

    header: pb.ChunkHeader
    data: memoryview | bytes
    malformed: str | None = None  # why the bytes were not a TensorChunk (reported by the receiver)


# The data path encodes and decodes TensorChunk by hand: the same bytes the generated code writes and
# reads (field 1: the header, field 2: the payload), but the payload is copied once when sent and never
# when received, where the generated code would copy it two or three times.
_HEADER_TAG, _DATA_TAG = b"\x0a", b"\x12"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(view: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(view) or shift > 63:
            raise ValueError("truncated varint")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_chunk(chunk: Chunk | pb.TensorChunk) -> bytes:
    """gRPC request/response serializer of the data path."""
    header = chunk.header.SerializeToString()
    data = chunk.data
    return b"".join((_HEADER_TAG, _varint(len(header)), header, _DATA_TAG, _varint(len(data)), data))


def decode_chunk(message: bytes) -> Chunk:
    """gRPC deserializer of the data path; never raises (gRPC would answer INTERNAL): a malformed message
    comes back marked, and the receiver refuses it with INVALID_ARGUMENT."""
    view = memoryview(message)
    header, data, pos = pb.ChunkHeader(), view[0:0], 0
    try:
        while pos < len(view):
            key, pos = _read_varint(view, pos)
            field, wire_type = key >> 3, key & 7
            if wire_type == 2:
                length, pos = _read_varint(view, pos)
                if pos + length > len(view):
                    raise ValueError("truncated field")
                value = view[pos : pos + length]
                pos += length
                if field == 1:
                    header = pb.ChunkHeader.FromString(value.tobytes())
                elif field == 2:
                    data = value
            elif wire_type == 0:
                _, pos = _read_varint(view, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            else:
                raise ValueError(f"wire type {wire_type}")
        if pos != len(view):
            raise ValueError("truncated message")
    except Exception as exc:  # noqa: BLE001 - any parse failure is reported, not raised, see above
        return Chunk(pb.ChunkHeader(), b"", f"malformed TensorChunk: {exc}")
    return Chunk(header, data)


def encode(buffers: Sequence[torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES, **header: object) -> Iterator[Chunk]:
    """Chunks of ``buffers`` (1-D tensors), each with a header made of ``header`` plus its place. The
    payloads are views of the buffers: they must not change until the chunks are sent."""
    if not buffers:
        # A shard may hold no parameter (more shards than tensors): its stream is one header-only chunk, which
        # names the push (job, worker, step, shard, generation) or the pulled version and generation.
        yield Chunk(pb.ChunkHeader(**header), b"")
        return
    for index, buf in enumerate(buffers):
        raw = _raw_bytes(buf)
        itemsize = buf.element_size()
        step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
        dtype = dtype_name(buf.dtype)
        total = buf.numel()
        for start in range(0, max(len(raw), 1), step):
            yield Chunk(pb.ChunkHeader(buffer=index, dtype=dtype, offset=start // itemsize, total=total, **header), raw[start : start + step])


class Assembler:
    """Receives the chunks of a set of flat buffers, checking each chunk, into ``destinations`` (the
    receiver's own buffers) or into buffers from ``allocate``. Every chunk of buffer i must carry
    ``wire_dtypes[i]`` (default: ``dtypes[i]``, the buffer's own; ``gradient_dtypes`` for gradients under a
    job's ``grad_dtype``): a chunk of another dtype is refused, never converted. Without buffers, the stream is
    exactly one header-only chunk."""

    def __init__(
        self,
        numels: Sequence[int],
        dtypes: Sequence[torch.dtype],
        destinations: Sequence[torch.Tensor] | None = None,
        allocate: Callable[[int, torch.dtype], torch.Tensor] | None = None,
        wire_dtypes: Sequence[torch.dtype] | None = None,
    ) -> None:
        self.numels = list(numels)
        self.dtypes = list(dtypes)
        self.wire_dtypes = list(self.dtypes if wire_dtypes is None else wire_dtypes)
        if len(self.dtypes) != len(self.numels) or len(self.wire_dtypes) != len(self.numels):
            raise ValueError(f"{len(self.numels)} buffers, but {len(self.dtypes)} dtypes and {len(self.wire_dtypes)} wire dtypes")
        self.buffers: list[torch.Tensor | None] = list(destinations) if destinations is not None else [None] * len(numels)
        for i, buf in enumerate(self.buffers):
            if buf is not None and buf.dtype != self.wire_dtypes[i]:
                raise ValueError(f"buffer {i}: destination of {buf.dtype} for chunks of {dtype_name(self.wire_dtypes[i])}")
        self.received = [0] * len(numels)
        self.header_only = False  # the one chunk of a stream without buffers came
        self._allocate = allocate or (lambda numel, dtype: torch.empty(numel, dtype=dtype))

    def describe(self) -> str:
        """The buffers, as an error names them: "0 (float32, 12 elements), 1 (float64, 2 elements)"."""
        if not self.numels:
            return "none (this shard holds no parameter: its stream is one header-only chunk)"
        return ", ".join(f"{i} ({dtype_name(d)}, {n} elements)" for i, (d, n) in enumerate(zip(self.dtypes, self.numels)))

    def add(self, chunk: Chunk | pb.TensorChunk) -> None:
        if getattr(chunk, "malformed", None):
            raise ValueError(chunk.malformed)
        h = chunk.header
        if not self.numels and is_header_only(chunk):
            if self.header_only:
                raise ValueError("this shard holds no parameter: its stream is exactly one header-only chunk, not two")
            self.header_only = True
            return
        if h.buffer >= len(self.numels):
            raise ValueError(f"chunk for buffer {h.buffer}, but there are only {len(self.numels)} buffers: {self.describe()}")
        expected = self.numels[h.buffer]
        if h.total != expected:
            raise ValueError(f"buffer {h.buffer} has {expected} elements, the chunk says {h.total}")
        dtype = parse_dtype(h.dtype)
        if not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"buffer {h.buffer}: dtype {h.dtype} is not floating point")
        want = self.wire_dtypes[h.buffer]
        if dtype != want:
            own = self.dtypes[h.buffer]
            why = "" if want == own else f" (the job's grad_dtype; the buffer itself is {dtype_name(own)})"
            raise ValueError(f"buffer {h.buffer}: the chunk carries {h.dtype}, the buffer takes {dtype_name(want)}{why}")
        itemsize = dtype.itemsize
        nbytes = len(chunk.data)
        if nbytes % itemsize:
            raise ValueError(f"buffer {h.buffer}: chunk of {nbytes} bytes is not a whole number of {h.dtype}")
        count = nbytes // itemsize
        if h.offset != self.received[h.buffer]:
            # chunks of a buffer come in order, back to back: so a complete count means every element came
            raise ValueError(f"buffer {h.buffer}: chunk at element {h.offset}, expected the next at {self.received[h.buffer]}")
        if h.offset + count > expected:
            raise ValueError(f"buffer {h.buffer}: chunk at element {h.offset} of {count} elements overruns its {expected}")
        buf = self.buffers[h.buffer]
        if buf is None:
            buf = self.buffers[h.buffer] = self._allocate(expected, dtype)
        if count:
            # a byte copy straight from the message into place
            target = buf.view(torch.uint8).numpy()
            target[h.offset * itemsize : h.offset * itemsize + nbytes] = np.frombuffer(chunk.data, dtype=np.uint8)
        self.received[h.buffer] += count

    def result(self) -> list[torch.Tensor]:
        """The complete buffers; raises ``ValueError`` if any element is missing."""
        for i, (got, want) in enumerate(zip(self.received, self.numels)):
            if got != want:
                raise ValueError(f"buffer {i}: received {got} of {want} elements")
        return [b if b is not None else torch.empty(0, dtype=d) for b, d in zip(self.buffers, self.wire_dtypes)]


def encode_state(skeleton_json: str, tensors: Sequence[torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES, job: str = "") -> Iterator[pb.StateChunk]:
    """A state dict as chunks: the JSON skeleton (tensors replaced by references) first, then each tensor's bytes."""
    yield pb.StateChunk(job=job, skeleton_json=skeleton_json)
    for index, tensor in enumerate(tensors):
        raw = _raw_bytes(tensor)
        for start in range(0, max(len(raw), 1), chunk_bytes):
            yield pb.StateChunk(
                tensor=index, dtype=dtype_name(tensor.dtype), shape=list(tensor.shape), offset=start, data=raw[start : start + chunk_bytes].tobytes()
            )


def decode_state(chunks: Iterator[pb.StateChunk]) -> tuple[str, str, list[torch.Tensor]]:
    """(job, skeleton JSON, tensors) from the chunks of ``encode_state``; raises ``ValueError`` if malformed."""
    first = next(chunks, None)
    if first is None:
        raise ValueError("empty state stream")
    parts: dict[int, tuple[str, list[int], bytearray]] = {}
    for chunk in chunks:
        parse_dtype(chunk.dtype)
        entry = parts.setdefault(chunk.tensor, (chunk.dtype, list(chunk.shape), bytearray()))
        if entry[0] != chunk.dtype or entry[1] != list(chunk.shape) or chunk.offset != len(entry[2]):
            raise ValueError(f"state tensor {chunk.tensor}: chunks disagree on dtype, shape or offset")
        entry[2].extend(chunk.data)
    tensors = []
    for index in range(len(parts)):
        if index not in parts:
            raise ValueError(f"state tensor {index} is missing")
        name, shape, data = parts[index]
        dtype = parse_dtype(name)
        numel = 1
        for d in shape:
            numel *= d
        if len(data) != numel * dtype.itemsize:
            raise ValueError(f"state tensor {index}: {len(data)} bytes for shape {shape} of {name}")
        tensors.append(torch.frombuffer(data, dtype=dtype).reshape(shape).clone() if numel else torch.empty(shape, dtype=dtype))
    return first.job, first.skeleton_json, tensors


class BufferPool:
    """Receive buffers kept for reuse: a fresh buffer of tens of MiB costs its page faults on every push.

    Only a buffer this pool lent and that is not back yet is taken back: giving one back twice, or a tensor
    from elsewhere (a view of a worker's shared memory), leaves the pool as it was, so no buffer is ever lent
    to two pushes at once."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype, bool], list[torch.Tensor]] = {}
        self._lent: dict[int, weakref.ref[torch.Tensor]] = {}  # id -> the buffer, while a push has it
        self._lock = threading.Lock()
        self.allocations = 0  # buffers made new (the others were reused)

    def take(self, numel: int, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
        """A buffer of ``numel`` elements; ``pin``: in pinned memory, for a copy to a GPU by DMA."""
        with self._lock:
            free = self._free.get((numel, dtype, pin))
            if free:
                buf = free.pop()
            else:
                buf = torch.empty(numel, dtype=dtype, pin_memory=pin)
                self.allocations += 1
            key = id(buf)
            # a buffer dropped instead of given back leaves no entry behind (the callback runs before its id is free)
            self._lent[key] = weakref.ref(buf, lambda _, key=key: self._lent.pop(key, None))
            return buf

    def give_back(self, buffers: Sequence[torch.Tensor], pin: bool = False) -> None:
        """Keep ``buffers`` (taken with this ``pin``) for the next take; any other tensor is ignored."""
        with self._lock:
            for buf in buffers:
                lent = self._lent.pop(id(buf), None)
                if lent is not None and lent() is buf:
                    self._free.setdefault((buf.numel(), buf.dtype, pin), []).append(buf)
