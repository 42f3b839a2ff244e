"""Binary .caffemodel reading and writing (NetParameter with blobs).

Reading scans the protobuf wire format directly over a private mmap of the file: only the
layer names, types and blobs are decoded, and packed float data becomes numpy arrays
without building protobuf messages and per-float Python objects first, so a load is
bounded by memory bandwidth (scripts/bench_io.py). Arrays are zero-copy views of the
mapping where the data is aligned, one copy otherwise; the mapping is copy-on-write, so
they are writable and never write back. Any size works (Caffe lifts protobuf's 64 MB limit
too).

Writing emits the same bytes protobuf would for Caffe's ``Net::ToProto`` layout (each
layer's whole LayerParameter with its blobs, a blob as packed ``data`` plus ``shape``),
but writes the array memory directly instead of building float fields.
"""
from __future__ import annotations

import mmap
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
from google.protobuf import message as _message
from google.protobuf.descriptor import Descriptor
from google.protobuf.descriptor import FieldDescriptor as FD

from ..errors import FormatError
from ..proto import caffe_pb2
from .atomic import atomic_open
from .text import looks_like_text

Buffer = Union[bytes, bytearray, memoryview, mmap.mmap]
Chunk = Union[bytes, memoryview]

VARINT, I64, LEN, I32 = 0, 1, 2, 5
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_WHAT = "a binary .caffemodel (NetParameter)"


@dataclass
class BlobRecord:
    """One stored blob: flat float32 data, its shape, whether that shape is legacy 4-D,
    and the diff when the file holds one."""

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool = False
    diff: np.ndarray | None = None


@dataclass
class LayerRecord:
    """One stored layer: its name, type as stored (V2 string, V1 enum name or V0 string)
    and blobs. A blob is None only in HDF5 weights, where Caffe does not store a parameter
    shared from another layer."""

    name: str
    type: str
    blobs: list[BlobRecord | None]


class WireError(ValueError):
    """The bytes are not the protobuf message expected; ``offset`` is where that showed."""

    def __init__(self, detail: str, offset: int, truncated: bool = False):
        super().__init__(detail)
        self.offset = offset
        self.truncated = truncated


def varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The unsigned varint at ``pos`` and the position after it."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("a number runs past the end", pos, truncated=True)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("a number is longer than 10 bytes", pos)


