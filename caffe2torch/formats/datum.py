"""Caffe's ``Datum`` (one image and its label, a record of an LMDB or LevelDB) as numpy arrays.

``array_to_datum``/``datum_to_array`` are pycaffe's ``caffe.io`` converters, for scripts that
write or read LMDBs by hand. ``parse_datum``, ``datum_image`` and ``image_to_datum`` are what
Caffe's data layers and ``convert_imageset`` do with a record: raw uint8 bytes (CHW, BGR),
``float_data``, or an encoded image file decoded by OpenCV.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np
from google.protobuf.message import DecodeError

from ..errors import FormatError
from ..proto import caffe_pb2


def array_to_datum(arr: np.ndarray, label: int | None = None) -> caffe_pb2.Datum:
    """pycaffe's ``caffe.io.array_to_datum``: a CxHxW array; uint8 goes to ``data`` as bytes,
    any other dtype to ``float_data``."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError(f"array_to_datum needs a 3-D (channels, height, width) array, "
                         f"got shape {list(arr.shape)}")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = arr.shape
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(np.float32).ravel().tolist())
    if label is not None:
        datum.label = int(label)
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """pycaffe's ``caffe.io.datum_to_array``: uint8 CxHxW from ``data``, else float64 from
    ``float_data`` (the label is ``datum.label``). Encoded datums: use :func:`datum_image`."""
    if datum.encoded:
        raise ValueError("datum_to_array: this datum holds an encoded image file (JPEG/PNG); "
                         "decode it with caffe2torch.formats.datum.datum_image")
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape).copy()
    return np.array(datum.float_data, dtype=np.float64).reshape(shape)


def parse_datum(value: bytes, source: str) -> caffe_pb2.Datum:
    """Parse one record; ``source`` names it (DB and key) in the error for a corrupt one."""
    try:
        return caffe_pb2.Datum.FromString(value)
    except DecodeError as exc:
        raise FormatError(source, f"not a Caffe Datum (corrupt record?): {exc}") from None


def decode_image(data: bytes | np.ndarray, source: str, force_color: bool = False,
                 force_gray: bool = False) -> np.ndarray:
    """An encoded image file as OpenCV decodes it for Caffe: HxWxC (or HxW) uint8, BGR.

    Without ``force_*`` the file's own channels are kept (Caffe's ``DecodeDatumToCVMatNative``).
    """
    flag = (cv2.IMREAD_COLOR if force_color else cv2.IMREAD_GRAYSCALE if force_gray
            else cv2.IMREAD_UNCHANGED)
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data
    image = cv2.imdecode(buf, flag) if buf.size else None
    if image is None:
        raise FormatError(source, "could not decode the encoded image (not a JPEG/PNG/... file "
                                  "OpenCV can read)")
    if image.dtype != np.uint8:
        raise FormatError(source, f"decoded image has {image.dtype} pixels; Caffe needs 8-bit "
                                  "images")
    return image


_LEADING_INT = re.compile(r"\s*([+-]?\d+)")


def read_list_file(path: str | Path) -> list[tuple[str, int]]:
    """The ``name label`` lines of an image list, split as Caffe does: the label follows the
    last space (names may contain spaces) and is read like C's ``atoi`` (junk gives 0)."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise FormatError(path, f"cannot read the image list: {exc.strerror}") from None
    items = []
    for line in text.splitlines():
        name, space, label = line.rpartition(" ")
        if not space:
            name, label = line, line
        match = _LEADING_INT.match(label)
        items.append((name, int(match.group(1)) if match else 0))
    return items


def read_image(path: str, is_color: bool = True, height: int = 0, width: int = 0
               ) -> np.ndarray | None:
    """Caffe's ``ReadImageToCVMat``: OpenCV's imread (BGR colour, or gray), resized with
    INTER_LINEAR when both ``height`` and ``width`` are positive; None when unreadable."""
    if not os.path.isfile(path):
        return None
    image = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if image is not None and height > 0 and width > 0:
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    return image


def hwc_to_chw(image: np.ndarray) -> np.ndarray:
    """An OpenCV HxWxC (or HxW) image as a CxHxW view, without copying."""
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


def contiguous_chw(image: np.ndarray) -> np.ndarray:
    """A CxHxW array with contiguous planes: views of interleaved (OpenCV) pixels are split
    by OpenCV, several times faster than numpy copies a transpose."""
    if image.flags.c_contiguous:
        return image
    if image.shape[0] > 4 or image.strides[0] != image.itemsize:
        return np.ascontiguousarray(image)
    planes = np.empty(image.shape, image.dtype)
    cv2.split(np.ascontiguousarray(image.transpose(1, 2, 0)), list(planes))
    return planes


def datum_image(datum: caffe_pb2.Datum, source: str, force_color: bool = False,
                force_gray: bool = False) -> np.ndarray:
    """A record's image as CxHxW: uint8 (raw or decoded) or float32 (``float_data``).

    ``force_color``/``force_gray`` apply to encoded datums only, as in Caffe.
    """
    if datum.encoded:
        return hwc_to_chw(decode_image(datum.data, source, force_color, force_gray))
    shape = (datum.channels, datum.height, datum.width)
    if min(shape) <= 0:
        raise FormatError(source, f"datum has channels/height/width {list(shape)}; all must be "
                                  "positive")
    count = shape[0] * shape[1] * shape[2]
    if len(datum.data):
        if len(datum.data) != count:
            raise FormatError(source, f"datum holds {len(datum.data)} bytes, its shape "
                                      f"{list(shape)} needs {count}")
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(shape)
    if len(datum.float_data) != count:
        raise FormatError(source, f"datum holds {len(datum.float_data)} float_data values, its "
                                  f"shape {list(shape)} needs {count}")
    return np.asarray(datum.float_data, dtype=np.float32).reshape(shape)


def image_to_datum(image: np.ndarray, label: int) -> caffe_pb2.Datum:
    """Caffe's ``CVMatToDatum`` plus the label: an OpenCV HxWxC (or HxW) uint8 image as raw CHW
    bytes, field for field what ``convert_imageset`` writes (``encoded: false`` included)."""
    chw = contiguous_chw(hwc_to_chw(image))
    datum = caffe_pb2.Datum(channels=chw.shape[0], height=chw.shape[1], width=chw.shape[2],
                            data=chw.tobytes(), label=label)
    datum.encoded = False
    return datum


def encoded_datum(data: bytes, label: int) -> caffe_pb2.Datum:
    """Caffe's encoded record: the file bytes, the label and ``encoded: true`` (no shape)."""
    return caffe_pb2.Datum(data=data, label=label, encoded=True)
