"""Softmax over one axis (softmax_layer.cpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


@register("Softmax", "SOFTMAX")
class Softmax(CaffeLayer):
    """``softmax_param.axis`` defaults to 1 (not the last axis) and may be negative.

    Caffe subtracts the max, exponentiates and divides by the sum; its backward
    ``(dy - sum(dy * y)) * y`` is the one torch's softmax uses.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.axis = int(spec.param.softmax_param.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, canonical_axis(self, self.axis, x.shape, "softmax_param.axis"))
