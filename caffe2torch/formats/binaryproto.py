"""``.binaryproto`` files: one BlobProto (mean images, InfogainLoss matrices) or a
BlobProtoVector, as numpy arrays; plus pycaffe's ``caffe.io`` converters.

Reading uses the caffemodel wire scanner, so the rules (``shape`` or legacy 4-D dims,
``double_data`` over ``data``) are the ones Caffe's ``Blob::FromProto`` applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..proto import caffe_pb2
from .caffemodel import (BlobRecord, blob_chunks, decoding, map_file, message_fields, parse_blob,
                         write_chunks)

_WHAT = "a binary .binaryproto (BlobProto)"
_WHAT_VECTOR = "a binary BlobProtoVector"


def _as_array(record: BlobRecord, path: str | Path) -> np.ndarray:
    needed = int(np.prod(record.shape, dtype=np.int64))
    if record.data.size != needed:
        raise FormatError(path, f"blob shape {list(record.shape)} needs {needed} values but the "
                                f"file holds {record.data.size} (truncated or corrupt?)")
    return record.data.reshape(record.shape)


def read_blobproto(path: str | Path) -> np.ndarray:
    """The blob in a .binaryproto as a float32 array of its shape (legacy files: 4-D)."""
    buf = map_file(path, _WHAT)
    with decoding(buf, path, _WHAT):
        message_fields(buf, caffe_pb2.BlobProto.DESCRIPTOR)
        record = parse_blob(buf, 0, len(buf))
    return _as_array(record, path)


def read_blobproto_vector(path: str | Path) -> list[np.ndarray]:
    """The blobs of a BlobProtoVector file (several means in one file), as arrays."""
    buf = map_file(path, _WHAT_VECTOR)
    with decoding(buf, path, _WHAT_VECTOR):
        records = [parse_blob(buf, start, stop) for field, _, start, stop
                   in message_fields(buf, caffe_pb2.BlobProtoVector.DESCRIPTOR) if field == 1]
    return [_as_array(record, path) for record in records]


def write_blobproto(path: str | Path, array: np.ndarray, legacy: bool = False) -> None:
    """Write ``array`` as a BlobProto (float32 data plus ``shape``), atomically.

    ``legacy`` writes num/channels/height/width instead, as Caffe's compute_image_mean does.
    """
    write_chunks(path, blob_chunks(np.asarray(array), legacy=legacy))


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """pycaffe's ``caffe.io.blobproto_to_array``: float64 data (or diff), reshaped by the
    legacy dims when any is set, else by ``shape`` (``double_data`` is not consulted)."""
    data = np.array(blob.diff if return_diff else blob.data, dtype=np.float64)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(tuple(blob.shape.dim))


def array_to_blobproto(arr: np.ndarray, diff: np.ndarray | None = None) -> caffe_pb2.BlobProto:
    """pycaffe's ``caffe.io.array_to_blobproto``: ``shape`` plus data (and diff), no checks.

    Values go through float64 first, as pycaffe's ``astype(float)`` does.
    """
    arr = np.asarray(arr, dtype=np.float64).astype(np.float32)
    if diff is not None:
        diff = np.asarray(diff, dtype=np.float64).astype(np.float32)
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(b"".join(blob_chunks(arr, diff)))
    if arr.ndim == 0:
        blob.shape.SetInParent()
    return blob
