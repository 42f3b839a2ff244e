"""BatchReindex: gather batch items by a float index blob (batch_reindex_layer.cpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer
from .registry import register


@register("BatchReindex")
class BatchReindex(CaffeLayer):
    """``top[i] = bottom0[int(bottom1[i])]``; bottom 1 is a 1-D blob of indices.

    Indices are truncated toward zero like Caffe's ``static_cast<int>`` after Caffe's
    range check on the float value. Repeated indices accumulate their diffs (autograd's
    ``index_select`` backward); the index blob gets no diff.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if index.dim() != 1:
            raise self.error(f"bottom 1 (the indices) must be 1-D: expected 1 axis, got shape "
                             f"{list(index.shape)}")
        if x.dim() == 0:
            raise self.error("bottom 0 must have a batch axis, got a 0-axis blob")
        index = index.detach()
        if index.device.type != "meta" and not torch.jit.is_tracing():
            bad = (index < 0) | (index >= x.shape[0]) | index.isnan()
            if bool(bad.any()):
                value = float(index[bad][0])
                raise self.error(f"index {value} out of range: expected 0 <= index < {x.shape[0]} "
                                 f"(bottom 0's batch size)")
        return x.index_select(0, index.to(torch.long))
