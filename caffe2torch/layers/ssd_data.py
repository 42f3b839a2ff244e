"""SSD's AnnotatedData layer: images and their boxes from AnnotatedDatum records.

Sources: weiliu89/caffe ``annotated_data_layer.cpp``, ``data_transformer.cpp``
(DistortImage, ExpandImage, CropImage, Transform, TransformAnnotation),
``util/sampler.cpp`` and ``util/im_transforms.cpp``. Per image, in the fork's order:
photometric distortion (``distort_param``), zoom-out (``expand_param``), one random crop
among the boxes the ``batch_sampler`` list accepts, then ``resize_param``, crop, mirror,
mean and scale; the boxes follow every step, ``emit_constraint`` deciding which survive
a crop. As in the fork, an encoded image is re-encoded as JPEG after each geometric or
colour step. Random draws come from per-image generators seeded on the forward thread
(:mod:`caffe2torch.data`), so batches repeat run to run but not Caffe's own draws.

MobileNet-YOLO's ``yolo_data_type: 1`` (``yolo_data_jitter``, ``train_diffcult``) is
supported, see :class:`AnnotatedData`. Not supported (an error names them):
``noise_param``, ``resize_mode: FIT_SMALL_SIZE`` (batches of varying size) and the
fork's segmentation fields (``single_class``, ``seg_scales``, ``seg_resize_*``). With
``mean_file`` and ``mirror`` the mean is mirrored with the pixels (BVLC's rule).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from ..data import DataError, seeded_rng
from ..data.db import RecordReader
from ..data.transform import DataTransformer
from ..formats.datum import datum_image, hwc_to_chw
from ..proto import caffe_pb2
from .base import LayerSpec, Shape
from .data import _PrefetchingLayer
from .registry import register
from .ssd_bbox import F32, box_size, jaccard

_FORK_FIELDS = ("resize_param", "noise_param", "distort_param", "expand_param",
                "emit_constraint")
_SEG_FIELDS = ("single_class", "seg_scales", "seg_resize_width", "seg_resize_height")
YOLO_TRUTHS = 300      # rows per image of the yolo_data_type 1 label
_Resize = caffe_pb2.ResizeParameter
_INTERP = {_Resize.LINEAR: cv2.INTER_LINEAR, _Resize.AREA: cv2.INTER_AREA,
           _Resize.NEAREST: cv2.INTER_NEAREST, _Resize.CUBIC: cv2.INTER_CUBIC,
           _Resize.LANCZOS4: cv2.INTER_LANCZOS4}
_PAD = {_Resize.CONSTANT: cv2.BORDER_CONSTANT, _Resize.MIRRORED: cv2.BORDER_REFLECT_101,
        _Resize.REPEAT_NEAREST: cv2.BORDER_REPLICATE}
UNIT = np.array([0, 0, 1, 1], F32)


@dataclass
class Box:
    """One annotation: ``bbox`` [xmin, ymin, xmax, ymax] normalised, its instance and flag."""

    bbox: np.ndarray
    instance: int
    difficult: bool


@dataclass
class Sample:
    """An image (HxWxC uint8, BGR) with its annotation groups ``[(group_label, boxes)]``."""

    image: np.ndarray
    encoded: bool
    groups: list[tuple[int, list[Box]]] = field(default_factory=list)

    def reencode(self) -> None:
        """The fork stores every step's image with ``EncodeCVMatToDatum(img, "jpg")``."""
        if self.encoded:
            ok, buf = cv2.imencode(".jpg", self.image)
            if not ok:
                raise DataError("could not re-encode an augmented image as JPEG")
            self.image = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(self.image.shape)

    def boxes(self) -> np.ndarray:
        return np.array([b.bbox for _, group in self.groups for b in group], F32).reshape(-1, 4)


# -- box rules (bbox_util.cpp) ------------------------------------------------------------
def coverage(a: np.ndarray, b: np.ndarray) -> F32:
    """``BBoxCoverage``: the part of box ``a`` that ``b`` covers."""
    inter = np.concatenate([np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])])
    size = box_size(inter)
    return F32(size / box_size(a)) if size > 0 else F32(0)


