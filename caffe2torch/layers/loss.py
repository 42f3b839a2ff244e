"""Caffe's loss layers, forward and backward as Caffe computes them.

Every loss here evaluates its value and Caffe's hand-written gradient together
(``_evaluate``) and joins them through :class:`_CaffeLoss`, whose backward is
``gradient * top_diff / normalizer`` exactly as the ``Backward_cpu`` methods scale
by ``top[0]->cpu_diff()[0]``. This keeps Caffe's numbers where its backward is not
the derivative of its forward (clipped logs, the contrastive ``dist + 1e-4``,
softmax gradients past ``FLT_MIN``). Label-like bottoms never get a gradient.

The loss top is Caffe's 0-axis scalar (shape ``()``), as pycaffe shows it, so scripts
can write ``float(net.blobs['loss'].data)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FormatError
from ..formats.caffemodel import blob_record
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape, canonical_axis
from .registry import register

FLT_MIN = float(np.finfo(np.float32).tiny)   # Caffe's FLT_MIN clip in SoftmaxWithLoss
LOG_THRESHOLD = 1e-20                        # Caffe's kLOG_THRESHOLD (loss_layer.hpp)
_Mode = caffe_pb2.LossParameter


# -- helpers shared by the loss and accuracy layers ------------------------------------
def class_layout(layer: CaffeLayer, axis: int, shapes: Sequence[Shape],
                 what: str) -> tuple[int, int, int, int]:
    """``(axis, outer, classes, inner)`` of a class-scored bottom 0 against labels bottom 1.

    Caffe CHECKs that the label count is ``outer * inner`` (one label per prediction).
    """
    scores, labels = shapes[0], shapes[1]
    axis = canonical_axis(layer, axis, scores, what)
    outer, inner = math.prod(scores[:axis]), math.prod(scores[axis + 1:])
    if math.prod(labels) != outer * inner:
        raise layer.error(f"number of labels must match number of predictions: with {what} "
                          f"{axis} and predictions {list(scores)} expected {outer * inner} "
                          f"labels, got {math.prod(labels)} (label shape {list(labels)})")
    return axis, outer, scores[axis], inner


def label_indices(label: torch.Tensor, outer: int, inner: int,
                  ignore: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels as ``(outer, inner)`` class indices (Caffe's ``static_cast<int>``) and the mask
    of those not equal to ``ignore``; ignored positions index class 0 so gathers stay valid."""
    index = label.detach().reshape(outer, inner).to(torch.int64)
    if ignore is None:
        return index, torch.ones_like(index, dtype=torch.bool)
    valid = index != ignore
    return torch.where(valid, index, torch.zeros_like(index)), valid


def _legacy_dim(layer: CaffeLayer, shape: Shape, index: int, what: str) -> int:
    """Caffe's ``num()/channels()/height()/width()``: missing axes are 1, > 4 axes fail."""
    if len(shape) > 4:
        raise layer.error(f"{what} needs a bottom of at most 4 axes (Caffe's legacy "
                          f"num/channels/height/width), got shape {list(shape)}")
    return shape[index] if index < len(shape) else 1


def _ignore_label(param: caffe_pb2.LossParameter) -> int | None:
    return param.ignore_label if param.HasField("ignore_label") else None


def _normalization(param: caffe_pb2.LossParameter, default: int) -> int:
    """The mode: ``normalization`` if set, else the legacy ``normalize`` bool, else ``default``."""
    if param.HasField("normalization"):
        return param.normalization
    if param.HasField("normalize"):
        return _Mode.VALID if param.normalize else _Mode.BATCH_SIZE
    return default


def _normalizer(layer: CaffeLayer, mode: int, outer: int, inner: int,
                valid: torch.Tensor | None) -> torch.Tensor | float:
    """Caffe's ``get_normalizer``: clamped to at least 1 so an all-ignored batch gives 0."""
    if mode == _Mode.FULL or (mode == _Mode.VALID and valid is None):
        return float(max(1, outer * inner))
    if mode == _Mode.VALID:
        return valid.sum().to(torch.float32).clamp_min(1.0)
    if mode == _Mode.BATCH_SIZE:
        return float(max(1, outer))
    if mode == _Mode.NONE:
        return 1.0
    if mode == _Mode.PRE_FIXED:   # R-FCN fork
        return max(1.0, layer.param.loss_param.pre_fixed_normalizer)
    raise layer.error(f"unknown loss_param.normalization {mode}: expected FULL, VALID, "
                      "BATCH_SIZE, NONE or PRE_FIXED")


