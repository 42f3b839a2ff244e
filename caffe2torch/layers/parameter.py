"""Parameter: a learnable blob exposed as a top (parameter_layer.hpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec
from .registry import register


@register("Parameter")
class ParameterLayer(CaffeLayer):
    """One zero-initialised blob of ``parameter_param.shape``; the top shares its data and diff.

    The top is a view of the blob, so the top's diff and the blob's diff are the same
    gradient, as with Caffe's ShareData/ShareDiff.
    """

    max_bottoms = 0
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        shape = [int(d) for d in spec.param.parameter_param.shape.dim]
        if any(d < 0 for d in shape):
            raise self.error(f"parameter_param.shape dims must be >= 0, got {shape}")
        self.add_blob(shape, None)

    def forward(self) -> torch.Tensor:
        blob = self.blobs[0]
        return blob.view_as(blob)
