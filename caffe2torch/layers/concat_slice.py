"""Concat and Slice: joining and splitting blobs along one axis (concat_layer.cpp, slice_layer.cpp)."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


class _AxisLayer(CaffeLayer):
    """Shared axis choice of Concat and Slice: ``axis`` (may be negative) or the legacy
    non-negative ``<legacy>`` field; setting both is an error."""

    def _init_axis(self, param, param_name: str, legacy: str) -> None:
        if param.HasField("axis") and param.HasField(legacy):
            raise self.error(f"set either {param_name}.axis or the legacy {param_name}.{legacy}, "
                             f"not both (got axis {param.axis} and {legacy} {getattr(param, legacy)})")
        self._legacy = f"{param_name}.{legacy}" if param.HasField(legacy) else None
        self._axis_name = self._legacy or f"{param_name}.axis"
        self._axis = int(getattr(param, legacy) if self._legacy else param.axis)

    def axis_for(self, shape: Sequence[int]) -> int:
        """The canonical axis for a bottom of ``shape``."""
        if self._legacy is None:
            return canonical_axis(self, self._axis, shape, self._axis_name)
        # the legacy field is a uint32: no negative indexing
        if not 0 <= self._axis < len(shape):
            raise self.error(f"{self._axis_name} {self._axis} is out of range for a bottom of shape "
                             f"{list(shape)}: expected 0 <= {self._axis_name} < {len(shape)}")
        return self._axis


@register("Concat", "CONCAT")
class Concat(_AxisLayer):
    """Joins its bottoms along ``axis`` (default 1); every other dim must agree.

    Autograd hands each bottom its slice of the top diff, as Caffe's backward does.
    """

    min_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self._init_axis(spec.param.concat_param, "concat_param", "concat_dim")

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        first = bottoms[0].shape
        axis = self.axis_for(first)
        for i, b in enumerate(bottoms[1:], 1):
            if b.dim() != len(first) or any(b.shape[j] != first[j]
                                             for j in range(len(first)) if j != axis):
                raise self.error(f"all bottoms must have the same shape except along axis {axis}: "
                                 f"expected bottom {i} like {list(first)}, got {list(b.shape)}")
        if len(bottoms) == 1:  # Caffe shares data and diff with the single bottom
            return bottoms[0].view_as(bottoms[0])
        return torch.cat(bottoms, axis)


@register("Slice", "SLICE")
class Slice(_AxisLayer):
    """Splits its bottom along ``axis`` (default 1) at ``slice_point``s, or equally.

    The tops are views; autograd joins their diffs back like Caffe's backward.
    """

    min_bottoms = max_bottoms = 1
    min_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.slice_param
        self._init_axis(p, "slice_param", "slice_dim")
        self.points = [int(s) for s in p.slice_point]
        tops = len(spec.param.top)
        if self.points and len(self.points) != tops - 1:
            raise self.error(f"slice_param.slice_point needs one point fewer than the tops: "
                             f"expected {tops - 1} point(s) for {tops} tops, got {len(self.points)}")
        previous = 0
        for point in self.points:
            if point <= previous:
                raise self.error(f"slice_param.slice_point must be strictly increasing and > 0: "
                                 f"expected a point > {previous}, got {point} in {self.points}")
            previous = point

    def sizes(self, length: int) -> list[int]:
        """The tops' extents along the axis, for an axis of ``length``."""
        n = self.num_tops
        if self.points:
            if n > length or self.points[-1] > length:
                raise self.error(f"slice_param.slice_point {self.points} does not fit an axis of "
                                 f"size {length}: expected {n} tops with points <= {length}")
            bounds = [0, *self.points, length]
            return [b - a for a, b in zip(bounds, bounds[1:])]
        if length % n:
            raise self.error(f"the number of tops must divide the sliced axis evenly: expected "
                             f"a size divisible by {n}, got {length}")
        return [length // n] * n

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        axis = self.axis_for(x.shape)
        sizes = self.sizes(x.shape[axis])
        if len(sizes) == 1:  # Caffe shares data and diff with the single top
            return x.view_as(x)
        return tuple(torch.split(x, sizes, axis))
