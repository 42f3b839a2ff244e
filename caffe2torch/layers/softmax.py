"""Softmax over one axis (softmax_layer.cpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


class _Softmax(torch.autograd.Function):
    """torch's softmax with Caffe's backward ``(dy - sum(dy * y)) * y``, whose dot product
    Caffe takes with ``cblas_sdot``: OpenBLAS accumulates it in double. With a peaked
    softmax, ``dy - sum(dy * y)`` cancels most digits, so a float32 sum (torch's) misses
    Caffe's gradient by up to 1e-4 relative; summing in double reproduces it bit for bit."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, axis: int) -> torch.Tensor:
        y = torch.softmax(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (y,) = ctx.saved_tensors
        wide = torch.float64 if y.dtype in (torch.float32, torch.float64) else torch.float32
        dot = (dy.to(wide) * y.to(wide)).sum(ctx.axis, keepdim=True).to(y.dtype)
        return (dy - dot) * y, None


@register("Softmax", "SOFTMAX")
class Softmax(CaffeLayer):
    """``softmax_param.axis`` defaults to 1 (not the last axis) and may be negative.

    Caffe subtracts the max, exponentiates and divides by the sum (torch's softmax).
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.axis = int(spec.param.softmax_param.axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = canonical_axis(self, self.axis, x.shape, "softmax_param.axis")
        if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():
            return _Softmax.apply(x, axis)
        return torch.softmax(x, axis)   # what tracing and ONNX export record
