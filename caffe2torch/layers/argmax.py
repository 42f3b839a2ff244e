"""ArgMax: the top_k indices (or values) per instance or along an axis (argmax_layer.cpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


def _top_k(x: torch.Tensor, dim: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest values along ``dim`` and their indices, in Caffe's order.

    Caffe partial-sorts (value, index) pairs with ``std::greater``, so among equal values
    the larger index comes first. Flipping ``dim`` turns that into "first occurrence
    first", which ``max`` (documented to return the first maximal index) and a stable
    descending sort both give.
    """
    flipped = x.flip(dim)
    if k == 1:
        values, position = flipped.max(dim, keepdim=True)
    else:
        values, position = flipped.sort(dim=dim, descending=True, stable=True)
        values, position = values.narrow(dim, 0, k), position.narrow(dim, 0, k)
    return values, (x.shape[dim] - 1) - position


@register("ArgMax", "ARGMAX")
class ArgMax(CaffeLayer):
    """Indices of the ``top_k`` largest values, as floats.

    Without ``axis`` the search runs over each instance's flattened ``C*H*W...`` and the
    top is ``(N, 1, top_k)`` padded with 1s to the bottom's number of axes (at least
    3), or ``(N, 2, top_k, ...)`` holding indices then values with ``out_max_val``.
    With ``axis`` that axis becomes ``top_k`` long and holds values if ``out_max_val``,
    else indices. Caffe has no backward for it, so the top carries no gradient.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.argmax_param
        if p.top_k < 1:
            raise self.error(f"argmax_param.top_k must be at least 1, got {p.top_k}")
        self.top_k = int(p.top_k)
        self.out_max_val = p.out_max_val
        self.axis = int(p.axis) if p.HasField("axis") else None

    def _check_k(self, available: int, where: str) -> None:
        if self.top_k > available:
            raise self.error(f"argmax_param.top_k must not exceed {where}: expected <= "
                             f"{available}, got {self.top_k}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.axis is not None:
            axis = canonical_axis(self, self.axis, x.shape, "argmax_param.axis")
            self._check_k(x.shape[axis], f"the size of axis {axis}")
            values, indices = _top_k(x, axis, self.top_k)
            return values if self.out_max_val else indices.to(x.dtype)
        rows = x.reshape(x.shape[0], -1)
        self._check_k(rows.shape[1], "the flattened size of one instance")
        values, indices = _top_k(rows, 1, self.top_k)
        parts = (indices.to(x.dtype), values) if self.out_max_val else (indices.to(x.dtype),)
        top = torch.stack(parts, 1)
        return top.reshape(*top.shape, *[1] * (x.dim() - 3))
