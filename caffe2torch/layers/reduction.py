"""Reduction: SUM, ASUM, SUMSQ or MEAN over all axes from ``axis`` on (reduction_layer.cpp)."""
from __future__ import annotations

import numpy as np
import torch

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register

_OP = caffe_pb2.ReductionParameter


@register("Reduction")
class Reduction(CaffeLayer):
    """Reduces every axis from ``axis`` to the end; the top keeps the axes before it.

    With ``axis`` 0 (the default) the top is a 0-axis scalar, as in Caffe.

    The top is ``coeff * reduce(x)``; MEAN is SUM with ``coeff / dim`` (computed in
    float32 as Caffe does). Autograd's gradients are Caffe's: ``coeff * dy`` for SUM and
    MEAN, ``coeff * sign(x) * dy`` (sign(0) = 0) for ASUM and ``2 * coeff * x * dy`` for SUMSQ.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.reduction_param
        self.op = p.operation
        self.axis = int(p.axis)
        self.coeff = float(p.coeff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = canonical_axis(self, self.axis, x.shape, "reduction_param.axis")
        rows = x.reshape(*x.shape[:axis], -1)
        if self.op == _OP.ASUM:
            top = rows.abs().sum(-1)
        elif self.op == _OP.SUMSQ:
            top = (rows * rows).sum(-1)
        else:
            top = rows.sum(-1)
        coeff = self.coeff
        if self.op == _OP.MEAN:
            coeff = float(np.float32(coeff) / np.float32(rows.shape[-1]))
        return top if coeff == 1.0 else top * coeff
