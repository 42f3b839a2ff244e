"""Crop: cut bottom 0 down to bottom 1's size from ``axis`` on (crop_layer.cpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


@register("Crop")
class Crop(CaffeLayer):
    """Every axis from ``crop_param.axis`` (default 2) on takes bottom 1's size.

    ``offset`` is absent (0), one value for all cropped axes, or one per cropped axis.
    Bottom 1 only supplies a shape, so it gets no diff; the top is a view of bottom 0,
    and autograd puts the top diff back at the offsets, zero elsewhere, like Caffe.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.crop_param
        self.axis = int(p.axis)
        self.offsets = [int(o) for o in p.offset]

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        ndim = x.dim()
        start = canonical_axis(self, self.axis, x.shape, "crop_param.axis")
        if len(self.offsets) > 1 and start + len(self.offsets) != ndim:
            raise self.error(f"crop_param.offset needs one value per cropped axis: expected "
                             f"{ndim - start} (axes {start}..{ndim - 1}) or a single one, "
                             f"got {len(self.offsets)}")
        if like.dim() < ndim:
            raise self.error(f"bottom 1 supplies the crop sizes of axes {start}..{ndim - 1}: "
                             f"expected at least {ndim} axes, got shape {list(like.shape)}")
        index = [slice(None)] * start
        for i in range(start, ndim):
            offset = self.offsets[0] if len(self.offsets) == 1 else \
                self.offsets[i - start] if self.offsets else 0
            size = like.shape[i]
            if offset + size > x.shape[i]:
                raise self.error(f"the crop of axis {i} is out of bounds: expected offset + size "
                                 f"<= {x.shape[i]} (bottom 0 shape {list(x.shape)}), got offset "
                                 f"{offset} + size {size}")
            index.append(slice(offset, offset + size))
        return x[tuple(index)]
