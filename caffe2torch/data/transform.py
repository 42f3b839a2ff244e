"""Caffe's DataTransformer (``data_transformer.cpp``): crop, mirror, mean and scale.

One CxHxW image (uint8 pixels or float_data) at a time, written into its slot of the batch.
The rules are Caffe's: a random crop at TRAIN and the centre crop at TEST; a random mirror in
both phases when ``mirror`` is on; then ``(pixel - mean) * scale`` in float32, where a
``mean_file`` is indexed at the uncropped pixel (so it must have the full image size) and
``mean_value`` gives one value or one per channel. Channel order is kept (BGR from OpenCV).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from ..formats.binaryproto import read_blobproto
from ..formats.datum import contiguous_chw
from ..proto import caffe_pb2
from . import DataError

# SSD-fork transform options (AnnotatedData) that BVLC's transformer does not have.
_FORK_ONLY = ("resize_param", "noise_param", "distort_param", "expand_param", "emit_constraint")


class DataTransformer:
    """The ``transform_param`` of one layer, for one phase.

    ``resolve(path, what)`` finds the ``mean_file`` (the layer's ``resolve_path``).
    Randomness comes in as draws (:meth:`draws`) so that the order of items, not the
    thread that builds them, decides the crops and mirrors.
    """

    def __init__(self, param: caffe_pb2.TransformationParameter, phase: int,
                 resolve: Callable[[str, str], Path]):
        for name in _FORK_ONLY:
            if param.HasField(name):
                raise DataError(f"transform_param.{name} is an SSD-fork option that caffe2torch's "
                                "data layers do not implement")
        if param.force_color and param.force_gray:
            raise DataError("transform_param: force_color and force_gray cannot both be set")
        if param.HasField("mean_file") and len(param.mean_value):
            raise DataError("transform_param: give mean_file or mean_value, not both")
        self.force_color, self.force_gray = param.force_color, param.force_gray
        size = param.crop_size
        self.crop = (size, size) if size else (param.crop_h, param.crop_w)
        if (self.crop[0] > 0) != (self.crop[1] > 0):
            raise DataError(f"transform_param: crop_h and crop_w must be set together, got "
                            f"{list(self.crop)}")
        self.train = phase == caffe_pb2.TRAIN
        self.mirror = param.mirror
        self.scale = np.float32(param.scale)
        self.mean_values = np.asarray(param.mean_value, np.float32) if len(param.mean_value) \
            else None
        self.mean_file: np.ndarray | None = None
        self.mean_path = ""
        if param.HasField("mean_file"):
            self.mean_path = param.mean_file
            self.mean_file = self._read_mean(resolve(param.mean_file, "transform_param.mean_file"))
        self.needs_rand = self.mirror or (self.train and self.crop[0] > 0)

    def _read_mean(self, path: Path) -> np.ndarray:
        mean = read_blobproto(path)
        if mean.ndim == 4 and mean.shape[0] == 1:
            mean = mean[0]
        if mean.ndim != 3:
            raise DataError(f"transform_param.mean_file '{self.mean_path}' holds a blob of shape "
                            f"{list(mean.shape)}; a mean image is 1 x channels x height x width")
        return mean

    def output_shape(self, shape: tuple[int, ...], source: str) -> tuple[int, int, int]:
        """The transformed size of a CxHxW image (Caffe's ``InferBlobShape``), checking that the
        crop and the mean fit it; ``source`` names the image in errors."""
        channels, height, width = shape
        if self.crop[0] and (height < self.crop[0] or width < self.crop[1]):
            raise DataError(f"{source}: image is {height}x{width} (HxW), smaller than the crop "
                            f"{self.crop[0]}x{self.crop[1]} (transform_param.crop_size)")
        if self.mean_values is not None and len(self.mean_values) not in (1, channels):
            raise DataError(f"{source}: transform_param gives {len(self.mean_values)} mean_value(s) "
                            f"for a {channels}-channel image; give 1 or {channels}")
        if self.mean_file is not None and self.mean_file.shape != tuple(shape):
            raise DataError(f"transform_param.mean_file '{self.mean_path}' is "
                            f"{'x'.join(map(str, self.mean_file.shape))} (CxHxW) but {source} is "
                            f"{'x'.join(map(str, shape))}; the mean must have the size of the "
                            f"uncropped images")
        return (channels, self.crop[0] or height, self.crop[1] or width)

    def draws(self, rng: np.random.Generator, count: int) -> np.ndarray | None:
        """Random words for ``count`` items (mirror, crop row, crop column), or None when the
        transform is deterministic."""
        if not self.needs_rand:
            return None
        return rng.integers(0, 2**32, size=(count, 3), dtype=np.uint32)

    def __call__(self, image: np.ndarray, out: np.ndarray, draw: np.ndarray | None,
                 source: str) -> None:
        """Transform the CxHxW ``image`` into ``out`` (its slot in the batch)."""
        channels, height, width = image.shape
        if self.output_shape(image.shape, source) != out.shape:
            raise DataError(f"{source}: image is {channels}x{height}x{width} (CxHxW), but the "
                            f"batch's first gives {'x'.join(map(str, out.shape))}; images of "
                            "different sizes need transform_param.crop_size (or batch_size 1)")
        _, crop_h, crop_w = out.shape
        if not self.crop[0]:
            h_off = w_off = 0
        elif self.train:
            h_off = int(draw[1] % (height - crop_h + 1))
            w_off = int(draw[2] % (width - crop_w + 1))
        else:
            h_off, w_off = (height - crop_h) // 2, (width - crop_w) // 2
        mirror = self.mirror and draw[0] % 2
        rows, cols = slice(h_off, h_off + crop_h), slice(w_off, w_off + crop_w)
        image = contiguous_chw(image)
        for c in range(channels):   # plane by plane: contiguous rows, OpenCV's fast flip
            pixels = image[c, rows, cols]
            mean = self.mean_values[c % len(self.mean_values)] \
                if self.mean_values is not None else None
            if self.mean_file is not None:
                mean = self.mean_file[c, rows, cols]
                mean = cv2.flip(mean, 1) if mirror else mean
            if mirror:
                pixels = cv2.flip(pixels, 1)
            if mean is None:
                np.copyto(out[c], pixels)
            else:
                np.subtract(pixels, mean, out=out[c], dtype=np.float32)
        if self.scale != 1:
            np.multiply(out, self.scale, out=out)
