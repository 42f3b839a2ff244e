"""HED's ImageLabelmapData (s9xie/hed ``image_labelmap_data_layer.cpp``): images with their
edge maps, read from a list of ``image label_map`` pairs.

The layer reads ``image_data_param`` as ImageData does (``source``, ``root_folder``,
``batch_size``, ``shuffle``, ``rand_skip``, ``new_height``/``new_width``, ``is_color``) and
applies ``transform_param`` with the fork's ``LocTransform``/``LabelmapTransform``: one
random ``crop_size`` crop (in both phases) and one random mirror shared by the image and
its map; mean and scale on the image only.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from types import SimpleNamespace

import cv2
import numpy as np

from ..data import DataError
from ..errors import NetError
from ..formats.datum import read_image
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec
from .fork_rcnn import DenseImageData
from .registry import register

_RAW = threading.local()   # raw size of the image just read, checked against its map's


@register("ImageLabelmapData")
class ImageLabelmapData(DenseImageData):
    """Tops: data (B, C, H, W) and the label map (B, 1, H, W) of 0/1 values.

    The map is read as gray, must have the image's size, is resized with INTER_LINEAR when
    ``new_height``/``new_width`` are set (as the image), then divided by 255 with OpenCV's
    rounding (``cv_gt / 255``: pixels >= 128 become 1, the fork's "consensus sampling"
    trick). Crop and mirror draw from one generator for the image and the map; the crop is
    random also at TEST, as in the fork. ``transform_param.mean_file`` together with a crop
    is not supported (the fork indexes the mean at the uncropped pixel).
    """

    def __init__(self, spec: LayerSpec):
        p = spec.param.image_data_param
        t = spec.param.transform_param
        # checked here, before the translation below, so that errors name the fork's fields
        early = SimpleNamespace(base_dir=spec.base_dir, error=lambda message: NetError(
            message, layer=spec.param.name, layer_type=spec.param.type, location=spec.location))
        if p.batch_size <= 0:
            raise early.error(f"image_data_param.batch_size must be positive, got "
                              f"{p.batch_size}")
        if (p.new_height > 0) != (p.new_width > 0):
            raise early.error("image_data_param: new_height and new_width must be set together")
        if not p.source:
            raise early.error("image_data_param.source is required")
        source = CaffeLayer.resolve_path(early, p.source, "image_data_param.source")
        crop = (t.crop_size, t.crop_size) if t.crop_size else (t.crop_h, t.crop_w)
        if crop[0] and t.HasField("mean_file"):
            raise early.error("transform_param.mean_file with a crop is not supported for "
                              "ImageLabelmapData (the fork indexes the mean at the uncropped "
                              "pixel); use mean_value")
        # DenseImageData with the same choices: crop and mirror shared by image and map
        param = caffe_pb2.LayerParameter()
        param.CopyFrom(spec.param)
        dense = param.dense_image_data_param
        dense.source = str(source)
        for name in ("batch_size", "rand_skip", "shuffle", "new_height", "new_width",
                     "is_color", "root_folder"):
            setattr(dense, name, getattr(p, name))
        dense.mirror = t.mirror
        dense.crop_height, dense.crop_width = crop
        for name in ("mirror", "crop_size", "crop_h", "crop_w"):
            param.transform_param.ClearField(name)
        super().__init__(replace(spec, param=param))
        self.param = spec.param

    def _read(self, name: str, color: bool, size: tuple[int, int], nearest: bool) -> np.ndarray:
        """The image (``nearest`` false) or its label map (``nearest`` true), as the fork."""
        path = self.prefix + name
        image = read_image(path, color)
        if image is None:
            raise DataError(f"could not open or read image '{path}' (listed in '{self.source}')")
        if not nearest:
            _RAW.shape = image.shape[:2]
        elif image.shape[:2] != getattr(_RAW, "shape", None):
            raise DataError(f"label map '{path}' is {image.shape[0]}x{image.shape[1]}, its image "
                            f"{_RAW.shape[0]}x{_RAW.shape[1]}: ground truth size must equal "
                            f"the image size")
        if min(size) > 0:
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        if nearest:
            image = np.rint(image * (1.0 / 255.0)).astype(np.uint8)
        return image

