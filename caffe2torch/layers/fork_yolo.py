"""The YOLO layers of MobileNet-YOLO (eric612), a Caffe fork.

Reorg (YOLOv2's passthrough), YoloDetectionOutput (YOLOv2 decoding and NMS),
Yolov3DetectionOutput (YOLOv3 decoding and NMS), the training losses Yolov3 and YoloSeg,
and the LaneData data layer. Their ``*_param`` messages carry the fork's field numbers
(caffe.proto, "fork: MobileNet-YOLO"). AnnotatedData's ``yolo_data_type`` lives with
AnnotatedData in :mod:`.ssd_data`.

Both detection outputs pool the detections of every image of a batch (image id 0), as
the fork does, and write rows ``[0, label + 1, score, xmin, ymin, xmax, ymax]`` of
(1, 1, K, 7), or one row of -1 per image (its id first) when nothing is found.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .base import CaffeLayer, LayerSpec, Shape
from .data import _PrefetchingLayer
from .loss import LossValue, _LossLayer, _scalar
from .registry import register

F32 = np.float32


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The fork's ``1. / (1. + exp(-x))`` rounded to float."""
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(F32)


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MobileNet-YOLO's box_iou on (x, y, w, h) boxes (last axis), float32, broadcasting.

    Overlaps below 0 on either axis give an intersection of 0; the union is
    ``area(a) + area(b) - intersection``.
    """
    half = F32(2)

    def overlap(c1, s1, c2, s2):
        left = np.maximum(c1 - s1 / half, c2 - s2 / half)
        right = np.minimum(c1 + s1 / half, c2 + s2 / half)
        return right - left

    with np.errstate(all="ignore"):    # inf/nan boxes give nan, as in the fork
        w = overlap(a[..., 0], a[..., 2], b[..., 0], b[..., 2])
        h = overlap(a[..., 1], a[..., 3], b[..., 1], b[..., 3])
        inter = np.where((w < 0) | (h < 0), F32(0), w * h)
        return inter / (a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter)


# -- detection outputs ---------------------------------------------------------------------
class _Candidates:
    """Detections gathered over the bottoms, in the layer's push_back order."""

    def __init__(self) -> None:
        self.boxes: list[np.ndarray] = []   # (x, y, w, h) float32
        self.classes: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []

    def add(self, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        self.boxes.append(boxes)
        self.classes.append(classes)
        self.scores.append(scores)

    def rows(self, nms_threshold: np.float32, num_images: int,
             device: torch.device) -> torch.Tensor:
        """Sorted by score (ties keep the push_back order; the fork's std::sort leaves
        their order unspecified), a box dropped when its IoU with a kept higher one is
        ``>= nms_threshold`` whatever the classes (ApplyNms), as (1, 1, K, 7) rows."""
        if self.boxes:
            boxes, classes = np.concatenate(self.boxes), np.concatenate(self.classes)
            scores = np.concatenate(self.scores)
        else:
            boxes, classes = np.zeros((0, 4), F32), np.zeros(0, np.int64)
            scores = np.zeros(0, F32)
        order = np.argsort(-scores, kind="stable")
        boxes, classes, scores = boxes[order], classes[order], scores[order]
        dead = np.zeros(len(scores), bool)
        for i in range(len(scores) - 1):
            if not dead[i]:
                dead[i + 1:] |= _box_iou(boxes[i], boxes[i + 1:]) >= nms_threshold
        keep = ~dead
        if not keep.any():
            rows = np.full((num_images, 7), -1, F32)
            rows[:, 0] = np.arange(num_images)
            return torch.from_numpy(rows).view(1, 1, -1, 7).to(device)
        b = boxes[keep].astype(np.float64)
        rows = np.column_stack([np.zeros(keep.sum()), classes[keep] + 1, scores[keep],
                                b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2,
                                b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2])
        return torch.from_numpy(rows.astype(F32)).view(1, 1, -1, 7).to(device)


def _host(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float32).numpy()


@register("Yolov3DetectionOutput")
class Yolov3DetectionOutput(CaffeLayer):
    """MobileNet-YOLO's YOLOv3 decoder with class-agnostic NMS (CPU path).

    Bottom t (one per ``mask_group_num``) is (N, num_box * (5 + num_classes), S, S).
    Per cell and anchor n: ``x = (col + sigmoid(tx)) / S``, ``y = (row + sigmoid(ty)) / S``,
    ``w = exp(tw) * biases[2m] / (S * anchors_scale[t])`` (h likewise with ``biases[2m+1]``),
    m = ``mask[n + t * mask_size / mask_group_num]``; each class with
    ``sigmoid(class) * sigmoid(obj) > confidence_threshold`` is a detection. All are
    sorted by score and NMS'd across classes (see the module docstring for the rows).
    No gradient.
    """

    min_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.yolov3_detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("yolov3_detection_output_param.num_classes must be specified")
        self.num_classes, self.num_box = int(p.num_classes), int(p.num_box)
        self.threshold = F32(p.confidence_threshold)
        self.nms_threshold = F32(p.nms_threshold)
        self.biases = np.asarray(p.biases, F32)
        self.anchors_scale = [int(s) for s in p.anchors_scale]
        self.mask = [int(m) for m in p.mask]
        groups = int(p.mask_group_num)
        if len(spec.param.bottom) != groups:
            raise self.error(f"mask_group_num is {groups}: expected {groups} bottoms, got "
                             f"{len(spec.param.bottom)}")
        self.mask_step = len(self.mask) // groups
        needed = (groups - 1) * self.mask_step + self.num_box
        if len(self.mask) < needed or len(self.anchors_scale) < groups:
            raise self.error(f"expected at least {needed} mask entries and {groups} anchors_scale "
                             f"values, got {len(self.mask)} and {len(self.anchors_scale)}")
        if len(self.mask) and 2 * max(self.mask) + 1 >= len(self.biases):
            raise self.error(f"mask index {max(self.mask)} needs biases[{2 * max(self.mask) + 1}], "
                             f"got {len(self.biases)} biases")

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Reshape's placeholder before any detection exists: one row."""
        return [(1, 1, 1, 7)]

    def _decode(self, t: int, x: torch.Tensor, found: _Candidates) -> None:
        n, c, height, side = x.shape
        length = 5 + self.num_classes
        if height != side or c < self.num_box * length:
            raise self.error(f"bottom {t} must be (N, >= {self.num_box * length}, S, S), got "
                             f"shape {list(x.shape)}")
        raw = x.detach().to("cpu", torch.float64).numpy()[:, :self.num_box * length]
        raw = raw.reshape(n, self.num_box, length, side * side)
        anchors = np.asarray(self.mask[t * self.mask_step:t * self.mask_step + self.num_box])
        size = float(side * self.anchors_scale[t])
        with np.errstate(over="ignore"):  # exp overflows to inf: sigmoid 0, box size inf
            sig = _sigmoid(raw)
            bw = (np.exp(raw[:, :, 2]) * self.biases[2 * anchors][None, :, None] / size) \
                .astype(F32)
            bh = (np.exp(raw[:, :, 3]) * self.biases[2 * anchors + 1][None, :, None] / size) \
                .astype(F32)
        cell = np.arange(side * side)
        col, row = (cell % side).astype(F32), (cell // side).astype(F32)
        side32 = F32(side)
        boxes = np.stack([(col + sig[:, :, 0]) / side32, (row + sig[:, :, 1]) / side32, bw, bh],
                         axis=-1)                                   # (N, A, S*S, 4)
        scores = sig[:, :, 5:] * sig[:, :, 4:5]                     # (N, A, C, S*S)
        # push_back order: image, cell, anchor, class
        scores = scores.transpose(0, 3, 1, 2)                       # (N, S*S, A, C)
        boxes = boxes.transpose(0, 2, 1, 3)                         # (N, S*S, A, 4)
        img, cel, anc, cls = np.nonzero(scores > self.threshold)
        found.add(boxes[img, cel, anc], cls, scores[img, cel, anc, cls])

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        found = _Candidates()
        for t, x in enumerate(bottoms):
            self._decode(t, x, found)
        return found.rows(self.nms_threshold, bottoms[-1].shape[0], bottoms[0].device)


@register("YoloDetectionOutput")
class YoloDetectionOutput(CaffeLayer):
    """MobileNet-YOLO's YOLOv2 decoder (yolo_detection_output_layer.cpp, Forward_cpu).

    Bottom (N, C, S, S) holds ``num_box`` anchors of ``C / num_box`` channels each
    (x, y, w, h, objectness, then ``num_classes`` class scores). Per cell (row j, column i)
    and anchor n: ``x = (i + sigmoid(tx)) / S``, ``y = (j + sigmoid(ty)) / S``,
    ``w = exp(tw) * biases[2n] / S``, ``h = exp(th) * biases[2n+1] / S`` (biases in grid
    cells), the class is the argmax of the softmax over the class scores (first of equal
    maxima) and the score ``sigmoid(obj) * max softmax``; anchors with score
    ``>= confidence_threshold`` are kept, one detection each. A second bottom (the fork
    reads at most two) is decoded the same way with the same biases. Then class-agnostic
    NMS and the rows of the module docstring, boxes not clipped. ``side`` and ``coords``
    are read but unused, as in the fork (the side is the bottom's width). No gradient.
    """

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.yolo_detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("yolo_detection_output_param.num_classes must be specified")
        self.num_classes, self.num_box = int(p.num_classes), int(p.num_box)
        if self.num_box < 1:
            raise self.error(f"yolo_detection_output_param.num_box must be positive, got "
                             f"{self.num_box}")
        self.threshold = F32(p.confidence_threshold)
        self.nms_threshold = F32(p.nms_threshold)
        self.biases = np.asarray(p.biases, F32)
        if len(self.biases) < 2 * self.num_box:
            raise self.error(f"num_box {self.num_box} needs {2 * self.num_box} biases (w, h "
                             f"per anchor), got {len(self.biases)}")
        if p.HasField("label_map_file") and p.label_map_file:
            # The fork reads it for names it never writes to the top; only its presence matters.
            self.resolve_path(p.label_map_file, "yolo_detection_output_param.label_map_file")
        for t, shape in enumerate(spec.bottom_shapes):
            self._check(t, shape)

    def _check(self, t: int, shape: Sequence[int]) -> None:
        need = 5 + self.num_classes
        if len(shape) != 4 or shape[2] != shape[3] or shape[1] % self.num_box \
                or shape[1] // self.num_box < need:
            raise self.error(f"bottom {t} must be (N, num_box * L, S, S) with num_box "
                             f"{self.num_box} and L >= {need} (x, y, w, h, objectness and "
                             f"{self.num_classes} classes), got shape {list(shape)}")

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Reshape's placeholder before any detection exists: one row."""
        return [(1, 1, 1, 7)]

    def _decode(self, t: int, x: torch.Tensor, found: _Candidates) -> None:
        self._check(t, tuple(x.shape))
        n, c, _, side = x.shape
        raw = _host(x).reshape(n, self.num_box, c // self.num_box, side * side)
        cell = np.arange(side * side)
        col, row = (cell % side).astype(F32), (cell // side).astype(F32)
        side32 = F32(side)
        bias_w = self.biases[0:2 * self.num_box:2][None, :, None]
        bias_h = self.biases[1:2 * self.num_box:2][None, :, None]
        boxes = np.stack([(col + _sigmoid(raw[:, :, 0])) / side32,
                          (row + _sigmoid(raw[:, :, 1])) / side32,
                          np.exp(raw[:, :, 2]) * bias_w / side32,
                          np.exp(raw[:, :, 3]) * bias_h / side32], axis=-1)   # (N, A, S*S, 4)
        objectness = _sigmoid(raw[:, :, 4])
        logits = raw[:, :, 5:5 + self.num_classes]                         # (N, A, C, S*S)
        e = np.exp(logits - logits.max(axis=2, keepdims=True))
        total = e[:, :, 0].copy()
        for k in range(1, self.num_classes):    # the fork's sum, in float and in order
            total += e[:, :, k]
        prob = e / total[:, :, None]
        classes = prob.argmax(axis=2)
        scores = objectness * prob.max(axis=2)                             # (N, A, S*S)
        # push_back order: image, row, column, anchor
        boxes, classes, scores = (boxes.transpose(0, 2, 1, 3), classes.transpose(0, 2, 1),
                                  scores.transpose(0, 2, 1))
        keep = scores >= self.threshold
        found.add(boxes[keep], classes[keep], scores[keep])

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        found = _Candidates()
        for t, x in enumerate(bottoms):
            self._decode(t, x, found)
        return found.rows(self.nms_threshold, bottoms[0].shape[0], bottoms[0].device)


# -- Reorg ---------------------------------------------------------------------------------
@register("Reorg")
class Reorg(CaffeLayer):
    """YOLOv2's passthrough reorganisation, in darknet's element order.

    darknet's ``reorg_cpu(x, w, h, c, batch, stride, forward, out)`` views the same buffer
    as (c, h, w) and as (c / stride^2, h * stride, w * stride) and moves element
    ``(k, j, i)`` of the first view to/from ``(k % c', j * stride + (k / c') / stride,
    i * stride + (k / c') % stride)`` of the second (c' = c / stride^2). The fork calls it
    with the bottom's (c, h, w) and ``forward = reverse``:

    * default: top (N, C * s^2, H / s, W / s) is the buffer read through that map
      (``top[k, j, i] = bottom'[...]``), i.e. darknet's ``[reorg]`` layer (which is not
      the usual space-to-depth order);
    * ``reverse: true``: top (N, C / s^2, H * s, W * s) is the buffer written through it.

    The gradient is the inverse permutation (darknet's backward_reorg_layer). The fork's
    own Backward_cpu reads an unused internal blob instead of the top diff, so its CPU
    gradient is zero; that is not reproduced.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.reorg_param
        if not p.HasField("stride"):
            raise self.error("reorg_param.stride must be set")
        self.stride, self.reverse = int(p.stride), bool(p.reverse)
        if self.stride < 1:
            raise self.error(f"reorg_param.stride must be positive, got {self.stride}")
        if spec.param.top[0] == spec.param.bottom[0]:
            raise self.error("does not allow in-place computation: give the top its own name")
        for shape in spec.bottom_shapes:
            self._check(tuple(shape))

    def _check(self, shape: tuple[int, ...]) -> None:
        s = self.stride
        if len(shape) != 4 or shape[1] % (s * s) or \
                (not self.reverse and (shape[2] % s or shape[3] % s)):
            spatial = "" if self.reverse else f" and height and width multiples of {s}"
            raise self.error(f"expected a 4-D bottom (N, C, H, W) with C a multiple of "
                             f"stride^2 = {s * s}{spatial}, got shape {list(shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(tuple(x.shape))
        n, c, h, w = x.shape
        s = self.stride
        part = c // (s * s)
        if self.reverse:
            return x.reshape(n, s, s, part, h, w).permute(0, 3, 4, 1, 5, 2) \
                .reshape(n, part, h * s, w * s)
        return x.reshape(n, part, h, s, w, s).permute(0, 3, 5, 1, 2, 4) \
            .reshape(n, c * s * s, h // s, w // s)


# -- Yolov3 loss ---------------------------------------------------------------------------
@register("Yolov3")
class Yolov3(_LossLayer):
    """MobileNet-YOLO's YOLOv3 training loss (yolov3_layer.cpp, Forward_cpu/Backward_cpu).

    Bottoms: predictions (N, num * (5 + num_class), H, W), raw, anchor-major with fields
    x, y, w, h, objectness, classes; ground truth with 300 rows ``[class, x, y, w, h]`` per
    image (1500 values, AnnotatedData's ``yolo_data_type: 1``), zero rows ending the list.
    ``p = sigmoid`` of every field but w and h. The fork builds a "delta" blob d:

    * every anchor's objectness: ``d = p`` unless its box (decoded like
      Yolov3DetectionOutput with ``mask[n]``'s anchor, over ``W * anchors_scale``) has an
      IoU ``> thresh`` with a truth (truths read until one with x == 0), then 0;
    * each truth (read until one with w == 0), in order: the anchor of best IoU over all
      ``biases`` (shapes compared centred, first maximum wins); if ``mask[:num]`` holds it
      (at index m), cell ``(int(x * W), int(y * H))`` of anchor m gets
      ``d_x = -s * (x * W - i - p_x)``, ``d_y`` likewise, ``d_w = -s * (log(w * W *
      anchors_scale / bias_w) - t_w)``, ``d_h`` likewise with
      ``s = coord_scale * (2 - w * h)``, ``d_obj = -(1 - p_obj)`` (times ``object_scale``
      with ``use_logic_gradient``) and class deltas ``-class_scale * (onehot - p_c)``;
      a later truth on the same anchor overwrites, except that when the class block is
      already set it only sets ``d_label = -(1 - p_label)``. ``use_focal_loss`` scales a
      fresh class block by ``0.5 * -(1 - q) * (2 q log q + q - 1)``, q = ``p_label``.

    The top is ``sum(d^2) / N``; the gradient is ``d * top_diff / N`` (with
    ``use_logic_gradient``, ``d * p * (1 - p)`` on all fields but w and h), which is the
    gradient of the fork's cross-entropy-style objective, not of the value it reports.
    Indices are flat as in the fork (a class label past ``num_class`` lands in the next
    field); a truth whose cell falls outside the blob is an error.

    Not done: the fork's unreachable ``best_iou > 1`` branch, and its later GIoU variant
    (``iou_loss``/``iou_normalizer``, fields absent from the fork's published caffe.proto);
    ``noobject_scale`` is read but unused, as in the fork.
    """

    TRUTHS = 300

    def configure(self, spec: LayerSpec) -> None:
        p = spec.param.yolov3_param
        self.num_class, self.num = int(p.num_class), int(p.num)
        self.anchors_scale = int(p.anchors_scale)
        self.object_scale, self.class_scale = F32(p.object_scale), F32(p.class_scale)
        self.coord_scale, self.thresh = F32(p.coord_scale), F32(p.thresh)
        self.logic_gradient, self.focal = bool(p.use_logic_gradient), bool(p.use_focal_loss)
        self.biases = np.asarray(p.biases, F32)
        self.mask = [int(m) for m in p.mask]
        if self.num < 1 or self.anchors_scale < 1:
            raise self.error(f"yolov3_param.num and anchors_scale must be positive, got "
                             f"{self.num} and {self.anchors_scale}")
        if len(self.mask) < self.num:
            raise self.error(f"yolov3_param needs num = {self.num} mask entries, got "
                             f"{len(self.mask)}")
        used = max(self.mask[:self.num])
        if 2 * used + 1 >= len(self.biases):
            raise self.error(f"mask index {used} needs biases[{2 * used + 1}], got "
                             f"{len(self.biases)} biases")

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        data, label = shapes[0], shapes[1]
        length = 5 + self.num_class
        if len(data) != 4 or data[1] != self.num * length:
            raise self.error(f"predictions must be (N, num * (5 + num_class) = "
                             f"{self.num * length}, H, W), got shape {list(data)}")
        if math.prod(label[1:]) != self.TRUTHS * 5:
            raise self.error(f"the ground truth must hold {self.TRUTHS} rows of [class, x, y, "
                             f"w, h] per image ({self.TRUTHS * 5} values), got shape "
                             f"{list(label)}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        x, label = bottoms
        self.check_shapes([tuple(x.shape), tuple(label.shape)])
        n, c, height, width = x.shape
        stride, length = height * width, 5 + self.num_class
        raw = _host(x).reshape(-1)
        truths = _host(label).reshape(n, self.TRUTHS, 5)
        field = (np.arange(c) % length).repeat(stride)                # field of each value
        linear = np.tile((field == 2) | (field == 3), n)
        swap = np.where(linear, raw, _sigmoid(raw))
        diff = np.zeros_like(swap)
        planes = swap.reshape(n, self.num, length, stride)
        obj = diff.reshape(n, self.num, length, stride)[:, :, 4]
        cell = np.arange(stride)
        col, row = (cell % width).astype(F32), (cell // width).astype(F32)
        size_w, size_h = F32(width * self.anchors_scale), F32(height * self.anchors_scale)
        masked = np.asarray(self.mask[:self.num])
        for b in range(n):
            boxes = np.stack([(col + planes[b, :, 0]) / F32(width),
                              (row + planes[b, :, 1]) / F32(height),
                              np.exp(planes[b, :, 2]) * self.biases[2 * masked, None] / size_w,
                              np.exp(planes[b, :, 3]) * self.biases[2 * masked + 1, None]
                              / size_h], axis=-1)                   # (num, H*W, 4)
            obj[b] = planes[b, :, 4]
            ends = np.nonzero(truths[b, :, 1] == 0)[0]
            listed = truths[b, :ends[0] if len(ends) else self.TRUTHS, 1:]
            if len(listed):
                iou = _box_iou(boxes[:, :, None, :], listed[None, None])
                best = np.where(np.isnan(iou), F32(0), iou).max(axis=2, initial=F32(0))
                obj[b][best > self.thresh] = 0
            self._assign(b, truths[b], swap, diff, c * stride, stride, width, height)
        loss = np.square(diff, dtype=np.float64).sum()
        grad = diff
        if self.logic_gradient:
            grad = np.where(linear, diff, diff * ((F32(1) - swap) * swap))
        grads = [torch.from_numpy(grad.reshape(x.shape)).to(x.device), None]
        total = torch.tensor(loss, dtype=torch.float32, device=x.device)
        return LossValue(_scalar(total, float(n)), float(n), grads)

    def _assign(self, b: int, truths: np.ndarray, swap: np.ndarray, diff: np.ndarray,
                count: int, stride: int, width: int, height: int) -> None:
        """The fork's per-truth loop for image b, on the flat blobs."""
        anchors = len(self.biases) // 2
        shapes = np.zeros((anchors, 4), F32)
        shapes[:, 2] = self.biases[0:2 * anchors:2] / F32(width * self.anchors_scale)
        shapes[:, 3] = self.biases[1:2 * anchors:2] / F32(height * self.anchors_scale)
        length = 5 + self.num_class
        total = len(diff)
        for t, (label, tx, ty, tw, th) in enumerate(truths):
            if tw == 0:
                break
            iou = _box_iou(shapes, np.array([0, 0, tw, th], F32))
            valid = ~np.isnan(iou) & (iou > 0)
            if not valid.any():
                continue
            best_n = int(np.argmax(np.where(valid, iou, F32(-1))))
            if best_n not in self.mask[:self.num]:
                continue
            m = self.mask[:self.num].index(best_n)
            i, j = int(tx * F32(width)), int(ty * F32(height))
            index = m * length * stride + j * width + i + b * count
            klass = int(label)
            touched = [index + k * stride for k in (*range(length), 5 + klass)]
            if min(touched) < 0 or max(touched) >= total:
                raise self.error(f"ground-truth row {t} of image {b} ([{label:g}, {tx:g}, {ty:g}, "
                                 f"{tw:g}, {th:g}]) addresses values outside the "
                                 f"{list((total // count, count))} prediction blob")
            scale = self.coord_scale * (F32(2) - tw * th)
            bias_w, bias_h = self.biases[2 * best_n], self.biases[2 * best_n + 1]
            targets = (tx * F32(width) - F32(i), ty * F32(height) - F32(j),
                       np.log(tw * F32(width * self.anchors_scale) / bias_w),
                       np.log(th * F32(height * self.anchors_scale) / bias_h))
            for k, target in enumerate(targets):
                at = index + k * stride
                diff[at] = -scale * (F32(target) - swap[at])
            at = index + 4 * stride
            diff[at] = -(F32(1) - swap[at])
            if self.logic_gradient:
                diff[at] *= self.object_scale
            self._class_delta(index + 5 * stride, klass, swap, diff, stride)

    def _class_delta(self, index: int, klass: int, p: np.ndarray, diff: np.ndarray,
                     stride: int) -> None:
        """delta_region_class_v3."""
        if diff[index]:
            at = index + stride * klass
            diff[at] = -(F32(1) - p[at])
            return
        at = index + stride * np.arange(self.num_class)
        onehot = (np.arange(self.num_class) == klass).astype(F32)
        diff[at] = -self.class_scale * (onehot - p[at])
        if self.focal:
            q = p[index + stride * klass] + F32(1e-15)
            with np.errstate(divide="ignore", invalid="ignore"):
                grad = -(F32(1) - q) * (F32(2) * q * np.log(q) + q - F32(1))
            diff[at] *= F32(0.5) * grad


# -- YoloSeg loss --------------------------------------------------------------------------
@register("YoloSeg")
class YoloSeg(_LossLayer):
    """MobileNet-YOLO's segmentation-head loss (yolo_seg.cpp, Forward_cpu/Backward_cpu).

    ``d = object_scale * (sigmoid(x) - label)`` element by element (the label blob has
    as many values as the predictions); the top is ``sum(d^2) / N`` and the gradient
    ``d * top_diff / N``. The fork declares a third bottom ("weighting of each class")
    that its CPU and GPU code never read; it is accepted and ignored, and so are
    ``num_class``, ``class_scale``, ``use_logic_gradient`` and ``use_hardsigmoid``.
    """

    min_bottoms, max_bottoms = 2, 3

    def configure(self, spec: LayerSpec) -> None:
        self.object_scale = F32(spec.param.yolo_seg_param.object_scale)

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        if math.prod(shapes[0]) != math.prod(shapes[1]):
            raise self.error(f"the label must have as many values as the predictions: bottom "
                             f"shapes {list(shapes[0])} and {list(shapes[1])}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        x, label = bottoms[0], bottoms[1]
        self.check_shapes([tuple(x.shape), tuple(label.shape)])
        diff = -(_host(label).reshape(x.shape) - _sigmoid(_host(x))) * self.object_scale
        total = torch.tensor(np.square(diff, dtype=np.float64).sum(), dtype=torch.float32,
                             device=x.device)
        n = float(x.shape[0]) if x.dim() else 1.0
        grads = [torch.from_numpy(diff).to(x.device), *[None] * (len(bottoms) - 1)]
        return LossValue(_scalar(total, n), n, grads)


# -- LaneData ------------------------------------------------------------------------------
@register("LaneData")
class LaneData(_PrefetchingLayer):
    """MobileNet-YOLO's lane data layer (lane_data_layer.cpp): parameters and files only.

    Reads AnnotatedDatum records of ``data_param.source``, one annotation group per lane
    and one annotation per lane point. Tops: data (batch, C, H, W) as AnnotatedData makes
    it (``annotated_data_param.yolo_data_type: 1`` jitter crop by ``yolo_data_jitter``),
    label (batch, 5, 64, 3) rows ``[x, y, lane]`` (lane -1 outside the crop) and
    seg_label (batch, 1, H / seg_scales, W / seg_scales) with the lanes drawn 2 pixels
    wide (``seg_resize_height``/``seg_resize_width`` when both are set).

    Only the parameter and file checks are implemented: the lane points live in a field
    of the fork's Annotation message (``lanes``) whose number the fork's published
    caffe.proto does not give, so records cannot be decoded; an existing source is an
    error saying so.
    """

    min_tops, max_tops = 1, 3

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p, a = spec.param.data_param, spec.param.annotated_data_param
        t = spec.param.transform_param
        self.batch_size = self._positive(p.batch_size, "data_param.batch_size")
        if a.yolo_data_type not in (0, 1):
            raise self.error(f"annotated_data_param.yolo_data_type must be 0 or 1, got "
                             f"{a.yolo_data_type}")
        if not 0 <= a.yolo_data_jitter < 1:
            raise self.error(f"annotated_data_param.yolo_data_jitter must be in [0, 1), got "
                             f"{a.yolo_data_jitter:g}")
        if a.yolo_data_type == 1 and not a.batch_sampler and not t.HasField("resize_param"):
            raise self.error("yolo_data_type 1 without batch_sampler needs "
                             "transform_param.resize_param (the fork reads its resize_mode)")
        resized = a.seg_resize_width > 0 and a.seg_resize_height > 0
        if self.num_tops == 3 and not resized and a.seg_scales <= 0:
            raise self.error(f"annotated_data_param.seg_scales must be positive, got "
                             f"{a.seg_scales}")
        self._source(p.source, "data_param.source")
        raise self.error("reading LaneData records is not supported: their lane points are "
                         "in a field of the fork's Annotation message (lanes) that the "
                         "fork's published caffe.proto does not define")