# -- the autograd bridge ----------------------------------------------------------------
@dataclass
class LossValue:
    """A loss and Caffe's backward for it.

    ``grads[i]`` is bottom ``i``'s gradient before Caffe's final scaling (None: no
    gradient); backward multiplies it by ``top_diff / normalizer`` as Caffe multiplies by
    ``loss_weight / normalizer``. ``extras`` are further tops (e.g. ``prob``) that Caffe
    never back-propagates.
    """

    loss: torch.Tensor
    normalizer: torch.Tensor | float
    grads: list[torch.Tensor | None]
    extras: tuple[torch.Tensor, ...] = field(default_factory=tuple)


class _CaffeLoss(torch.autograd.Function):
    """Returns the layer's loss (and extras); backward is the layer's Caffe gradient."""

    @staticmethod
    def forward(ctx, layer: "_LossLayer", *bottoms: torch.Tensor):
        result = layer._evaluate(bottoms, ctx.needs_input_grad[1:])
        ctx.normalizer = result.normalizer
        ctx.save_for_backward(*result.grads)
        ctx.mark_non_differentiable(*result.extras)
        return (result.loss, *result.extras)

    @staticmethod
    def backward(ctx, top_diff: torch.Tensor, *extra_diffs: torch.Tensor):
        scale = top_diff / ctx.normalizer
        return (None, *(None if g is None else g * scale for g in ctx.saved_tensors))


class _LossLayer(CaffeLayer):
    """Caffe's ``LossLayer``: a scalar top (plus optional extras), loss_weight 1 by default."""

    is_loss = True
    min_bottoms = max_bottoms = 2
    min_tops, max_tops = 0, 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.configure(spec)
        self.check_shapes(spec.bottom_shapes)

    def configure(self, spec: LayerSpec) -> None:
        """Read the layer's parameters (before its bottom shapes are checked)."""

    def check_shapes(self, shapes: list[Shape]) -> None:
        """``LossLayer::Reshape``: data and label share their first dimension."""
        first = [s[0] if s else 1 for s in shapes[:2]]
        if first[0] != first[1]:
            raise self.error(f"the data and label should have the same first dimension: "
                             f"bottom shapes {list(shapes[0])} and {list(shapes[1])}")

    def extra_top_shapes(self, shapes: list[Shape]) -> list[Shape]:
        return []

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self.check_shapes(bottom_shapes)
        return [(), *self.extra_top_shapes(bottom_shapes)]

    def _evaluate(self, bottoms: Sequence[torch.Tensor], need_grad: Sequence[bool]) -> LossValue:
        raise NotImplementedError

    def forward(self, *bottoms: torch.Tensor):
        if torch.is_grad_enabled() and any(b.requires_grad for b in bottoms):
            out = _CaffeLoss.apply(self, *bottoms)
        else:
            result = self._evaluate(bottoms, [False] * len(bottoms))
            out = (result.loss, *result.extras)
        return out[0] if len(out) == 1 else out


def _scalar(total: torch.Tensor, normalizer: torch.Tensor | float) -> torch.Tensor:
    return (total / normalizer).reshape(())


