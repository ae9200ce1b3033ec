"""Codec: tensors to wire chunks and back; the only place that knows the byte layout.

A shard's flat buffer travels as raw little-endian bytes cut into chunks of at most ``chunk_bytes``; each
chunk's header says which buffer, its dtype, the element offset and the buffer's total length, so a
receiver checks every chunk against what it expects before a byte lands in its preallocated buffer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch

from paramserver.proto.v1 import paramserver_pb2 as pb

assert sys.byteorder == "little", "the wire format is little-endian and so must this host be"

DEFAULT_CHUNK_BYTES = 2 * 2**20

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


def _raw_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


def encode(
    buffers: Sequence[torch.Tensor], chunk_bytes: int = DEFAULT_CHUNK_BYTES, **header: object
) -> Iterator[pb.TensorChunk]:
    """Chunks of ``buffers`` (1-D tensors), each with a header made of ``header`` plus its place."""
    if not buffers:
        # A shard may hold no tensor (more shards than tensors): one empty chunk still carries the header.
        yield pb.TensorChunk(header=pb.ChunkHeader(**header))
        return
    for index, buf in enumerate(buffers):
        raw = _raw_bytes(buf)
        itemsize = buf.element_size()
        step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
        dtype = dtype_name(buf.dtype)
        total = buf.numel()
        for start in range(0, max(len(raw), 1), step):
            yield pb.TensorChunk(
                header=pb.ChunkHeader(buffer=index, dtype=dtype, offset=start // itemsize, total=total, **header),
                data=raw[start : start + step].tobytes(),
            )


class Assembler:
    """Receives the chunks of a set of flat buffers into preallocated tensors, checking each chunk."""

    def __init__(self, numels: Sequence[int], dtypes: Sequence[torch.dtype]) -> None:
        self.numels = list(numels)
        self.dtypes = list(dtypes)
        self.buffers: list[torch.Tensor | None] = [None] * len(numels)
        self.received = [0] * len(numels)

    def add(self, chunk: pb.TensorChunk) -> None:
        h = chunk.header
        if not self.numels and not chunk.data and (h.buffer, h.offset, h.total, h.dtype) == (0, 0, 0, ""):
            return  # the header-only chunk of a stream for a shard without buffers
        if h.buffer >= len(self.numels):
            raise ValueError(f"chunk for buffer {h.buffer}, but there are only {len(self.numels)} buffers")
        expected = self.numels[h.buffer]
        if h.total != expected:
            raise ValueError(f"buffer {h.buffer} has {expected} elements, the chunk says {h.total}")
        dtype = parse_dtype(h.dtype)
        if not (dtype.is_floating_point or dtype.is_complex):
            raise ValueError(f"buffer {h.buffer}: dtype {h.dtype} is not floating point")
        itemsize = dtype.itemsize
        if len(chunk.data) % itemsize:
            raise ValueError(f"buffer {h.buffer}: chunk of {len(chunk.data)} bytes is not a whole number of {h.dtype}")
        count = len(chunk.data) // itemsize
        if h.offset != self.received[h.buffer]:
            # chunks of a buffer come in order, back to back: so a complete count means every element came
            raise ValueError(f"buffer {h.buffer}: chunk at element {h.offset}, expected the next at {self.received[h.buffer]}")
        if h.offset + count > expected:
            raise ValueError(f"buffer {h.buffer}: chunk at element {h.offset} of {count} elements overruns its {expected}")
        buf = self.buffers[h.buffer]
        if buf is None:
            buf = self.buffers[h.buffer] = torch.empty(expected, dtype=dtype)
        elif buf.dtype != dtype:
            raise ValueError(f"buffer {h.buffer}: chunks disagree on dtype ({buf.dtype} then {h.dtype})")
        if count:
            buf[h.offset : h.offset + count].copy_(torch.frombuffer(bytearray(chunk.data), dtype=dtype))
        self.received[h.buffer] += count

    def result(self) -> list[torch.Tensor]:
        """The complete buffers; raises ``ValueError`` if any element is missing."""
        for i, (got, want) in enumerate(zip(self.received, self.numels)):
            if got != want:
                raise ValueError(f"buffer {i}: received {got} of {want} elements")
        return [b if b is not None else torch.empty(0, dtype=d) for b, d in zip(self.buffers, self.dtypes)]


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