def signed(value: int) -> int:
    """A varint read as a two's complement int64 (how negative int32/int64 are stored)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def next_field(buf: Buffer, pos: int, end: int) -> tuple[int, int, int, int]:
    """(field number, wire type, start, stop) of the field at ``pos``; ``stop`` is where the
    next field begins. For a varint ``start`` is the decoded value instead."""
    key, pos = varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise WireError("field number 0", pos)
    if wire == VARINT:
        value, stop = varint(buf, pos, end)
        return field, wire, value, stop
    if wire == LEN:
        size, pos = varint(buf, pos, end)
        stop = pos + size
    elif wire in (I32, I64):
        stop = pos + (4 if wire == I32 else 8)
    else:
        raise WireError(f"wire type {wire} (groups are not used by Caffe)", pos)
    if stop > end:
        raise WireError(f"field {field} needs {stop - pos} bytes but only {end - pos} are left",
                        pos, truncated=True)
    return field, wire, pos, stop


@lru_cache(maxsize=None)
def _wire_types(descriptor: Descriptor) -> dict[int, tuple[int, ...]]:
    """Wire types a field may use: repeated numbers come packed (LEN) or one by one."""
    fixed = {FD.TYPE_FLOAT: I32, FD.TYPE_FIXED32: I32, FD.TYPE_SFIXED32: I32,
             FD.TYPE_DOUBLE: I64, FD.TYPE_FIXED64: I64, FD.TYPE_SFIXED64: I64}
    types = {}
    for fd in descriptor.fields:
        if fd.message_type is not None or fd.type in (FD.TYPE_STRING, FD.TYPE_BYTES):
            types[fd.number] = (LEN,)
        else:
            scalar = fixed.get(fd.type, VARINT)
            types[fd.number] = (scalar, LEN) if fd.is_repeated else (scalar,)
    return types


# Blob array fields: number -> (dtype, wire type of one unpacked element).
_ARRAYS = {5: ("<f4", I32), 6: ("<f4", I32), 8: ("<f8", I64), 9: ("<f8", I64)}


def _array(buf: Buffer, start: int, stop: int, dtype: str) -> np.ndarray:
    """Packed values as an array: a view where aligned, else one copy."""
    itemsize = np.dtype(dtype).itemsize
    if (stop - start) % itemsize:
        raise WireError(f"packed {np.dtype(dtype).name} data of {stop - start} bytes", start)
    array = np.frombuffer(buf, dtype, count=(stop - start) // itemsize, offset=start)
    return array if array.flags.aligned else array.copy()


def _unpacked_run(buf: Buffer, pos: int, end: int, key: int, dtype: str) -> tuple[np.ndarray, int]:
    """Consecutive non-packed elements (old writers): ``key byte, value`` repeated from
    ``pos``; decoded in one strided numpy step. Returns the values and the end of the run."""
    itemsize = np.dtype(dtype).itemsize
    stride = 1 + itemsize
    most = (end - pos) // stride
    keys = np.frombuffer(buf, np.uint8, count=most * stride, offset=pos)[::stride]
    breaks = np.flatnonzero(keys != key)
    count = int(breaks[0]) if breaks.size else most
    values = np.ndarray((count,), dtype, buffer=buf, offset=pos + 1, strides=(stride,)).copy()
    return values, pos + count * stride


def _dims(buf: Buffer, start: int, stop: int) -> tuple[int, ...]:
    """BlobShape.dim values (packed or not)."""
    dims: list[int] = []
    pos = start
    while pos < stop:
        field, wire, value, pos = next_field(buf, pos, stop)
        if field != 1:
            continue
        if wire == VARINT:
            dims.append(signed(value))
        elif wire == LEN:
            at = value
            while at < pos:
                dim, at = varint(buf, at, pos)
                dims.append(signed(dim))
    return tuple(dims)


def parse_blob(buf: Buffer, start: int, stop: int) -> BlobRecord:
    """A BlobProto's bytes as a record: ``shape`` or else the legacy 4-D dims (none: a scalar);
    ``double_data`` wins over ``data`` as in Caffe's ``Blob::FromProto``."""
    chunks: dict[int, list[np.ndarray]] = {number: [] for number in _ARRAYS}
    legacy = [0, 0, 0, 0]
    has_legacy = False
    shape: tuple[int, ...] | None = None
    pos = start
    while pos < stop:
        at = pos
        field, wire, value, pos = next_field(buf, pos, stop)
        if field in _ARRAYS:
            dtype, element_wire = _ARRAYS[field]
            if wire == LEN:
                chunks[field].append(_array(buf, value, pos, dtype))
            elif wire == element_wire:
                run, pos = _unpacked_run(buf, at, stop, buf[at], dtype)
                chunks[field].append(run)
        elif field == 7 and wire == LEN:
            shape = _dims(buf, value, pos)
        elif 1 <= field <= 4 and wire == VARINT:
            legacy[field - 1] = signed(value)
            has_legacy = True

    def joined(number: int) -> np.ndarray | None:
        parts = chunks[number]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    data, diff = joined(5), joined(6)
    if chunks[8]:
        data = joined(8).astype(np.float32)
    if chunks[9]:
        diff = joined(9).astype(np.float32)
    if data is None:
        data = np.zeros(0, np.float32)
    if shape is not None:
        return BlobRecord(data, shape, False, diff)
    if has_legacy:
        return BlobRecord(data, tuple(legacy), True, diff)
    return BlobRecord(data, (), False, diff)


def blob_record(proto: caffe_pb2.BlobProto) -> BlobRecord:
    """A BlobProto message as a record (same rules as the file reader)."""
    raw = bytearray(proto.SerializeToString())     # bytearray: writable arrays
    return parse_blob(raw, 0, len(raw))


# Where name, type and blobs live: V2 LayerParameter, V1 V1LayerParameter, V0 V0LayerParameter.
_LAYER_FIELDS = {"V2": (1, 2, 7), "V1": (4, 5, 6), "V0": (1, 2, 50)}


def _layer(buf: Buffer, start: int, stop: int, form: str) -> LayerRecord:
    name_field, type_field, blob_field = _LAYER_FIELDS[form]
    name, kind, blobs = "", "", []
    pos = start
    while pos < stop:
        field, wire, value, pos = next_field(buf, pos, stop)
        if field == name_field and wire == LEN:
            name = bytes(buf[value:pos]).decode("utf-8", "replace")
        elif field == type_field and form == "V1" and wire == VARINT:
            kind = _v1_type_name(value)
        elif field == type_field and wire == LEN:
            kind = bytes(buf[value:pos]).decode("utf-8", "replace")
        elif field == blob_field and wire == LEN:
            blobs.append(parse_blob(buf, value, pos))
        elif form == "V1" and field == 1 and wire == LEN:   # V0: layers { layer { ... } }
            return _layer(buf, value, pos, "V0")
    return LayerRecord(name, kind, blobs)


