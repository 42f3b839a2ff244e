"""R-FCN's online hard example mining: SoftmaxWithLossOHEM, SmoothL1LossOHEM, BoxAnnotatorOHEM.

Sources: the R-FCN layers of Microsoft's Caffe (``softmax_loss_ohem_layer.cu``,
``smooth_L1_loss_ohem_layer.cu``, ``box_annotator_ohem_layer.cu``, written by Yi Li; the
GPU code is what trained R-FCN, their CPU twins are ``NOT_IMPLEMENTED`` in daijifeng001/
caffe-rfcn). The two losses are their plain counterparts plus a per-RoI loss top that
BoxAnnotatorOHEM ranks to keep the ``roi_per_img`` hardest RoIs of each image.
"""
from __future__ import annotations

import torch

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape
from .loss import FLT_MIN, LossValue, SoftmaxWithLoss, _legacy_dim, _LossLayer, \
    _normalization, _normalizer, _scalar, class_layout, label_indices
from .registry import register
from .ssd_loss import smooth_l1

_Mode = caffe_pb2.LossParameter


@register("SoftmaxWithLossOHEM")
class SoftmaxWithLossOHEM(SoftmaxWithLoss):
    """SoftmaxWithLoss with up to three tops: the loss, the probabilities and the per-RoI
    loss ``-log(max(p[label], FLT_MIN))`` shaped like the label bottom (0 where the label is
    ``ignore_label``). Loss, normalization (PRE_FIXED included) and backward are
    SoftmaxWithLoss's; the extra tops get no gradient."""

    max_tops = 3

    def extra_top_shapes(self, shapes: list[Shape]) -> list[Shape]:
        return [tuple(shapes[0]), tuple(shapes[1])][:self.num_tops - 1]

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        result = super()._evaluate(bottoms, need_grad)
        if self.num_tops < 3:
            return result
        x, label = bottoms[0], bottoms[1]
        prob = result.extras[0]
        _, outer, classes, inner = class_layout(
            self, self.axis, [tuple(x.shape), tuple(label.shape)], self.axis_name)
        index, valid = label_indices(label, outer, inner, self.ignore)
        picked = prob.reshape(outer, classes, inner).gather(1, index.unsqueeze(1)).squeeze(1)
        per_roi = -torch.log(picked.clamp_min(FLT_MIN))
        per_roi = torch.where(valid, per_roi, torch.zeros_like(per_roi)).reshape(label.shape)
        result.extras = (*result.extras, per_roi)
        return result


@register("SmoothL1LossOHEM")
class SmoothL1LossOHEM(_LossLayer):
    """``sum(smooth_l1(w * (b0 - b1))) / normalizer`` and, as a second top, the per-RoI loss
    summed over channels, shape (num, 1, height, width).

    ``w`` (optional bottom 2) scales the difference; as in the fork the gradient is
    ``+-smooth_l1'(d)`` without the chain factor ``w``, and only b0 and b1 get one. The
    normalizer follows ``loss_param.normalization`` (default VALID): FULL and VALID divide
    by num * height * width, BATCH_SIZE by num, PRE_FIXED by ``pre_fixed_normalizer``,
    NONE by 1, never by less than 1.
    """

    min_bottoms, max_bottoms = 2, 3
    max_tops = 2

    def configure(self, spec: LayerSpec) -> None:
        self.mode = _normalization(spec.param.loss_param, _Mode.VALID)
        _normalizer(self, self.mode, 1, 1, None)   # reject unknown modes at load time

    def _dims(self, shape: Shape) -> list[int]:
        return [_legacy_dim(self, shape, a, "SmoothL1LossOHEM") for a in range(4)]

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        first = self._dims(shapes[0])[1:]
        for k, shape in enumerate(shapes[1:], start=1):
            if self._dims(shape)[1:] != first:
                raise self.error(f"bottom {k} must match bottom 0 in channels, height and "
                                 f"width: got shapes {list(shapes[0])} and {list(shape)}")

    def extra_top_shapes(self, shapes: list[Shape]) -> list[Shape]:
        num, _, height, width = self._dims(shapes[0])
        return [(num, 1, height, width)] if self.num_tops > 1 else []

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        pred, target = bottoms[0], bottoms[1].reshape(bottoms[0].shape)
        d = pred - target
        if len(bottoms) > 2:
            d = bottoms[2].detach().reshape(pred.shape) * d
        value, slope = smooth_l1(d, 1.0)
        num, channels, height, width = self._dims(tuple(pred.shape))
        normalizer = _normalizer(self, self.mode, num, height * width, None)
        grads: list[torch.Tensor | None] = [None] * len(bottoms)
        if need_grad[0]:
            grads[0] = slope
        if need_grad[1]:
            grads[1] = (-slope).reshape(bottoms[1].shape)
        extras = ()
        if self.num_tops > 1:
            extras = (value.reshape(num, channels, height, width).sum(1, keepdim=True),)
        return LossValue(_scalar(value.sum(), normalizer), normalizer, grads, extras)


