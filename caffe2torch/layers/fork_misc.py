"""Activation, convolution, normalisation and detection layers of the Caffe forks.

ReLU6, HardSwish, HardSigmoid, Unsqueeze and BatchNormKyle follow the SSD-based fork
of the golden data; DepthwiseConvolution and Yolov3DetectionOutput MobileNet-YOLO
(eric612); ConvolutionDepthwise and ShuffleChannel ShuffleNet (farmingyard); Axpy
SENet (hujie-frank); ``BN`` has two incompatible meanings, SegNet/ENet's and
PSPNet's, told apart by their ``bn_param`` fields.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NetError
from ..proto import caffe_pb2
from .activation import NeuronLayer
from .base import CaffeLayer, LayerSpec, Shape
from .conv import Convolution, filler_of
from .fork_upsample import VariantLayer
from .normalization import BatchNorm
from .registry import register


class _ReLU6(torch.autograd.Function):
    """``min(max(x, 0) + slope * min(x, 0), threshold)`` with ReLU6Layer::Backward_cpu's
    gradient ``((x > 0) + slope * (x <= 0)) * (x < threshold)`` (0 at the threshold)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float, threshold: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slope, ctx.threshold = slope, threshold
        return F.leaky_relu(x, slope).clamp(max=threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        slope = torch.where(x > 0, 1.0, ctx.slope).to(grad.dtype)
        return grad * slope * (x < ctx.threshold), None, None


@register("ReLU6")
class ReLU6(NeuronLayer):
    """ReLU6 with the fork's ``negative_slope`` and ``threshold`` (default 6)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.relu6_param
        self.slope, self.threshold = float(p.negative_slope), float(p.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6.apply(x, self.slope, self.threshold)


@register("HardSwish")
class HardSwish(NeuronLayer):
    """``x * clip(x / 6 + 0.5, 0, 1)``, in the fork's order of operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x / 6.0 + 0.5).clamp(0, 1)


@register("HardSigmoid")
class HardSigmoid(NeuronLayer):
    """``clip(alpha * x + beta, 0, 1)`` with float alpha/beta (defaults 0.2, 0.5)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.hardsigmoid_param
        self.alpha, self.beta = float(np.float32(p.alpha)), float(np.float32(p.beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.alpha + self.beta).clamp(0, 1)


def _with_depthwise_group(spec: LayerSpec, *, outputs: bool) -> LayerSpec:
    """The spec with ``group`` = input channels (and ``num_output`` = channels when
    ``outputs``), unless the bottom's channel axis cannot be read (Convolution then
    reports the problem)."""
    p = spec.param.convolution_param
    shape = spec.bottom_shapes[0] if spec.bottom_shapes else ()
    if not -len(shape) <= p.axis < len(shape):
        return spec
    param = caffe_pb2.LayerParameter()
    param.CopyFrom(spec.param)
    channels = shape[p.axis]
    if outputs:
        param.convolution_param.num_output = channels
    if outputs or not p.HasField("group"):
        param.convolution_param.group = channels
    return dataclasses.replace(spec, param=param)


@register("DepthwiseConvolution")
class DepthwiseConvolution(Convolution):
    """MobileNet-YOLO's depthwise convolution: Caffe's Convolution (its CPU path) with
    ``group`` defaulting to the input channels, which its GPU kernel assumes."""

    def __init__(self, spec: LayerSpec):
        super().__init__(_with_depthwise_group(spec, outputs=False))


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    """ShuffleNet's depthwise convolution: weight (C, 1, kh, kw), bias (C), C output
    channels whatever ``num_output`` says (ConvolutionDepthwiseLayer ignores it)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(_with_depthwise_group(spec, outputs=True))