def _v1_type_name(value: int) -> str:
    try:
        return caffe_pb2.V1LayerParameter.LayerType.Name(value)
    except ValueError:
        return str(value)


def message_fields(buf: Buffer, descriptor: Descriptor) -> list[tuple[int, int, int, int]]:
    """The top-level fields of a message (see :func:`next_field`), each checked against the
    wire types its schema allows: a file of another message type fails here."""
    expected = _wire_types(descriptor)
    fields = []
    pos, end = 0, len(buf)
    while pos < end:
        field, wire, value, pos = next_field(buf, pos, end)
        if wire not in expected.get(field, (wire,)):
            raise WireError(f"field {field} has wire type {wire}, which a {descriptor.name} "
                            "never uses", pos)
        fields.append((field, wire, value, pos))
    return fields


@contextmanager
def decoding(buf: Buffer, path: str | Path | None, what: str) -> Iterator[None]:
    """Turn an empty or HDF5 file, and any WireError raised inside, into one FormatError."""
    if len(buf) == 0:
        raise FormatError(path, f"is empty, expected {what}")
    if bytes(buf[:8]) == HDF5_SIGNATURE:
        raise FormatError(path, f"is an HDF5 file, expected {what}")
    try:
        yield
    except WireError as exc:
        raise _wire_error(buf, exc, path, what) from None


def scan_net(buf: Buffer, path: str | Path | None = None) -> list[LayerRecord]:
    """Layers (``layer``, V1 ``layers``, V0 ``layers { layer }``) with their blobs, in file
    order, from the bytes of a binary NetParameter; anything else is a FormatError."""
    with decoding(buf, path, _WHAT):
        return [_layer(buf, start, stop, "V2" if field == 100 else "V1")
                for field, _, start, stop in message_fields(buf, caffe_pb2.NetParameter.DESCRIPTOR)
                if field in (100, 2)]


def _wire_error(buf: Buffer, exc: WireError, path: str | Path | None, what: str) -> FormatError:
    """The one error for bytes that do not decode: text, truncation or corruption."""
    if looks_like_text(bytes(buf[:4096])):
        return FormatError(path, f"is a text file (a prototxt?), expected {what}")
    if exc.truncated:
        return FormatError(path, f"is truncated ({len(buf)} bytes; {exc}, at byte "
                                 f"{exc.offset}), expected {what}")
    return FormatError(path, f"is corrupt or not {what} ({exc}, at byte {exc.offset})")


def map_file(path: str | Path, what: str) -> Buffer:
    """A private copy-on-write mapping of the file (its bytes where it cannot be mapped, as
    a pipe; b'' when empty); a missing or unreadable file is a FormatError."""
    try:
        with open(path, "rb") as handle:
            try:
                return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:          # an empty file cannot be mapped
                return b""
            except OSError:
                return bytearray(handle.read())
    except FileNotFoundError:
        raise FormatError(path, f"no such file, expected {what}") from None
    except IsADirectoryError:
        raise FormatError(path, f"is a directory, expected {what}") from None
    except OSError as exc:
        raise FormatError(path, f"cannot be read ({exc.strerror}), expected {what}") from None


def read_caffemodel(path: str | Path) -> list[LayerRecord]:
    """Layers and blobs of a .caffemodel (V2, V1 or V0), or of Caffe HDF5 weights (.h5)."""
    buf = map_file(path, _WHAT)
    if bytes(buf[:8]) == HDF5_SIGNATURE:
        from .hdf5 import read_hdf5_weights
        return read_hdf5_weights(path)
    return scan_net(buf, path)


def parse_net_binary(raw: bytes, path: str | Path | None = None) -> caffe_pb2.NetParameter:
    """Decode a whole binary NetParameter message (checked by the scanner first, so text,
    truncated or foreign files give the same errors as :func:`read_caffemodel`)."""
    scan_net(raw, path)
    net = caffe_pb2.NetParameter()
    try:
        net.ParseFromString(raw)
    except _message.DecodeError as exc:
        raise FormatError(path, f"is corrupt or not {_WHAT} ({exc})") from None
    return net


# ------------------------------------------------------------------ writing

