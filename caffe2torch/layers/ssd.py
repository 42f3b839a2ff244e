"""The SSD fork's feature-side layers: Normalize, Permute and PriorBox.

Sources: weiliu89/caffe (branch ssd) ``normalize_layer.cpp``, ``permute_layer.cpp``,
``prior_box_layer.cpp``. These layers exist only in the fork, so no switch is needed,
except for FaceBoxes' PriorBox (sfzhang15/FaceBoxes ``prior_box_layer.cpp``), which reads
the same fields differently: ``caffe2torch.forks.using_fork("faceboxes")``.
"""
from __future__ import annotations

import logging
import math
from functools import lru_cache

import numpy as np
import torch

from ..forks import current_fork
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape
from .loss import _legacy_dim as legacy_dim
from .registry import register

log = logging.getLogger(__name__)

# -- Normalize ---------------------------------------------------------------------------
class _NormalizeFn(torch.autograd.Function):
    """L2 normalisation with NormalizeLayer's own backward.

    Caffe's bottom gradient multiplies by the scale of the *output* channel only,
    ``s_k (dy_k - x_k sum_c(x_c dy_c) / n^2) / n``: the exact derivative when the scale is
    shared, not when it is per channel. The scale gradient is ``sum(top * dy) / scale``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, across: bool, eps: float):
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        if across:   # one norm per sample; top = x * float(1.0 / norm)
            norm = (x3.square().sum(dim=(1, 2)) + eps).sqrt().view(n, 1, 1)
            top = x3 * (1.0 / norm.double()).float()
        else:        # one norm per position, over the channels
            norm = (x3.square().sum(dim=1, keepdim=True) + eps).sqrt()
            top = x3 / norm
        s = scale.reshape(1, -1, 1)
        top = top * s
        ctx.save_for_backward(x3, s, norm, top)
        ctx.across, ctx.scale_shape = across, scale.shape
        return top.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x3, s, norm, top = ctx.saved_tensors
        dy3 = dy.reshape(x3.shape)
        dx = dscale = None
        if ctx.needs_input_grad[1]:
            if len(ctx.scale_shape) == 0:   # channel_shared: a 0-axis blob
                dscale = ((top * dy3).sum() / s.reshape(())).reshape(ctx.scale_shape)
            else:
                dscale = (top * dy3).sum(dim=(0, 2)) / s.reshape(-1)
        if ctx.needs_input_grad[0]:
            if ctx.across:
                a = (x3 * dy3).sum(dim=(1, 2)).view(-1, 1, 1)
                dx = (dy3 - x3 * (a / norm / norm)) * (1.0 / norm.double()).float()
            else:
                a = (x3 * dy3).sum(dim=1, keepdim=True)
                dx = (dy3 - x3 * a / norm.pow(2)) / norm
            dx = (dx * s).reshape(dy.shape)
        return dx, dscale, None, None


@register("Normalize")
class Normalize(CaffeLayer):
    """SSD's L2 normalisation with a learned scale (conv4_3_norm).

    ``norm_param``: ``across_spatial`` (default true) normalises each sample over C*H*W,
    else each position over C; ``channel_shared`` (default true) learns one scale (a
    0-axis blob) instead of one per channel; ``scale_filler`` defaults to constant 1;
    ``eps`` (1e-10) is added to the sum of squares before the square root.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.norm_param
        shape = spec.bottom_shapes[0]
        if not 2 <= len(shape) <= 4:
            raise self.error(f"expected a bottom with 2 to 4 axes (N, C[, H[, W]]), got shape "
                             f"{list(shape)}")
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(p.eps)
        filler = p.scale_filler if p.HasField("scale_filler") else \
            caffe_pb2.FillerParameter(type="constant", value=1.0)
        self.add_blob(() if self.channel_shared else (shape[1],), filler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not 2 <= x.dim() <= 4:
            raise self.error(f"expected a bottom with 2 to 4 axes, got shape {list(x.shape)}")
        scale = self.blobs[0]
        if not self.channel_shared and scale.numel() != x.shape[1]:
            raise self.error(f"the scale has {scale.numel()} values for {x.shape[1]} channels "
                             f"(bottom shape {list(x.shape)})")
        return _NormalizeFn.apply(x, scale, self.across_spatial, self.eps)


# -- Permute -------------------------------------------------------------------------------
@register("Permute")
class Permute(CaffeLayer):
    """Reorders the axes: ``permute_param.order`` first, the unnamed axes after in order.

    Caffe's gradient is the inverse reordering (autograd's). An order that changes
    nothing gives a view of the bottom, as Caffe shares data and diff then.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        ndim = len(spec.bottom_shapes[0])
        order: list[int] = []
        for axis in spec.param.permute_param.order:
            if axis >= ndim:
                raise self.error(f"permute_param.order {axis} is out of range: expected an axis "
                                 f"< {ndim} for a bottom of shape {list(spec.bottom_shapes[0])}")
            if axis in order:
                raise self.error(f"permute_param.order has duplicate axis {axis}: "
                                 f"{list(spec.param.permute_param.order)}")
            order.append(int(axis))
        self.order = order + [i for i in range(ndim) if i not in order]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.order):
            raise self.error(f"expected a bottom with {len(self.order)} axes (as at setup), got "
                             f"shape {list(x.shape)}")
        if self.order == sorted(self.order):
            return x.view(x.shape)
        return x.permute(self.order).contiguous()


# -- PriorBox ------------------------------------------------------------------------------
@register("PriorBox")
class PriorBox(CaffeLayer):
    """Default boxes for one feature map: top (1, 2, H*W*num_priors*4).

    Channel 0 holds ``[xmin, ymin, xmax, ymax]`` normalised by the image size, per
    location (row-major) in the order: for each ``min_size``, the min box, then (with
    ``max_size``) the ``sqrt(min*max)`` box, then one box per extra aspect ratio;
    channel 1 the variances. Sizes are truncated to int as the fork does; the image
    size is ``img_h/img_w`` or ``img_size`` else bottom 1's H/W, the step
    ``step_h/step_w`` or ``step`` else image / feature size. Numbers follow the fork's
    float/double mix (corners computed in double, stored as float). An unset ``clip``
    clips, as the recorded fork does.

    FaceBoxes' fork (selected with ``caffe2torch.forks.using_fork("faceboxes")``) has no
    fields of its own but hard-codes its anchor densification: ``min_size`` 32 gives 16
    boxes on a 4 x 4 grid of centres 8 pixels apart (``-16 .. +8`` around the cell
    centre, rows outer), 64 gives 4 boxes 16 pixels apart (``-16, 0``), any other size
    one box; these square boxes span ``(size - 1) / 2`` either side of their centre
    instead of ``size / 2``; ``max_size`` and aspect-ratio boxes are SSD's. The fork
    reserves 21 priors for any layer with 3 ``min_size`` (else SSD's count); sizes whose
    boxes do not fill exactly that are an error here (the fork overruns its buffer).
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.prior_box_param
        if not p.min_size:
            raise self.error("prior_box_param must provide min_size")
        if any(s <= 0 for s in p.min_size):
            raise self.error(f"min_size must be positive, got {list(p.min_size)}")
        self.min_sizes = list(p.min_size)
        self.max_sizes = list(p.max_size)
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise self.error(f"give one max_size per min_size: {len(self.min_sizes)} "
                                 f"min_size, {len(self.max_sizes)} max_size")
            for lo, hi in zip(self.min_sizes, self.max_sizes):
                if hi <= lo:
                    raise self.error(f"max_size must be greater than min_size, got max_size "
                                     f"{hi:g} for min_size {lo:g}")
        ratios = [1.0]
        for ar in p.aspect_ratio:
            if any(abs(ar - r) < 1e-6 for r in ratios):
                continue
            ratios.append(float(ar))
            if p.flip:
                ratios.append(float(np.float32(1.0 / ar)))
        self.aspect_ratios = ratios
        self.num_priors = len(ratios) * len(self.min_sizes) + len(self.max_sizes)
        self.faceboxes = current_fork() == "faceboxes"
        dense = {32, 64} & {int(s) for s in self.min_sizes}
        if self.faceboxes:
            declared = 21 if len(self.min_sizes) == 3 else self.num_priors
            self.num_priors = len(_prior_shapes(tuple(self.min_sizes), tuple(self.max_sizes),
                                                tuple(ratios), True))
            if self.num_priors != declared:
                raise self.error(f"FaceBoxes' PriorBox reserves {declared} priors per location "
                                 f"for min_size {self.min_sizes}, but these sizes give "
                                 f"{self.num_priors} boxes (min_size 32 gives 16, 64 gives 4)")
        elif len(self.min_sizes) == 3 and dense:
            log.warning("layer '%s': PriorBox with min_size %s looks like FaceBoxes' fork, "
                        "which packs 21 priors per location; build the net inside "
                        "caffe2torch.forks.using_fork('faceboxes') for it", self.layer_name,
                        self.min_sizes)
        # The recorded SSD fork clips when ``clip`` is unset (its proto default is true);
        # real prototxts spell it out, so our schema's default (false) is not used here.
        self.clip = bool(p.clip) if p.HasField("clip") else True
        if len(p.variance) > 1 and len(p.variance) != 4:
            raise self.error(f"give 1 or 4 variances, got {len(p.variance)}")
        if any(v <= 0 for v in p.variance):
            raise self.error(f"variances must be positive, got {list(p.variance)}")
        self.variance = list(p.variance) or [0.1]
        self.img_hw = self._pair(p, "img_size", "img_h", "img_w")
        self.step_hw = self._pair(p, "step", "step_h", "step_w")
        self.offset = float(p.offset)

    def _pair(self, p: caffe_pb2.PriorBoxParameter, both: str, h: str, w: str
              ) -> tuple[float, float] | None:
        """``h``/``w`` (both positive, not with ``both``) or ``both`` or None (derived)."""
        if p.HasField(h) or p.HasField(w):
            if p.HasField(both):
                raise self.error(f"give either {both} or {h}/{w}, not both")
            pair = (getattr(p, h), getattr(p, w))
            if min(pair) <= 0:
                raise self.error(f"{h} and {w} must be larger than 0, got {pair[0]:g} and "
                                 f"{pair[1]:g}")
            return pair
        if p.HasField(both):
            if getattr(p, both) <= 0:
                raise self.error(f"{both} must be larger than 0, got {getattr(p, both):g}")
            return getattr(p, both), getattr(p, both)
        return None

    def _sizes(self, feat: Shape, image: Shape) -> tuple[int, int, int, int]:
        height = legacy_dim(self, feat, 2, "PriorBox")
        width = legacy_dim(self, feat, 3, "PriorBox")
        if self.img_hw is not None:
            img_h, img_w = (int(v) for v in self.img_hw)
        else:
            img_h = legacy_dim(self, image, 2, "PriorBox")
            img_w = legacy_dim(self, image, 3, "PriorBox")
        return height, width, img_h, img_w

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        height, width = self._sizes(*bottom_shapes[:2])[:2]
        return [(1, 2, height * width * self.num_priors * 4)]

    def forward(self, feat: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        sizes = self._sizes(tuple(feat.shape), tuple(image.shape))
        out = torch.from_numpy(_prior_boxes(self._key(), *sizes))
        return out.to(feat.device)

    def _key(self) -> tuple:
        return (tuple(self.min_sizes), tuple(self.max_sizes), tuple(self.aspect_ratios),
                self.clip, tuple(self.variance), self.step_hw, self.offset, self.faceboxes)


# FaceBoxes' dense anchors: min_size -> (grid side, spacing in pixels)
_FACEBOXES_DENSE = {32: (4, 8), 64: (2, 16)}


@lru_cache(maxsize=64)
def _prior_shapes(min_sizes: tuple[float, ...], max_sizes: tuple[float, ...],
                  ratios: tuple[float, ...], faceboxes: bool) -> np.ndarray:
    """(num_priors, 4) rows ``(dx, dy, half_w, half_h)`` in the fork's order: the box centre's
    shift from the cell centre and its half extents, rounded as the fork does.

    The extra aspect ratios scale ``min_size`` (never ``sqrt(min * max)``), in float.
    FaceBoxes: min-size boxes at its dense shifts, half extent ``(size - 1) / 2``.
    """
    out = []
    for s, size in enumerate(min_sizes):
        lo = np.float32(int(size))
        if faceboxes:
            side, gap = _FACEBOXES_DENSE.get(int(size), (1, 0))
            half = (float(lo) - 1) / 2
            shifts = range(-(side // 2), side - side // 2)
            out.extend((j * gap, i * gap, half, half) for i in shifts for j in shifts)
        else:
            out.append((0, 0, lo / 2, lo / 2))
        if max_sizes:
            mean = np.float32(math.sqrt(int(size) * int(max_sizes[s])))
            out.append((0, 0, mean / 2, mean / 2))
        for ar in ratios:
            if abs(ar - 1.0) >= 1e-6:
                root = np.sqrt(np.float32(ar))
                out.append((0, 0, lo * root / 2, lo / root / 2))
    return np.array(out, dtype=np.float64)


@lru_cache(maxsize=64)
def _prior_boxes(key: tuple, height: int, width: int, img_h: int, img_w: int) -> np.ndarray:
    """PriorBoxLayer::Forward_cpu for one geometry (cached: it depends on shapes only)."""
    min_sizes, max_sizes, ratios, clip, variance, step_hw, offset, faceboxes = key
    if step_hw is None:
        step_h, step_w = np.float32(img_h / height), np.float32(img_w / width)
    else:
        step_h, step_w = np.float32(step_hw[0]), np.float32(step_hw[1])
    off = np.float32(offset)
    cy = (np.arange(height, dtype=np.float32) + off) * step_h
    cx = (np.arange(width, dtype=np.float32) + off) * step_w
    shapes = _prior_shapes(min_sizes, max_sizes, ratios, faceboxes)
    dx, dy, half_w, half_h = shapes.T
    # box centres: cell centre plus shift, in float as the fork adds them
    cxg = (cx[None, :, None] + dx.astype(np.float32)).astype(np.float64)
    cyg = (cy[:, None, None] + dy.astype(np.float32)).astype(np.float64)
    cxg = np.broadcast_to(cxg, (height, width, len(shapes)))
    cyg = np.broadcast_to(cyg, (height, width, len(shapes)))
    coords = np.stack([(cxg - half_w) / img_w, (cyg - half_h) / img_h,
                       (cxg + half_w) / img_w, (cyg + half_h) / img_h], axis=-1)
    coords = coords.astype(np.float32).reshape(-1)
    if clip:
        coords = np.clip(coords, 0, 1)
    var = np.resize(np.asarray(variance, dtype=np.float32), coords.size)
    return np.stack([coords, var]).reshape(1, 2, -1)