@register("ShuffleChannel")
class ShuffleChannel(CaffeLayer):
    """Channel shuffle: output channel ``j * group + i`` is input channel ``i * (C/group) + j``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.group = int(spec.param.shuffle_channel_param.group)
        if self.group < 1:
            raise self.error(f"shuffle_channel_param.group must be positive, got {self.group}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % self.group:
            raise self.error(f"channels must be a multiple of group {self.group}, got bottom "
                             f"shape {list(x.shape)}")
        n, c = x.shape[:2]
        return x.reshape(n, self.group, c // self.group, *x.shape[2:]).transpose(1, 2) \
            .reshape(x.shape)


@register("Axpy")
class Axpy(CaffeLayer):
    """SENet's ``top = a * bottom[1] + bottom[2]``, ``a`` per channel: (N, C) or (N, C, 1, 1)."""

    min_bottoms = max_bottoms = 3
    min_tops = max_tops = 1

    def forward(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() < 2 or a.shape[:2] != x.shape[:2] \
                or any(d != 1 for d in a.shape[2:]):
            raise self.error(f"expected a (N, C[, 1, 1]) and x, y of one shape (N, C, ...), got "
                             f"{list(a.shape)}, {list(x.shape)}, {list(y.shape)}")
        return a.reshape(*x.shape[:2], *([1] * (x.dim() - 2))) * x + y


@register("Unsqueeze")
class Unsqueeze(CaffeLayer):
    """Inserts a size-1 axis at ``dim`` (negative: counted from the end, -1 appends)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.unsqueeze_param
        if not p.HasField("dim"):
            raise self.error("unsqueeze_param.dim must be set")
        self.dim = int(p.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.dim + x.dim() + 1 if self.dim < 0 else self.dim
        if not 0 <= index <= x.dim():
            raise self.error(f"dim {self.dim} is out of range for a {x.dim()}-D bottom: expected "
                             f"{-x.dim() - 1} <= dim <= {x.dim()}")
        return x.unsqueeze(index)


@register("BatchNormKyle")
class BatchNormKyle(CaffeLayer):
    """The golden fork's BatchNorm with ``use_alpha_beta``: blobs 0-2 are BatchNorm's
    statistics (same rules), blobs 3 and 4 a learned per-channel scale (init 1) and
    shift (init 0) applied after normalising.

    With global statistics its Backward_cpu returns before computing their gradients,
    so alpha and beta get none there.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.norm = BatchNorm(spec)
        self.blobs.extend(self.norm.blobs)
        self.use_alpha_beta = bool(spec.param.batch_norm_param.use_alpha_beta)
        if self.use_alpha_beta:
            channels = spec.bottom_shapes[0][1]
            self.add_blob((channels,), caffe_pb2.FillerParameter(type="constant", value=1))
            self.add_blob((channels,), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if not self.use_alpha_beta:
            return y
        alpha, beta = self.blobs[3], self.blobs[4]
        if self.norm.use_global_stats:
            alpha, beta = alpha.detach(), beta.detach()
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return y * alpha.view(shape) + beta.view(shape)


class _BatchFormulaNorm(torch.autograd.Function):
    """``(x - mean) * invstd`` per channel whose backward is the batch-statistics formula
    ``invstd * (g - mean(g) - xhat * mean(g * xhat))`` (means over N, H, W).

    With batch statistics that is the exact gradient; PSPNet's BN applies it at TEST
    too, where the statistics are the stored ones.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
        xhat = (x - mean) * invstd
        ctx.save_for_backward(xhat, invstd)
        return xhat

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, invstd = ctx.saved_tensors
        dims = (0, 2, 3)
        centred = grad - grad.mean(dims, keepdim=True)
        return invstd * (centred - xhat * (grad * xhat).mean(dims, keepdim=True)), None, None


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over H*W, then over N (Caffe's two gemv calls), as (1, C, 1, 1)."""
    return x.mean((2, 3), keepdim=True).mean(0, keepdim=True)


_SEGNET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")
_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen")


@register("BN")
class BN(VariantLayer):
    """The forks' ``BN`` layer, two incompatible meanings under one name.

    SegNet/ENet (caffe-segnet): blobs ``[scale, shift]`` (1, C, 1, 1), ``bn_mode``
    LEARN/INFERENCE, fields ``scale_filler``/``shift_filler``. PSPNet (yjxiong-style):
    blobs ``[slope, bias, mean, variance]``, fields ``slope_filler``/``bias_filler``/
    ``momentum``/``eps``/``frozen``. Fields of both kinds are an error; with neither,
    four ``param`` specs mean PSPNet, otherwise SegNet.
    """

    min_bottoms = max_bottoms = 1
    min_tops = 1

    @classmethod
    def pick(cls, spec: LayerSpec) -> type:
        p = spec.param.bn_param
        segnet = [f for f in _SEGNET_FIELDS if p.HasField(f)]
        pspnet = [f for f in _PSPNET_FIELDS if p.HasField(f)]
        if segnet and pspnet:
            raise NetError(f"bn_param mixes SegNet's fields ({', '.join(segnet)}) with PSPNet's "
                           f"({', '.join(pspnet)}); give one kind", layer=spec.param.name,
                           layer_type=spec.param.type, location=spec.location)
        return PSPNetBN if pspnet or (not segnet and len(spec.param.param) == 4) else SegNetBN

    def _check_bottom(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise self.error(f"expected a 4-D bottom (num, channels, height, width), got shape "
                             f"{list(x.shape)}")


class SegNetBN(BN):
    """caffe-segnet's BN. LEARN normalises with the batch's mean and ``E(x^2) - E(x)^2``
    (+1e-9) in every phase, then ``scale * xhat + shift``; optional tops 2 and 3 are the
    batch mean and variance (1, C, 1, 1). INFERENCE is ``scale * x + shift`` (statistics
    folded into the blobs by SegNet's compute_bn_statistics.py)."""

    max_tops = 3
    VAR_EPS = 1e-9

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.bn_param
        shape = (1, spec.bottom_shapes[0][1], 1, 1)
        self.add_blob(shape, filler_of(p, "scale_filler"))
        self.add_blob(shape, filler_of(p, "shift_filler"))
        self.learn = p.bn_mode == caffe_pb2.BNParameter.LEARN

    def forward(self, x: torch.Tensor):
        self._check_bottom(x)
        scale, shift = self.blobs
        if self.learn:
            mean = _channel_mean(x.detach())
            var = _channel_mean(x.detach() * x.detach()) - mean * mean
            y = _BatchFormulaNorm.apply(x, mean, (var + self.VAR_EPS).rsqrt()) * scale + shift
        else:
            mean = var = x.new_zeros(scale.shape)
            y = x * scale + shift
        return y if self.num_tops == 1 else (y, mean, var)[:self.num_tops]


class PSPNetBN(BN):
    """PSPNet's BN: ``slope * (x - mean) / sqrt(var + eps) + bias``.

    TRAIN (not frozen) uses the batch mean and biased variance and updates the stored
    ones as ``(1 - momentum) * batch + momentum * stored``; TEST or ``frozen`` uses the
    stored ones. Frozen: no gradient for slope/bias and their lr_mult forced to 0
    (BNLayer::LayerSetUp), like the statistics' always.
    """

    max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.bn_param
        self.frozen = bool(p.frozen)
        self.momentum, self.eps = float(p.momentum), float(p.eps)
        shape = (1, spec.bottom_shapes[0][1], 1, 1)
        self.add_blob(shape, filler_of(p, "slope_filler"))
        self.add_blob(shape, filler_of(p, "bias_filler"))
        self.add_blob(shape, None, learnable=False)
        self.add_blob(shape, caffe_pb2.FillerParameter(type="constant", value=float(self.frozen)),
                      learnable=False)
        while len(self.param.param) < 4:
            self.param.param.add()
        for i in (0, 1, 2, 3) if self.frozen else (2, 3):
            self.param.param[i].lr_mult = 0.0
            self.param.param[i].decay_mult = 0.0
        self.batch_stats = not self.frozen and self.phase == caffe_pb2.TRAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_bottom(x)
        slope, bias, mean, var = self.blobs
        if self.batch_stats:
            batch_mean = _channel_mean(x.detach())
            centred = x.detach() - batch_mean
            batch_var = _channel_mean(centred * centred)
            with torch.no_grad():
                mean.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
                var.mul_(self.momentum).add_(batch_var, alpha=1 - self.momentum)
            mean, var = batch_mean, batch_var
        invstd = (var.detach() + self.eps).rsqrt()
        if self.frozen:
            return (x - mean.detach()) * invstd * slope.detach() + bias.detach()
        return _BatchFormulaNorm.apply(x, mean.detach(), invstd) * slope + bias


class _Candidates:
    """Detections gathered over the output scales, in the layer's push_back order."""

    def __init__(self) -> None:
        self.boxes: list[np.ndarray] = []   # (x, y, w, h) float32
        self.classes: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []

    def add(self, boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> None:
        self.boxes.append(boxes)
        self.classes.append(classes)
        self.scores.append(scores)

    def joined(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.boxes:
            return np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(self.boxes), np.concatenate(self.classes), \
            np.concatenate(self.scores)


def _center_iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """MobileNet-YOLO's box_iou on (x, y, w, h) boxes, in float32."""
    half = np.float32(2)

    def overlap(c1, s1, c2, s2):
        left = np.maximum(c1 - s1 / half, c2 - s2 / half)
        right = np.minimum(c1 + s1 / half, c2 + s2 / half)
        return right - left

    w = overlap(box[0], box[2], others[:, 0], others[:, 2])
    h = overlap(box[1], box[3], others[:, 1], others[:, 3])
    inter = np.where((w < 0) | (h < 0), np.float32(0), w * h)
    union = box[2] * box[3] + others[:, 2] * others[:, 3] - inter
    return inter / union


@register("Yolov3DetectionOutput")
class Yolov3DetectionOutput(CaffeLayer):
    """MobileNet-YOLO's YOLOv3 decoder with class-agnostic NMS (CPU path).

    Bottom t (one per ``mask_group_num``) is (N, num_box * (5 + num_classes), S, S).
    Per cell and anchor n: ``x = (col + sigmoid(tx)) / S``, ``y = (row + sigmoid(ty)) / S``,
    ``w = exp(tw) * biases[2m] / (S * anchors_scale[t])`` (h likewise with ``biases[2m+1]``),
    m = ``mask[n + t * mask_size / mask_group_num]``; each class with
    ``sigmoid(class) * sigmoid(obj) > confidence_threshold`` is a detection. All are
    sorted by score (ties keep this enumeration order) and a box is dropped when its
    IoU with a kept higher one is ``>= nms_threshold``, whatever the classes. The top is
    (1, 1, K, 7) rows ``[0, label + 1, score, xmin, ymin, xmax, ymax]`` (image id 0 even
    for a batch, whose detections the fork pools), or one row of -1 per image with the
    image id first when nothing is found. No gradient.
    """

    min_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.yolov3_detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("yolov3_detection_output_param.num_classes must be specified")
        self.num_classes, self.num_box = int(p.num_classes), int(p.num_box)
        self.threshold = np.float32(p.confidence_threshold)
        self.nms_threshold = np.float32(p.nms_threshold)
        self.biases = np.asarray(p.biases, np.float32)
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
        sig = (1.0 / (1.0 + np.exp(-raw))).astype(np.float32)
        cell = np.arange(side * side)
        col, row = (cell % side).astype(np.float32), (cell // side).astype(np.float32)
        side32 = np.float32(side)
        anchors = np.asarray(self.mask[t * self.mask_step:t * self.mask_step + self.num_box])
        size = float(side * self.anchors_scale[t])
        bw = (np.exp(raw[:, :, 2]) * self.biases[2 * anchors][None, :, None] / size) \
            .astype(np.float32)
        bh = (np.exp(raw[:, :, 3]) * self.biases[2 * anchors + 1][None, :, None] / size) \
            .astype(np.float32)
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
        boxes, classes, scores = found.joined()
        order = np.argsort(-scores, kind="stable")
        boxes, classes, scores = boxes[order], classes[order], scores[order]
        dead = np.zeros(len(scores), bool)
        for i in range(len(scores) - 1):
            if not dead[i]:
                dead[i + 1:] |= _center_iou(boxes[i], boxes[i + 1:]) >= self.nms_threshold
        keep = ~dead
        device = bottoms[0].device
        if not keep.any():
            rows = np.full((bottoms[-1].shape[0], 7), -1, np.float32)
            rows[:, 0] = np.arange(len(rows))
            return torch.from_numpy(rows).view(1, 1, -1, 7).to(device)
        b = boxes[keep].astype(np.float64)
        rows = np.column_stack([np.zeros(keep.sum()), classes[keep] + 1, scores[keep],
                                b[:, 0] - b[:, 2] / 2, b[:, 1] - b[:, 3] / 2,
                                b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2])
        return torch.from_numpy(rows.astype(np.float32)).view(1, 1, -1, 7).to(device)
