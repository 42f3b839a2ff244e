"""Input, Split and Silence: the layers that only route blobs."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec, Shape
from .registry import register


@register("Input")
class Input(CaffeLayer):
    """Declares net inputs; the compiler feeds its tops, so it computes nothing."""

    min_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        shapes = spec.param.input_param.shape
        if len(shapes) not in (0, 1, len(spec.param.top)):
            raise self.error(f"input_param needs 0, 1 or one shape per top "
                             f"({len(spec.param.top)}), got {len(shapes)}")
        self.shapes = [tuple(int(d) for d in (shapes[0] if len(shapes) == 1 else shapes[i]).dim)
                       if shapes else () for i in range(len(spec.param.top))]

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self) -> tuple[torch.Tensor, ...]:
        raise self.error("Input layers are fed by the net, not called")


@register("Split", "SPLIT")
class Split(CaffeLayer):
    """Copies its bottom to every top; autograd sums the tops' gradients like Caffe's backward.

    Each top is a distinct view so pycaffe can report one diff per split blob.
    """

    min_bottoms = max_bottoms = 1
    min_tops = 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.view_as(x) for _ in range(self.num_tops))


@register("Silence", "SILENCE")
class Silence(CaffeLayer):
    """Consumes its bottoms so they are not net outputs; their gradient is zero."""

    min_bottoms = 1
    max_tops = 0

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return ()