# -- softmax-based losses ----------------------------------------------------------------
class _ClassLoss(_LossLayer):
    """Losses over class probabilities along ``axis`` with one label per prediction."""

    max_tops = 2
    axis_name = "axis"
    axis = 1

    def configure(self, spec: LayerSpec) -> None:
        self.ignore = _ignore_label(spec.param.loss_param)

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        class_layout(self, self.axis, shapes, self.axis_name)

    def extra_top_shapes(self, shapes: list[Shape]) -> list[Shape]:
        return [tuple(shapes[0])] if self.num_tops > 1 else []

    def _probabilities(self, x: torch.Tensor, label: torch.Tensor):
        """Softmax probabilities as ``(outer, C, inner)`` with label indices and mask."""
        axis, outer, classes, inner = class_layout(
            self, self.axis, [tuple(x.shape), tuple(label.shape)], self.axis_name)
        prob = F.softmax(x, dim=axis)
        index, valid = label_indices(label, outer, inner, self.ignore)
        return prob, prob.reshape(outer, classes, inner), index, valid

    def _extras(self, prob: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (prob,) if self.num_tops > 1 else ()


@register("SoftmaxWithLoss", "SOFTMAX_LOSS")
class SoftmaxWithLoss(_ClassLoss):
    """``-sum log(max(p[label], FLT_MIN)) / normalizer`` over softmax_param.axis.

    Backward is Caffe's ``(p - onehot) / normalizer`` (zero at ignored positions), also
    where the log was clipped. A second top gives the probabilities (BVLC master aborts
    on it, bug #2968; this follows the forks that fixed it).
    """

    axis_name = "softmax_param.axis"

    def configure(self, spec: LayerSpec) -> None:
        super().configure(spec)
        self.axis = spec.param.softmax_param.axis
        self.mode = _normalization(spec.param.loss_param, _Mode.VALID)
        _normalizer(self, self.mode, 1, 1, None)   # reject unknown modes at load time

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        x, label = bottoms[0], bottoms[1]
        prob, p3, index, valid = self._probabilities(x, label)
        picked = p3.gather(1, index.unsqueeze(1)).squeeze(1)
        log_p = torch.log(picked.clamp_min(FLT_MIN))
        total = -torch.where(valid, log_p, torch.zeros_like(log_p)).sum()
        normalizer = _normalizer(self, self.mode, p3.shape[0], p3.shape[2],
                                 None if self.ignore is None else valid)
        grad = None
        if need_grad[0]:
            mask = valid.unsqueeze(1).to(p3.dtype)
            grad = p3.scatter_add(1, index.unsqueeze(1), -mask) * mask
            grad = grad.reshape(x.shape)
        return LossValue(_scalar(total, normalizer), normalizer, [grad, None],
                         self._extras(prob))


@register("InfogainLoss", "INFOGAIN_LOSS")
class InfogainLoss(_ClassLoss):
    """``-sum_l H[label, l] log(max(p_l, 1e-20)) / normalizer`` on softmax probabilities.

    ``H`` comes from ``infogain_loss_param.source`` (a binary BlobProto, read as Caffe
    does: the working directory first, then beside the prototxt) or from a third bottom,
    which never gets a gradient. Backward is Caffe's ``p * rowsum(H)[label] - H[label]``.
    """

    max_bottoms = 3
    axis_name = "infogain_loss_param.axis"

    def configure(self, spec: LayerSpec) -> None:
        super().configure(spec)
        self.axis = spec.param.infogain_loss_param.axis
        loss_param = spec.param.loss_param
        if loss_param.HasField("normalize"):
            raise self.error("loss_param.normalize is deprecated for InfogainLoss (Caffe "
                             "CHECKs it is unset): use loss_param.normalization")
        self.mode = loss_param.normalization
        _normalizer(self, self.mode, 1, 1, None)
        classes = spec.bottom_shapes[0][canonical_axis(self, self.axis, spec.bottom_shapes[0],
                                                       self.axis_name)]
        matrix = self._read_matrix(classes) if len(spec.bottom_shapes) < 3 else None
        self.register_buffer("infogain", matrix, persistent=False)

    def _read_matrix(self, classes: int) -> torch.Tensor:
        source = self.param.infogain_loss_param.source
        if not source:
            raise self.error("infogain matrix source must be specified: set "
                             "infogain_loss_param.source or give H as a third bottom")
        path = self.resolve_path(source, "infogain_loss_param.source")
        proto = caffe_pb2.BlobProto()
        try:
            proto.ParseFromString(path.read_bytes())
        except Exception:
            raise FormatError(path, "is not a binary BlobProto (.binaryproto)") from None
        data = blob_record(proto).data
        if data.size != classes * classes:
            raise self.error(f"infogain matrix '{source}' must be {classes}x{classes} "
                             f"({classes * classes} values), got {data.size} values")
        return torch.from_numpy(data.reshape(classes, classes).copy())

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        if len(shapes) > 2:
            classes = shapes[0][canonical_axis(self, self.axis, shapes[0], self.axis_name)]
            if math.prod(shapes[2]) != classes * classes:
                raise self.error(f"infogain bottom H must hold {classes}x{classes} values, got "
                                 f"shape {list(shapes[2])}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        x, label = bottoms[0], bottoms[1]
        prob, p3, index, valid = self._probabilities(x, label)
        classes = p3.shape[1]
        h = (bottoms[2] if len(bottoms) > 2 else self.infogain).detach()
        h = h.reshape(classes, classes).to(p3.dtype)
        h_rows = h[index].permute(0, 2, 1)            # (outer, C, inner): H[label, l]
        mask = valid.unsqueeze(1).to(p3.dtype)
        total = -(h_rows * torch.log(p3.clamp_min(LOG_THRESHOLD)) * mask).sum()
        normalizer = _normalizer(self, self.mode, p3.shape[0], p3.shape[2],
                                 None if self.ignore is None else valid)
        grad = None
        if need_grad[0]:
            row_sums = h.sum(dim=1)[index].unsqueeze(1)
            grad = ((p3 * row_sums - h_rows) * mask).reshape(x.shape)
        return LossValue(_scalar(total, normalizer), normalizer, [grad, None, None],
                         self._extras(prob))


# -- element-wise losses -------------------------------------------------------------------
@register("EuclideanLoss", "EUCLIDEAN_LOSS")
class EuclideanLoss(_LossLayer):
    """``sum((a - b)^2) / num / 2``; both bottoms get ``+-(a - b) / num``."""

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        _legacy_dim(self, shapes[0], 0, "EuclideanLoss")
        if math.prod(shapes[0][1:]) != math.prod(shapes[1][1:]):
            raise self.error(f"inputs must have the same dimension: count(1) of "
                             f"{list(shapes[0])} is {math.prod(shapes[0][1:])}, of "
                             f"{list(shapes[1])} is {math.prod(shapes[1][1:])}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        a, b = bottoms
        num = _legacy_dim(self, tuple(a.shape), 0, "EuclideanLoss")
        diff = a - b.reshape(a.shape)
        total = (diff * diff).sum() / 2
        grads = [diff if need_grad[0] else None,
                 (-diff).reshape(b.shape) if need_grad[1] else None]
        return LossValue(_scalar(total, float(num)), float(num), grads)


@register("SigmoidCrossEntropyLoss", "SIGMOID_CROSS_ENTROPY_LOSS")
class SigmoidCrossEntropyLoss(_LossLayer):
    """Caffe's stable ``-[x (t - [x>=0]) - log(1 + exp(x - 2x[x>=0]))]``, summed.

    Normalization defaults to BATCH_SIZE (not VALID); ``ignore_label`` drops targets
    whose ``int`` value equals it. Backward is ``sigmoid(x) - t``.
    """

    def configure(self, spec: LayerSpec) -> None:
        self.ignore = _ignore_label(spec.param.loss_param)
        self.mode = _normalization(spec.param.loss_param, _Mode.BATCH_SIZE)
        _normalizer(self, self.mode, 1, 1, None)

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        if math.prod(shapes[0]) != math.prod(shapes[1]):
            raise self.error(f"inputs must have the same count: {list(shapes[0])} has "
                             f"{math.prod(shapes[0])} values, {list(shapes[1])} has "
                             f"{math.prod(shapes[1])}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        x, target = bottoms[0], bottoms[1].detach().reshape(bottoms[0].shape)
        positive = (x >= 0).to(x.dtype)
        term = x * (target - positive) - torch.log(1 + torch.exp(x - 2 * x * positive))
        outer = x.shape[0] if x.dim() else 1
        if self.ignore is None:
            valid = None
            total = -term.sum()
        else:
            valid = target.to(torch.int64) != self.ignore
            total = -torch.where(valid, term, torch.zeros_like(term)).sum()
        normalizer = _normalizer(self, self.mode, outer, x.numel() // max(outer, 1), valid)
        grad = None
        if need_grad[0]:
            grad = torch.sigmoid(x) - target
            if valid is not None:
                grad = torch.where(valid, grad, torch.zeros_like(grad))
        return LossValue(_scalar(total, normalizer), normalizer, [grad, None])


@register("HingeLoss", "HINGE_LOSS")
class HingeLoss(_LossLayer):
    """One-vs-all hinge: ``m = max(0, 1 + s x)`` with ``s = -1`` at the label, else +1;
    loss ``sum(m) / num`` (L1) or ``sum(m^2) / num`` (L2)."""

    def configure(self, spec: LayerSpec) -> None:
        self.norm = spec.param.hinge_loss_param.norm
        if self.norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(f"unknown hinge_loss_param.norm {self.norm}: expected L1 or L2")

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        num = _legacy_dim(self, shapes[0], 0, "HingeLoss")
        if math.prod(shapes[1]) != num:
            raise self.error(f"expected one label per sample ({num}), got label shape "
                             f"{list(shapes[1])}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        x, label = bottoms
        num = _legacy_dim(self, tuple(x.shape), 0, "HingeLoss")
        scores = x.reshape(num, -1)
        sign = torch.ones_like(scores).scatter(
            1, label.detach().reshape(num, 1).to(torch.int64), -1.0)
        margin = (1 + scores * sign).clamp_min(0)
        l1 = self.norm == caffe_pb2.HingeLossParameter.L1
        total = margin.sum() if l1 else (margin * margin).sum()
        grad = None
        if need_grad[0]:
            grad = (margin > 0).to(x.dtype) * sign if l1 else 2 * margin * sign
            grad = grad.reshape(x.shape)
        return LossValue(_scalar(total, float(num)), float(num), [grad, None])


@register("MultinomialLogisticLoss", "MULTINOMIAL_LOGISTIC_LOSS")
class MultinomialLogisticLoss(_LossLayer):
    """``-sum log(max(p[label], 1e-20)) / num`` on given probabilities; backward is
    ``-1 / max(p, 1e-20)`` at the label even where the clip applies."""

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        dims = [_legacy_dim(self, shapes[1], i, "MultinomialLogisticLoss") for i in (1, 2, 3)]
        if dims != [1, 1, 1]:
            raise self.error(f"label must have channels, height and width 1 (one label per "
                             f"sample), got label shape {list(shapes[1])}")
        _legacy_dim(self, shapes[0], 0, "MultinomialLogisticLoss")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        prob, label = bottoms
        num = prob.shape[0] if prob.dim() else 1
        rows = prob.reshape(num, -1)
        index = label.detach().reshape(num, 1).to(torch.int64)
        picked = rows.gather(1, index).clamp_min(LOG_THRESHOLD)
        total = -torch.log(picked).sum()
        grad = None
        if need_grad[0]:
            grad = torch.zeros_like(rows).scatter(1, index, -1 / picked).reshape(prob.shape)
        return LossValue(_scalar(total, float(num)), float(num), [grad, None])


@register("ContrastiveLoss", "CONTRASTIVE_LOSS")
class ContrastiveLoss(_LossLayer):
    """Siamese loss over ``d^2 = |a - b|^2`` per pair, ``/ num / 2``: ``d^2`` for similar
    pairs, ``max(margin - d, 0)^2`` for dissimilar ones (``max(margin - d^2, 0)`` with
    ``legacy_version``). Backward uses Caffe's ``(margin - d) / (d + 1e-4)``."""

    min_bottoms = max_bottoms = 3

    def configure(self, spec: LayerSpec) -> None:
        p = spec.param.contrastive_loss_param
        self.margin, self.legacy = float(p.margin), p.legacy_version

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        dims = [[_legacy_dim(self, s, i, "ContrastiveLoss") for i in range(4)] for s in shapes]
        if dims[0][1] != dims[1][1] or dims[0][2:] != [1, 1] or dims[1][2:] != [1, 1]:
            raise self.error(f"expected two (N, C, 1, 1) feature bottoms of equal C, got "
                             f"{list(shapes[0])} and {list(shapes[1])}")
        if dims[2][1:] != [1, 1, 1] or dims[2][0] != dims[0][0]:
            raise self.error(f"expected one similarity label per pair ({dims[0][0]}, 1, 1, 1), "
                             f"got {list(shapes[2])}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        a, b, sim = bottoms
        num = a.shape[0]
        diff = a.reshape(num, -1) - b.reshape(num, -1)
        dist_sq = (diff * diff).sum(dim=1)
        similar = sim.detach().reshape(num).to(torch.int64) != 0
        if self.legacy:
            mdist = self.margin - dist_sq
            dissimilar = mdist.clamp_min(0)
        else:
            dist = torch.sqrt(dist_sq)
            mdist = self.margin - dist
            dissimilar = mdist.clamp_min(0) ** 2
        total = torch.where(similar, dist_sq, dissimilar).sum() / 2
        grads: list[torch.Tensor | None] = [None, None, None]
        if need_grad[0] or need_grad[1]:
            push = -torch.ones_like(mdist) if self.legacy else -mdist / (dist + 1e-4)
            push = torch.where(mdist > 0, push, torch.zeros_like(push))
            coeff = torch.where(similar, torch.ones_like(push), push).unsqueeze(1)
            grad = coeff * diff
            grads[0] = grad.reshape(a.shape) if need_grad[0] else None
            grads[1] = (-grad).reshape(b.shape) if need_grad[1] else None
        return LossValue(_scalar(total, float(num)), float(num), grads)