def project(src: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """``ProjectBBox``: ``box`` in the coordinates of ``src``, clipped; None outside it."""
    if box[0] >= src[2] or box[2] <= src[0] or box[1] >= src[3] or box[3] <= src[1]:
        return None
    size = np.array([src[2] - src[0], src[3] - src[1]] * 2, F32)
    proj = np.clip((box - np.tile(src[:2], 2)) / size, 0, 1).astype(F32)
    return proj if box_size(proj) > 0 else None


def meets_emit(src: np.ndarray, box: np.ndarray, emit: caffe_pb2.EmitConstraint) -> bool:
    """``MeetEmitConstraint``: the box centre lies in ``src``, or ``src`` covers enough of it."""
    if emit.emit_type == caffe_pb2.EmitConstraint.CENTER:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return bool(src[0] <= cx <= src[2] and src[1] <= cy <= src[3])
    return bool(coverage(box, src) > F32(emit.emit_overlap))


def resize_box(param: caffe_pb2.ResizeParameter, width: int, height: int,
               box: np.ndarray) -> np.ndarray:
    """``UpdateBBoxByResizePolicy``: where the box lands after WARP or FIT_LARGE_SIZE_AND_PAD."""
    new_h, new_w = F32(param.height), F32(param.width)
    x0, y0, x1, y1 = box * np.array([width, height, width, height], F32)
    aspect = F32(width) / F32(height)
    sx, sy = new_w, new_h              # the size the image content is scaled to
    pad_x = pad_y = F32(0)
    if param.resize_mode == _Resize.FIT_LARGE_SIZE_AND_PAD:
        if aspect > new_w / new_h:
            pad_y = (new_h - new_w / aspect) / 2
            sy = new_h - 2 * pad_y
        else:
            pad_x = (new_w - aspect * new_h) / 2
            sx = new_w - 2 * pad_x
    x0, x1 = pad_x + max(F32(0), x0 * sx / width), pad_x + min(new_w, x1 * sx / width)
    y0, y1 = pad_y + max(F32(0), y0 * sy / height), pad_y + min(new_h, y1 * sy / height)
    return np.array([x0 / new_w, y0 / new_h, x1 / new_w, y1 / new_h], F32)


# -- the per-image steps ------------------------------------------------------------------
class _Augmenter:
    """The fork's annotated transforms for one layer (``transform_param`` and samplers)."""

    def __init__(self, param: caffe_pb2.TransformationParameter, samplers,
                 transformer: DataTransformer):
        self.p = param
        self.samplers = list(samplers)
        self.transformer = transformer
        self.emit = param.emit_constraint if param.HasField("emit_constraint") else None

    def transform_annotations(self, sample: Sample, crop: np.ndarray, mirror: bool,
                              resize: bool) -> list[tuple[int, list[Box]]]:
        """``TransformAnnotation``: boxes (resized, if asked) projected into ``crop``."""
        height, width = sample.image.shape[:2]
        out = []
        for label, group in sample.groups:
            kept = []
            for box in group:
                bbox = box.bbox
                if resize and self.p.HasField("resize_param"):
                    bbox = resize_box(self.p.resize_param, width, height, bbox)
                if self.emit is not None and not meets_emit(crop, bbox, self.emit):
                    continue
                proj = project(crop, bbox)
                if proj is None:
                    continue
                if mirror:
                    proj = np.array([1 - proj[2], proj[1], 1 - proj[0], proj[3]], F32)
                kept.append(Box(proj, box.instance, box.difficult))
            if kept:
                out.append((label, kept))
        return out

    def distort(self, rng: np.random.Generator, sample: Sample) -> None:
        """``ApplyDistort``: brightness, contrast, saturation and hue in one of two orders."""
        if not (self.p.HasField("distort_param") and sample.encoded):
            return   # the fork distorts encoded images only
        d = self.p.distort_param
        contrast = (d.contrast_prob, d.contrast_lower, d.contrast_upper)
        saturation = (d.saturation_prob, d.saturation_lower, d.saturation_upper)
        image = sample.image
        contrast_first = rng.uniform(0, 1) > 0.5
        image = _maybe(rng, image, d.brightness_prob, -d.brightness_delta, d.brightness_delta,
                       lambda im, v: _convert(im, 1, v))
        if contrast_first:
            image = _maybe(rng, image, *contrast, lambda im, v: _convert(im, v, 0))
        image = _maybe(rng, image, *saturation, lambda im, v: _hsv(im, 1, v, 0))
        image = _maybe(rng, image, d.hue_prob, -d.hue_delta, d.hue_delta,
                       lambda im, v: _hsv(im, 0, 1, v))
        if not contrast_first:
            image = _maybe(rng, image, *contrast, lambda im, v: _convert(im, v, 0))
        if rng.uniform(0, 1) < d.random_order_prob and image.ndim == 3:
            image = np.ascontiguousarray(image[:, :, rng.permutation(image.shape[2])])
        sample.image = image
        sample.reencode()

    def expand(self, rng: np.random.Generator, sample: Sample) -> Sample:
        """``ExpandImage``: place the image at a random spot of a canvas up to
        ``max_expand_ratio`` times larger, filled with the mean."""
        e = self.p.expand_param
        if not self.p.HasField("expand_param") or rng.uniform(0, 1) > e.prob \
                or abs(e.max_expand_ratio - 1) < 1e-2:
            return sample
        ratio = F32(rng.uniform(1, e.max_expand_ratio))
        img_h, img_w = sample.image.shape[:2]
        height, width = int(img_h * ratio), int(img_w * ratio)
        h_off = np.floor(F32(rng.uniform(0, height - img_h)))
        w_off = np.floor(F32(rng.uniform(0, width - img_w)))
        canvas = np.zeros((height, width, *sample.image.shape[2:]), np.uint8)
        canvas[...] = self._fill(sample.image)
        canvas[int(h_off):int(h_off) + img_h, int(w_off):int(w_off) + img_w] = sample.image
        box = np.array([-w_off / img_w, -h_off / img_h, (width - w_off) / img_w,
                        (height - h_off) / img_h], F32)
        out = Sample(canvas, sample.encoded, self.transform_annotations(sample, box, False, False))
        out.reencode()
        return out

    def _fill(self, image: np.ndarray) -> np.ndarray:
        """The canvas colour: the mean (values rounded to uint8, as cv::Mat assignment does)."""
        t = self.transformer
        channels = image.shape[2] if image.ndim == 3 else 1
        if t.mean_file is not None:
            raise DataError("expand_param with a mean_file is not supported; use mean_value")
        if t.mean_values is None:
            return np.zeros(channels, np.uint8)
        values = np.broadcast_to(t.mean_values, (channels,))
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)

    def sample_crop(self, rng: np.random.Generator, sample: Sample) -> Sample:
        """``GenerateBatchSamples`` then ``CropImage`` on one of the accepted boxes."""
        candidates: list[np.ndarray] = []
        objects = sample.boxes()
        for sampler in self.samplers:
            if sampler.use_original_image:
                candidates += _generate(rng, sampler, objects)
        if not candidates:
            return sample
        return self.crop(sample, candidates[int(rng.integers(len(candidates)))])

    def jitter_crop(self, rng: np.random.Generator, sample: Sample, jitter: float) -> Sample:
        """MobileNet-YOLO's ``GenerateJitterSamples`` then ``CropImage``: with odds 0.2 the
        whole image, 0.2 a jitter of ``jitter / 2``, 0.6 of ``jitter``: a box of width
        ``U(1 - jitter, 1)`` (height the same draw under FIT_LARGE_SIZE_AND_PAD, else its
        own) at a uniform offset inside the image."""
        change = int(rng.choice(3, p=[0.2, 0.2, 0.6]))
        if change == 0:
            return self.crop(sample, UNIT)
        amount = F32(jitter / 2 if change == 1 else jitter)
        width = F32(rng.uniform(1 - amount, 1))
        keep = self.p.HasField("resize_param") and \
            self.p.resize_param.resize_mode == _Resize.FIT_LARGE_SIZE_AND_PAD
        height = width if keep else F32(rng.uniform(1 - amount, 1))
        x = F32(rng.uniform(0, 1 - width))
        y = F32(rng.uniform(0, 1 - height))
        return self.crop(sample, np.array([x, y, x + width, y + height], F32))

    def crop(self, sample: Sample, box: np.ndarray) -> Sample:
        """``CropImage``: the image inside ``box`` (normalised, clipped to the image) and
        the annotations projected into it."""
        crop = np.clip(box, 0, 1).astype(F32)
        height, width = sample.image.shape[:2]
        x0, y0, x1, y1 = crop * np.array([width, height, width, height], F32)
        w_off, h_off, w, h = int(x0), int(y0), int(x1 - x0), int(y1 - y0)
        out = Sample(np.ascontiguousarray(sample.image[h_off:h_off + h, w_off:w_off + w]),
                     sample.encoded, self.transform_annotations(sample, crop, False, False))
        out.reencode()
        return out

    def output_shape(self, image: np.ndarray, source: str) -> tuple[int, int, int]:
        """``InferBlobShape``: the CxHxW an image becomes (after resize_param and crop)."""
        channels = image.shape[2] if image.ndim == 3 else 1
        size = image.shape[:2]
        if self.p.HasField("resize_param"):
            size = (self.p.resize_param.height, self.p.resize_param.width)
        return self.transformer.output_shape((channels, *size), source)

    def resize(self, rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
        """``ApplyResize`` (WARP or FIT_LARGE_SIZE_AND_PAD), interpolation drawn among the
        listed ``interp_mode`` values (LINEAR when none)."""
        if not self.p.HasField("resize_param"):
            return image
        r = self.p.resize_param
        modes = list(r.interp_mode)
        interp = _INTERP[modes[int(rng.integers(len(modes)))]] if modes else cv2.INTER_LINEAR
        if r.resize_mode == _Resize.WARP:
            return cv2.resize(image, (r.width, r.height), interpolation=interp)
        height, width = image.shape[:2]
        aspect = F32(width) / F32(height)
        pad = np.broadcast_to(np.asarray(r.pad_value or [0], np.float64),
                              (image.shape[2] if image.ndim == 3 else 1,))
        if aspect > F32(r.width) / F32(r.height):
            size = (r.width, int(np.floor(F32(r.width) / aspect)))
            resized = cv2.resize(image, size, interpolation=interp)
            top = (r.height - size[1]) // 2
            borders = (top, r.height - size[1] - top, 0, 0)
        else:
            size = (int(np.floor(r.height * aspect)), r.height)
            resized = cv2.resize(image, size, interpolation=interp)
            left = (r.width - size[0]) // 2
            borders = (0, 0, left, r.width - size[0] - left)
        out = cv2.copyMakeBorder(resized, *borders, _PAD[r.pad_mode], value=tuple(pad.tolist()))
        return out.reshape(r.height, r.width, *image.shape[2:])

    def finish(self, rng: np.random.Generator, sample: Sample, out: np.ndarray,
               source: str) -> list[tuple[int, list[Box]]]:
        """``Transform``: resize, then the crop, mirror, mean and scale of ``transform_param``
        into ``out``; returns the boxes as they end up."""
        image = hwc_to_chw(self.resize(rng, sample.image))
        t = self.transformer
        draw = t.draws(rng, 1)
        draw = None if draw is None else draw[0]
        t(image, out, draw, source)
        # the decisions DataTransformer.__call__ took from the same draw
        _, height, width = image.shape
        crop_h, crop_w = out.shape[1:]
        h_off, w_off = (height - crop_h) // 2, (width - crop_w) // 2
        if t.crop[0] and t.train:
            h_off, w_off = int(draw[1] % (height - crop_h + 1)), int(draw[2] % (width - crop_w + 1))
        crop = np.array([w_off / width, h_off / height, (w_off + crop_w) / width,
                         (h_off + crop_h) / height], F32)
        mirror = bool(t.mirror and draw[0] % 2)
        return self.transform_annotations(sample, crop, mirror, True)


def _maybe(rng: np.random.Generator, image: np.ndarray, prob: float, lower: float,
           upper: float, adjust) -> np.ndarray:
    """One ``Random*`` step: with probability ``prob`` adjust by a uniform draw."""
    if rng.uniform(0, 1) < prob:
        if upper < lower:
            raise DataError(f"distort_param: empty range [{lower:g}, {upper:g}]")
        return adjust(image, F32(rng.uniform(lower, upper)))
    return image


def _convert(image: np.ndarray, alpha: F32, beta: F32) -> np.ndarray:
    """cv::Mat::convertTo(-1, alpha, beta): ``round(alpha * x + beta)`` saturated to uint8."""
    if alpha == 1 and beta == 0:
        return image
    return np.clip(np.rint(image.astype(F32) * alpha + beta), 0, 255).astype(np.uint8)


def _hsv(image: np.ndarray, channel: int, alpha: F32, beta: F32) -> np.ndarray:
    """AdjustSaturation / AdjustHue: convertTo on one channel of OpenCV's 8-bit HSV."""
    if image.ndim != 3 or (alpha == 1 and beta == 0):
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[:, :, channel] = _convert(hsv[:, :, channel], alpha, beta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _generate(rng: np.random.Generator, sampler: caffe_pb2.BatchSampler,
              objects: np.ndarray) -> list[np.ndarray]:
    """``GenerateSamples``: up to ``max_sample`` of ``max_trials`` random boxes that pass the
    ``sample_constraint`` against some object."""
    s, c = sampler.sampler, sampler.sample_constraint
    found: list[np.ndarray] = []
    for _ in range(sampler.max_trials):
        if sampler.HasField("max_sample") and len(found) >= sampler.max_sample:
            break
        scale = F32(rng.uniform(s.min_scale, s.max_scale))
        lo = max(F32(s.min_aspect_ratio), F32(scale ** 2))
        hi = min(F32(s.max_aspect_ratio), F32(1 / scale ** 2))
        aspect = F32(rng.uniform(lo, hi))
        w, h = scale * np.sqrt(aspect), scale / np.sqrt(aspect)
        x, y = F32(rng.uniform(0, 1 - w)), F32(rng.uniform(0, 1 - h))
        box = np.array([x, y, x + w, y + h], F32)
        if _satisfies(box, objects, c):
            found.append(box)
    return found


def _satisfies(box: np.ndarray, objects: np.ndarray, c: caffe_pb2.SampleConstraint) -> bool:
    """``SatisfySampleConstraint``: no constraint passes; else some object meets them all."""
    checks = []
    if c.HasField("min_jaccard_overlap") or c.HasField("max_jaccard_overlap"):
        checks.append((lambda o: jaccard(box[None], o[None])[0, 0], "jaccard_overlap"))
    if c.HasField("min_sample_coverage") or c.HasField("max_sample_coverage"):
        checks.append((lambda o: coverage(box, o), "sample_coverage"))
    if c.HasField("min_object_coverage") or c.HasField("max_object_coverage"):
        checks.append((lambda o: coverage(o, box), "object_coverage"))
    if not checks:
        return True
    for obj in objects:
        if all((not c.HasField(f"min_{name}") or value(obj) >= F32(getattr(c, f"min_{name}")))
               and (not c.HasField(f"max_{name}") or value(obj) <= F32(getattr(c, f"max_{name}")))
               for value, name in checks):
            return True
    return False


# -- the layer --------------------------------------------------------------------------------
@register("AnnotatedData")
class AnnotatedData(_PrefetchingLayer):
    """Batches of images and boxes from an LMDB of AnnotatedDatum records (SSD's data layer).

    Tops: data (N, C, H, W) and, when named, the label (1, 1, boxes, 8) with rows
    ``[item, group_label, instance_id, xmin, ymin, xmax, ymax, difficult]``; a batch
    without boxes gives one row of -1. Records without an annotation type (and no
    ``annotated_data_param.anno_type``) give Data's per-image label (N, 1, 1, 1) instead.

    MobileNet-YOLO's ``yolo_data_type: 1`` (for its Yolov3/RegionLoss layers): without a
    ``batch_sampler`` each image is cropped by the fork's jitter, in every phase as in the
    fork (see :meth:`_Augmenter.jitter_crop`, ``yolo_data_jitter``, default 0.3), and the
    label is (N, 1, 300, 5) with rows ``[group_label - 1, x_centre, y_centre, width,
    height]`` per image, zeros after its boxes; difficult boxes are left out unless
    ``train_diffcult``. An image with more than 300 boxes keeps its first 300 (the fork
    writes past its rows). ``yolo_data_type: 0`` is SSD's layout. The fork's multi-scale
    training (several ``resize_param`` policies drawn per batch) is not available: this
    schema has one ``resize_param``, and repeated blocks merge into it.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p, a = spec.param.data_param, spec.param.annotated_data_param
        t = spec.param.transform_param
        self.batch_size = self._positive(p.batch_size, "data_param.batch_size")
        for name in _SEG_FIELDS:
            if a.HasField(name):
                raise self.error(f"annotated_data_param.{name} (MobileNet-YOLO fork) is not "
                                 f"supported")
        if a.yolo_data_type not in (0, 1):
            raise self.error(f"annotated_data_param.yolo_data_type must be 0 (SSD rows) or 1 "
                             f"(YOLO rows), got {a.yolo_data_type}")
        if not 0 <= a.yolo_data_jitter < 1:
            raise self.error(f"annotated_data_param.yolo_data_jitter must be in [0, 1), got "
                             f"{a.yolo_data_jitter:g}")
        self.yolo = a.yolo_data_type == 1
        self.jitter = float(np.float32(a.yolo_data_jitter))
        self.train_difficult = bool(a.train_diffcult)
        if t.HasField("noise_param"):
            raise self.error("transform_param.noise_param is not supported")
        if t.resize_param.resize_mode == _Resize.FIT_SMALL_SIZE:
            raise self.error("resize_param.resize_mode FIT_SMALL_SIZE (images of varying "
                             "size) is not supported; use WARP or FIT_LARGE_SIZE_AND_PAD")
        if t.HasField("resize_param") and (t.resize_param.height <= 0 or t.resize_param.width <= 0):
            raise self.error("resize_param needs positive height and width")
        for k, s in enumerate(a.batch_sampler):
            r = s.sampler
            if not (0 < r.min_scale <= r.max_scale <= 1
                    and 0 < r.min_aspect_ratio <= r.max_aspect_ratio):
                raise self.error(f"batch_sampler {k}: expected 0 < min_scale <= max_scale <= 1 "
                                 f"and 0 < min_aspect_ratio <= max_aspect_ratio, got scale "
                                 f"[{r.min_scale:g}, {r.max_scale:g}], aspect ratio "
                                 f"[{r.min_aspect_ratio:g}, {r.max_aspect_ratio:g}]")
        plain = caffe_pb2.TransformationParameter()
        plain.CopyFrom(t)
        for name in _FORK_FIELDS:
            plain.ClearField(name)
        declared = None
        if p.HasField("backend"):
            declared = "lmdb" if p.backend == caffe_pb2.DataParameter.LMDB else "leveldb"
        source = self.resolve_path(p.source, "data_param.source")
        with self._naming():
            transformer = DataTransformer(plain, spec.phase, self.resolve_path)
            self.augment = _Augmenter(t, a.batch_sampler, transformer)
            self.transformer = transformer
            self.reader = RecordReader(source, declared)
            self.rng = seeded_rng()
            for _ in range(int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0):
                self.reader.next()
            key, value = self.reader.peek()
            first, what = self._parse(key, value)
            self.forced_type = a.HasField("anno_type")
            self.anno_type = a.anno_type if self.forced_type else \
                (first.type if first.HasField("type") else None)
            self._start(self.augment.output_shape(self._sample(first, what).image, what),
                        p.prefetch)
        boxes = sum(len(g.annotation) for g in first.annotation_group)
        if self.anno_type is None:
            self.label_shape = (self.batch_size, 1, 1, 1)
        elif self.yolo:
            self.label_shape = (self.batch_size, 1, YOLO_TRUTHS, 5)
        else:
            self.label_shape = (1, 1, max(boxes, 1), 8)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [self.top_shape, self.label_shape][:self.num_tops]

    def _parse(self, key: bytes, value: bytes) -> tuple[caffe_pb2.AnnotatedDatum, str]:
        what = f"record '{key.decode(errors='replace')}' of '{self.reader.path}'"
        try:
            return caffe_pb2.AnnotatedDatum.FromString(value), what
        except Exception as exc:
            raise DataError(f"{what}: not an AnnotatedDatum (corrupt record?): {exc}") from None

    def _sample(self, record: caffe_pb2.AnnotatedDatum, what: str) -> Sample:
        t = self.transformer
        chw = datum_image(record.datum, what, t.force_color, t.force_gray)
        if chw.dtype != np.uint8:
            raise DataError(f"{what}: AnnotatedData needs 8-bit images, got float_data")
        image = np.ascontiguousarray(chw.transpose(1, 2, 0))
        groups = [(g.group_label, [Box(np.array([a.bbox.xmin, a.bbox.ymin, a.bbox.xmax,
                                                 a.bbox.ymax], F32), a.instance_id,
                                       a.bbox.difficult) for a in g.annotation])
                  for g in record.annotation_group]
        return Sample(image, bool(record.datum.encoded), groups)

    def _plan(self) -> tuple[list[tuple[bytes, bytes]], np.ndarray]:
        records = [self.reader.next() for _ in range(self.batch_size)]
        return records, self.rng.integers(0, 2**63, size=self.batch_size)

    def _build(self, plan: tuple[list[tuple[bytes, bytes]], np.ndarray]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        records, seeds = plan
        data = self._batches.take(self.top_shape)
        out = data.numpy()
        rows: list[list[float]] = []
        labels = np.empty(self.batch_size, F32)
        for item, ((key, value), seed) in enumerate(zip(records, seeds)):
            record, what = self._parse(key, value)
            if self.anno_type is not None and self.anno_type != record.type and \
                    not self.forced_type:
                raise DataError(f"{what}: annotation type {record.type} differs from the "
                                f"first record's {self.anno_type}")
            rng = np.random.default_rng(int(seed))
            sample = self._sample(record, what)
            self.augment.distort(rng, sample)
            sample = self.augment.expand(rng, sample)
            if self.augment.samplers:
                sample = self.augment.sample_crop(rng, sample)
            elif self.yolo:
                sample = self.augment.jitter_crop(rng, sample, self.jitter)
            if out.shape[1:] != self.augment.output_shape(sample.image, what):
                raise DataError(f"{what}: image size differs from the batch's first image; "
                                f"give transform_param.resize_param or crop_size")
            groups = self.augment.finish(rng, sample, out[item], what)
            labels[item] = record.datum.label
            rows += [[item, label, b.instance, *b.bbox, b.difficult]
                     for label, group in groups for b in group]
        if self.anno_type is None:
            return data, torch.from_numpy(labels).view(-1, 1, 1, 1)
        if self.yolo:
            return data, torch.from_numpy(self._yolo_rows(rows))
        table = np.array(rows, F32).reshape(-1, 8) if rows else np.full((1, 8), -1, F32)
        return data, torch.from_numpy(table).view(1, 1, -1, 8)

    def _yolo_rows(self, rows: list[list]) -> np.ndarray:
        """SSD rows as the fork's ``yolo_data_type: 1`` label (N, 1, 300, 5)."""
        table = np.zeros((self.batch_size, YOLO_TRUTHS, 5), F32)
        filled = np.zeros(self.batch_size, np.int64)
        for item, label, _, xmin, ymin, xmax, ymax, difficult in rows:
            if (difficult and not self.train_difficult) or filled[item] == YOLO_TRUTHS:
                continue
            table[item, filled[item]] = [F32(label - 1), (xmin + xmax) / F32(2),
                                         (ymin + ymax) / F32(2), xmax - xmin, ymax - ymin]
            filled[item] += 1
        return table.reshape(self.batch_size, 1, YOLO_TRUTHS, 5)