@register("BoxAnnotatorOHEM")
class BoxAnnotatorOHEM(CaffeLayer):
    """Keeps the ``roi_per_img`` RoIs of highest loss in each image.

    Bottoms: rois (R, 5) with the image index in column 0, per-RoI loss (R), labels (R),
    bbox loss weights (R, 4K) (each may carry trailing height/width axes, as in the fork).
    Tops: labels (R, 1, H, W), equal to the input label for kept RoIs and ``ignore_label``
    elsewhere; bbox loss weights (R, 4K, H, W), the input's for kept RoIs and 0 elsewhere.
    RoIs are visited by descending loss (``std::sort`` in the fork, whose tie order is
    unspecified; ties here keep index order). No gradient flows back.
    """

    min_bottoms = max_bottoms = 4
    min_tops = max_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.box_annotator_ohem_param
        if not p.HasField("roi_per_img"):
            raise self.error("box_annotator_ohem_param.roi_per_img is required")
        if p.roi_per_img <= 0:
            raise self.error(f"box_annotator_ohem_param.roi_per_img must be positive, got "
                             f"{p.roi_per_img}")
        self.roi_per_img = int(p.roi_per_img)
        self.ignore_label = int(p.ignore_label)
        self.infer_shapes(spec.bottom_shapes)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        dims = [[_legacy_dim(self, s, a, "BoxAnnotatorOHEM") for a in range(4)]
                for s in bottom_shapes]
        num, channels, height, width = dims[0]
        if channels != 5:
            raise self.error(f"rois (bottom 0) must have 5 channels (image index, x1, y1, x2, "
                             f"y2), got shape {list(bottom_shapes[0])}")
        names = ("per-RoI loss", "labels", "bbox loss weights")
        for k, (name, (n, c, h, w)) in enumerate(zip(names, dims[1:]), start=1):
            if n != num or (h, w) != (height, width) or (k < 3 and c != 1):
                want = f"{num} x {'1' if k < 3 else 'C'} x {height} x {width}"
                raise self.error(f"{name} (bottom {k}) must be {want} to match the rois "
                                 f"{list(bottom_shapes[0])}, got shape {list(bottom_shapes[k])}")
        return [(num, 1, height, width), (num, dims[3][1], height, width)]

    def forward(self, rois: torch.Tensor, loss: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        label_shape, weight_shape = self.infer_shapes(
            [tuple(rois.shape), tuple(loss.shape), tuple(labels.shape), tuple(weights.shape)])
        num, _, height, width = label_shape
        spatial = height * width
        if rois.device.type == "meta":
            return torch.empty(label_shape, device="meta"), torch.empty(weight_shape,
                                                                        device="meta")
        image = rois.detach().reshape(num, 5, spatial)[:, 0].reshape(-1).to(torch.int64)
        if image.numel() == 0 or int(image.max()) < 0:
            raise self.error("number of images must be greater than 0: no RoI has an image "
                             "index >= 0")
        if int(image.min()) < 0:
            raise self.error(f"RoI image index {int(image.min())} is negative")
        order = torch.sort(loss.detach().reshape(-1), descending=True, stable=True).indices
        # rank of each RoI among its image's RoIs in visiting order; the first roi_per_img keep
        ranked_image = image[order]
        count = int(image.max()) + 1
        onehot = torch.nn.functional.one_hot(ranked_image, count)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1
        keep = torch.zeros_like(image, dtype=torch.bool)
        keep[order] = rank < self.roi_per_img
        keep = keep.reshape(num, 1, spatial)
        out_labels = torch.where(keep, labels.detach().reshape(num, 1, spatial),
                                 torch.full_like(keep, self.ignore_label, dtype=labels.dtype))
        w = weights.detach().reshape(num, -1, spatial)
        out_weights = torch.where(keep, w, torch.zeros_like(w))
        return out_labels.reshape(label_shape), out_weights.reshape(weight_shape)
