"""Reshape and Flatten: new views of a blob's data (reshape_layer.cpp, flatten_layer.cpp).

Also home of :func:`canonical_axis`, Caffe's axis rule, which the other shape and
routing layers of this family share.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


def _forbid_in_place(layer: CaffeLayer, spec: LayerSpec) -> None:
    """Reshape and Flatten CHECK that top and bottom are different blobs."""
    if spec.param.top and spec.param.bottom and spec.param.top[0] == spec.param.bottom[0]:
        raise layer.error(f"does not allow in-place computation: expected a top name other "
                          f"than its bottom, got top '{spec.param.top[0]}' = bottom")


@register("Reshape")
class Reshape(CaffeLayer):
    """``reshape_param.shape`` replaces the bottom axes ``[axis, axis + num_axes)``.

    A ``0`` copies the bottom dim at the same position (counted from ``axis``), one
    ``-1`` is inferred from the count; the top is a view of the bottom (ShareData).
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        _forbid_in_place(self, spec)
        p = spec.param.reshape_param
        self.dims = [int(d) for d in p.shape.dim]
        self.axis = int(p.axis)
        self.num_axes = int(p.num_axes)
        self.copy_axes = [i for i, d in enumerate(self.dims) if d == 0]
        inferred = [i for i, d in enumerate(self.dims) if d == -1]
        if len(inferred) > 1:
            raise self.error(f"reshape_param.shape may hold at most one -1 dim, got "
                             f"{len(inferred)} in {self.dims}")
        bad = [d for d in self.dims if d < -1]
        if bad:
            raise self.error(f"reshape_param.shape dims must be >= -1, got {bad[0]} in {self.dims}")
        if self.num_axes < -1:
            raise self.error(f"reshape_param.num_axes must be >= 0, or -1 for all, got {self.num_axes}")
        self.inferred = inferred[0] if inferred else None
        self.constant_count = math.prod(d for d in self.dims if d > 0)

    def top_shape(self, shape: Sequence[int]) -> list[int]:
        """ReshapeLayer::Reshape's rule for a bottom of ``shape``."""
        ndim = len(shape)
        start = self.axis if self.axis >= 0 else ndim + self.axis + 1
        if not 0 <= start <= ndim:
            raise self.error(f"reshape_param.axis {self.axis} is out of range for a bottom of shape "
                             f"{list(shape)}: expected {-ndim - 1} <= axis <= {ndim}")
        end = ndim if self.num_axes == -1 else start + self.num_axes
        if end > ndim:
            raise self.error(f"reshape_param.axis + num_axes is out of range: expected <= {ndim} "
                             f"(bottom shape {list(shape)}), got {end}")
        new = list(self.dims)
        for i in self.copy_axes:
            if start + i >= ndim:
                raise self.error(f"reshape_param.shape has a 0 at position {i} but the bottom "
                                 f"{list(shape)} has no axis {start + i} to copy")
            new[i] = int(shape[start + i])
        count = math.prod(shape)
        if self.inferred is not None:
            known = self.constant_count * math.prod(shape[:start]) * math.prod(shape[end:]) * \
                math.prod(new[i] for i in self.copy_axes)
            if known == 0 or count % known:
                raise self.error(f"bottom count ({count}, shape {list(shape)}) must be divisible by "
                                 f"the product of the specified dimensions ({known})")
            new[self.inferred] = count // known
        top = [*shape[:start], *new, *shape[end:]]
        if math.prod(top) != count:
            raise self.error(f"output count must match input count: expected {count} "
                             f"(bottom shape {list(shape)}), got {math.prod(top)} (shape {top})")
        return top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.top_shape(x.shape))


@register("Flatten", "FLATTEN")
class Flatten(CaffeLayer):
    """Merges axes ``axis..end_axis`` (inclusive, default 1..-1) into one; a view."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        _forbid_in_place(self, spec)
        p = spec.param.flatten_param
        self.axis = int(p.axis)
        self.end_axis = int(p.end_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        start = canonical_axis(self, self.axis, shape, "flatten_param.axis")
        end = canonical_axis(self, self.end_axis, shape, "flatten_param.end_axis")
        # Blob::count(start, end + 1) CHECKs start <= end + 1; end == start - 1 inserts a 1.
        if end < start - 1:
            raise self.error(f"flatten_param.end_axis must not precede axis: expected end_axis >= "
                             f"{start - 1}, got {end} (bottom shape {list(shape)})")
        return x.reshape(*shape[:start], math.prod(shape[start:end + 1]), *shape[end + 1:])
