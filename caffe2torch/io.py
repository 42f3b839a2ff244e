"""pycaffe's ``caffe.io``: the input ``Transformer``, image loading/resizing, and the
proto <-> numpy converters.

``Transformer`` follows pycaffe's order of operations exactly (resize, transpose, channel
swap, raw scale, mean, input scale; ``deprocess`` inverts them). pycaffe reads and resizes
images with scikit-image; here OpenCV does both, with the same results:

* :func:`load_image` gives float32 RGB in [0, 1] (``skimage.img_as_float``: 8-bit / 255,
  16-bit / 65535), H x W x 3, or H x W x 1 for a grey image with ``color=False``; alpha
  is dropped.
* :func:`resize_image` interpolates with pixel centres aligned and edges clamped
  (``interp_order`` 0 nearest, 1 bilinear, 3 bicubic), like ``skimage.transform.resize``
  without anti-aliasing, for any number of channels.

One deliberate difference: ``preprocess`` never scales the caller's array in place (pycaffe
does when no resize or channel swap copies it first).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np

from .formats.binaryproto import array_to_blobproto, blobproto_to_array
from .formats.datum import array_to_datum, datum_to_array

_INTERPOLATION = {0: cv2.INTER_NEAREST, 1: cv2.INTER_LINEAR, 3: cv2.INTER_CUBIC}
_CV_MAX_CHANNELS = 512


class Transformer:
    """Prepare images for a net's input blobs (pycaffe's ``caffe.io.Transformer``).

    ``inputs`` maps each input blob name to its shape, e.g.
    ``Transformer({'data': net.blobs['data'].data.shape})``.
    """

    def __init__(self, inputs: Mapping[str, Sequence[int]]):
        self.inputs = {name: tuple(shape) for name, shape in inputs.items()}
        self.transpose: dict[str, tuple[int, ...]] = {}
        self.channel_swap: dict[str, tuple[int, ...]] = {}
        self.raw_scale: dict[str, float] = {}
        self.mean: dict[str, np.ndarray] = {}
        self.input_scale: dict[str, float] = {}

    def _check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise ValueError(f"{in_} is not one of the net inputs: {list(self.inputs)}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """An H' x W' x K image to a K x H x W float32 input: resize to the input's spatial
        size, transpose, swap channels, ``*= raw_scale``, ``-= mean``, ``*= input_scale``."""
        self._check_input(in_)
        caffe_in = np.asarray(data).astype(np.float32)
        in_dims = self.inputs[in_][2:]
        if caffe_in.shape[:2] != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        transpose = self.transpose.get(in_)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        channel_swap = self.channel_swap.get(in_)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        raw_scale = self.raw_scale.get(in_)
        if raw_scale is not None:
            caffe_in *= raw_scale
        mean = self.mean.get(in_)
        if mean is not None:
            caffe_in -= mean
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        """Invert :meth:`preprocess` (except the resize); singleton dims are squeezed."""
        self._check_input(in_)
        decaf_in = np.array(data).squeeze()
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        mean = self.mean.get(in_)
        if mean is not None:
            decaf_in += mean
        raw_scale = self.raw_scale.get(in_)
        if raw_scale is not None:
            decaf_in /= raw_scale
        channel_swap = self.channel_swap.get(in_)
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        transpose = self.transpose.get(in_)
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Dimension order from the image's to the blob's, e.g. ``(2, 0, 1)`` for HWC -> CHW."""
        self._check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise ValueError("Transpose order needs to have the same number of dimensions as "
                             "the input.")
        self.transpose[in_] = tuple(order)

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """Channel order after transposing, e.g. ``(2, 1, 0)`` for RGB -> BGR."""
        self._check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise ValueError("Channel swap needs to have the same number of dimensions as the "
                             "input channels.")
        self.channel_swap[in_] = tuple(order)

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Scale applied before the mean: 255 for models trained on [0, 255] pixels."""
        self._check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """The mean to subtract: one value per channel (K,), or a K x H x W (or H x W) image,
        resized to the input's size when it differs."""
        self._check_input(in_)
        mean = np.asarray(mean)
        if mean.ndim == 1:
            if mean.shape[0] != self.inputs[in_][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            shape = mean.shape if mean.ndim != 2 else (1,) + mean.shape
            if len(shape) != 3:
                raise ValueError("Mean shape invalid")
            if shape != self.inputs[in_][1:]:
                in_shape = self.inputs[in_][1:]
                low, high = mean.min(), mean.max()
                normal = (mean - low) / (high - low) if high > low else mean - low
                mean = resize_image(normal.reshape(shape).transpose((1, 2, 0)),
                                    in_shape[1:]).transpose((2, 0, 1)) * (high - low) + low
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Scale applied after the mean (e.g. 0.017 for std normalisation)."""
        self._check_input(in_)
        self.input_scale[in_] = scale


def load_image(filename: str | Path, color: bool = True) -> np.ndarray:
    """An image file as float32 in [0, 1]: H x W x 3 RGB, or H x W x 1 when the file is grey
    and ``color`` is false."""
    img = cv2.imread(str(filename), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f"load_image: cannot read an image from '{filename}' (missing "
                                "or not an image format OpenCV decodes)")
    scale = float(np.iinfo(img.dtype).max) if np.issubdtype(img.dtype, np.integer) else 1.0
    if img.ndim == 3:
        img = img[:, :, 2::-1]  # BGR(A) -> RGB, alpha dropped
    img = (img.astype(np.float64) / scale).astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    return img


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K array to ``new_dims`` (height, width) as float32."""
    height, width = int(new_dims[0]), int(new_dims[1])
    flags = _INTERPOLATION.get(interp_order)
    if flags is None:
        raise ValueError(f"resize_image: interp_order must be 0, 1 or 3, got {interp_order}")
    im = np.asarray(im, dtype=np.float32)
    chunks = [cv2.resize(np.ascontiguousarray(im[:, :, c:c + _CV_MAX_CHANNELS]), (width, height),
                         interpolation=flags).reshape(height, width, -1)
              for c in range(0, im.shape[2], _CV_MAX_CHANNELS)]
    return np.concatenate(chunks, axis=2)


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """The four corner and the centre crops of each image, then their mirrors:
    a (10 * N) x h x w x K array."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    im_center = im_shape[:2] / 2.0
    h_indices = (0, im_shape[0] - crop_dims[0])
    w_indices = (0, im_shape[1] - crop_dims[1])
    crops_ix = np.empty((5, 4), dtype=int)
    curr = 0
    for i in h_indices:
        for j in w_indices:
            crops_ix[curr] = (i, j, i + crop_dims[0], j + crop_dims[1])
            curr += 1
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0,
                                                               crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), crop_dims[0], crop_dims[1], im_shape[-1]),
                     dtype=np.float32)
    ix = 0
    for im in images:
        for crop in crops_ix:
            crops[ix] = im[crop[0]:crop[2], crop[1]:crop[3], :]
            ix += 1
        crops[ix - 5:ix] = crops[ix - 5:ix, :, ::-1, :]  # mirrors of the second five
    return crops


__all__ = ["Transformer", "array_to_blobproto", "array_to_datum", "blobproto_to_array",
           "datum_to_array", "load_image", "oversample", "resize_image"]
