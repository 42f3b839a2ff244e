"""Scale and Bias (scale_layer.cpp, bias_layer.cpp): a blob broadcast over bottom[0].

The operand (a learned blob, or bottom[1]) covers the axes
``[axis, axis + operand.ndim)`` of bottom[0] and is repeated over the axes before
and after them. Autograd's broadcast gradients are Caffe's sums over those axes.
"""
from __future__ import annotations

import torch

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape, canonical_axis
from .registry import register


def _learned_shape(layer: CaffeLayer, bottom: Shape, axis: int, num_axes: int,
                   what: str) -> Shape:
    """The shape of a learned operand: ``bottom[axis : axis + num_axes]`` (-1: to the end)."""
    axis = canonical_axis(layer, axis, bottom, f"{what}.axis")
    if num_axes < -1:
        raise layer.error(f"{what}.num_axes must be non-negative, or -1 to extend to the end "
                          f"of bottom[0], got {num_axes}")
    if num_axes >= 0 and axis + num_axes > len(bottom):
        raise layer.error(f"{what}: axis {axis} + num_axes {num_axes} extends past bottom[0]'s "
                          f"{len(bottom)} axes (shape {list(bottom)})")
    return tuple(bottom[axis:] if num_axes == -1 else bottom[axis:axis + num_axes])


def _operand_axis(layer: CaffeLayer, bottom: Shape, operand: Shape, axis: int,
                  what: str) -> int:
    """Reshape's checks: where the operand lines up with bottom[0] (0 for a scalar)."""
    if not operand:
        return 0
    axis = canonical_axis(layer, axis, bottom, f"{what}.axis")
    covered = tuple(bottom[axis:axis + len(operand)])
    if covered != tuple(operand):
        raise layer.error(f"operand shape {list(operand)} must equal bottom[0]'s axes "
                          f"{axis}..{axis + len(operand) - 1} of shape {list(bottom)}: "
                          f"expected {list(covered)}, got {list(operand)}")
    return axis


def _broadcast(operand: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """View ``operand`` so it broadcasts against a bottom of ``ndim`` axes at ``axis``."""
    trailing = ndim - axis - operand.dim()
    return operand.reshape(operand.shape + (1,) * trailing) if trailing else operand


@register("Bias")
class Bias(CaffeLayer):
    """``bottom[0] + bias``; the bias is bottom[1] or a learned blob (default zeros)."""

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.bias_param
        bottom = spec.bottom_shapes[0]
        if len(spec.bottom_shapes) > 1:
            operand = spec.bottom_shapes[1]
        else:
            operand = _learned_shape(self, bottom, p.axis, p.num_axes, "bias_param")
            self.add_blob(operand, p.filler)
        self.axis = _operand_axis(self, bottom, operand, p.axis, "bias_param")

    def forward(self, x: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        b = bias[0] if bias else self.blobs[0]
        return x + _broadcast(b, x.dim(), self.axis)


@register("Scale")
class Scale(CaffeLayer):
    """``bottom[0] * scale (+ bias)``; the scale is bottom[1] or a learned blob (default
    ones). ``bias_term`` adds a learned bias of the scale's shape (default zeros).
    Blobs: ``[scale, bias]``, or ``[bias]`` when the scale is bottom[1].
    """

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.scale_param
        bottom = spec.bottom_shapes[0]
        if len(spec.bottom_shapes) > 1:
            operand = spec.bottom_shapes[1]
        else:
            operand = _learned_shape(self, bottom, p.axis, p.num_axes, "scale_param")
            filler = p.filler if p.HasField("filler") else \
                caffe_pb2.FillerParameter(type="constant", value=1.0)
            self.add_blob(operand, filler)
        self.axis = _operand_axis(self, bottom, operand, p.axis, "scale_param")
        self.bias_term = p.bias_term
        if self.bias_term:
            # Caffe builds a Bias layer with this axis and the scale's number of axes.
            self.add_blob(operand, p.bias_filler)

    def forward(self, x: torch.Tensor, *scale: torch.Tensor) -> torch.Tensor:
        s = _broadcast(scale[0] if scale else self.blobs[0], x.dim(), self.axis)
        if self.bias_term:
            return torch.addcmul(_broadcast(self.blobs[-1], x.dim(), self.axis), x, s)
        return x * s