def encode_varint(value: int) -> bytes:
    """Protobuf varint bytes (negative values as 10-byte two's complement)."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, size: int) -> bytes:
    return encode_varint(number << 3 | LEN) + encode_varint(size)


def blob_chunks(array: np.ndarray, diff: np.ndarray | None = None, legacy: bool = False
                ) -> list[Chunk]:
    """BlobProto bytes as ``Blob::ToProto`` writes them (fields in number order: legacy dims,
    packed data, diff, shape), with the arrays' memory as chunks instead of copies.

    ``legacy`` writes num/channels/height/width (a <= 4-D array, padded with leading 1s)
    instead of ``shape``, as Caffe's compute_image_mean does.
    """
    array = np.asarray(array)
    chunks: list[Chunk] = []
    if legacy:
        if array.ndim > 4:
            raise ValueError(f"legacy blob dims hold at most 4 axes, got shape {array.shape}")
        dims = (1,) * (4 - array.ndim) + tuple(array.shape)
        chunks += [encode_varint(n << 3 | VARINT) + encode_varint(d)
                   for n, d in enumerate(dims, 1)]
    for number, values in ((5, array), (6, diff)):
        if values is not None and np.size(values):
            raw = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
            chunks += [_len_field(number, raw.nbytes), memoryview(raw).cast("B")]
    if not legacy and array.ndim:
        dims_bytes = b"".join(encode_varint(int(d)) for d in array.shape)
        dim_field = _len_field(1, len(dims_bytes)) + dims_bytes
        chunks.append(_len_field(7, len(dim_field)) + dim_field)
    return chunks


def split_message(message: _message.Message, number: int) -> tuple[bytes, bytes]:
    """``message``'s bytes split around field ``number``: (fields before, fields after).

    Protobuf writes known fields in number order and unknown ones last, so the bytes of
    the fields after ``number`` are a suffix; without that (never seen) all goes first.
    """
    whole = message.SerializeToString()
    tail = type(message)()
    tail.CopyFrom(message)
    for fd, _ in tail.ListFields():
        if fd.number <= number:
            tail.ClearField(fd.name)
    after = tail.SerializeToString()
    if after and whole.endswith(after):
        return whole[:len(whole) - len(after)], after
    return whole, b""


def message_with_blobs(head: bytes, blobs: Sequence[list[Chunk]], tail: bytes,
                       blob_field: int) -> list[Chunk]:
    """The chunks of a message: ``head``, each blob as field ``blob_field``, then ``tail``."""
    chunks: list[Chunk] = [head]
    for blob in blobs:
        chunks.append(_len_field(blob_field, sum(len(c) for c in blob)))
        chunks += blob
    chunks.append(tail)
    return chunks


def caffemodel_chunks(net: caffe_pb2.NetParameter, blobs: Sequence[Sequence[np.ndarray]],
                      diffs: Sequence[Sequence[np.ndarray]] | None = None) -> list[Chunk]:
    """The bytes of ``net`` with ``blobs[i]`` (and ``diffs[i]``, as ``ToProto(write_diff)``
    adds them) as layer i's blobs, as a list of chunks."""
    if len(blobs) > len(net.layer):
        raise ValueError(f"{len(blobs)} blob lists for {len(net.layer)} layers")
    header = caffe_pb2.NetParameter()
    header.CopyFrom(net)
    header.ClearField("layer")
    chunks: list[Chunk] = [header.SerializeToString()]
    for i, layer in enumerate(net.layer):
        bare = caffe_pb2.LayerParameter()
        bare.CopyFrom(layer)
        bare.ClearField("blobs")
        head, tail = split_message(bare, 7)
        arrays = blobs[i] if i < len(blobs) else ()
        grads = diffs[i] if diffs is not None and i < len(diffs) else [None] * len(arrays)
        body = message_with_blobs(head, [blob_chunks(a, d) for a, d in zip(arrays, grads)],
                                  tail, 7)
        chunks.append(_len_field(100, sum(len(c) for c in body)))
        chunks += body
    return chunks


def write_chunks(path: str | Path, chunks: Sequence[Chunk]) -> None:
    """Write the chunks to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.writelines(chunks)


def write_caffemodel(path: str | Path, net: caffe_pb2.NetParameter,
                     blobs: Sequence[Sequence[np.ndarray]],
                     diffs: Sequence[Sequence[np.ndarray]] | None = None) -> None:
    """Write ``net`` with ``blobs[i]`` (and ``diffs[i]``) as layer i's blobs, replacing any it
    holds, atomically."""
    write_chunks(path, caffemodel_chunks(net, blobs, diffs))
