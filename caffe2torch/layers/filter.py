"""Filter: keep the batch items whose selector is non-zero (filter_layer.cpp)."""
from __future__ import annotations

from typing import Sequence

import torch

from .base import CaffeLayer, LayerSpec, Shape
from .registry import register


@register("Filter")
class Filter(CaffeLayer):
    """Bottoms ``0..k-1`` are filtered by the last bottom, the selector ``(N, 1, ...)``.

    Item ``n`` of every filtered bottom goes to the tops when ``selector[n] != 0``; the
    output batch size depends on the data. The selector gets no diff (Caffe aborts if
    asked to back-propagate to it); the filtered bottoms get the top diff at the kept
    items and zero elsewhere.
    """

    min_bottoms = 2
    min_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        bottoms, tops = len(spec.param.bottom), len(spec.param.top)
        if tops != bottoms - 1:
            raise self.error(f"needs one top per filtered bottom (all bottoms but the last, the "
                             f"selector): expected {bottoms - 1} top(s), got {tops}")

    def _check(self, shapes: Sequence[Sequence[int]]) -> None:
        selector = list(shapes[-1])
        if not selector or any(d != 1 for d in selector[1:]):
            raise self.error(f"the selector (last bottom) must be (N, 1, ...) with every axis "
                             f"after the first of size 1, got shape {selector}")
        for i, shape in enumerate(shapes[:-1]):
            if not len(shape) or shape[0] != selector[0]:
                raise self.error(f"each filtered bottom must have the selector's first dimension: "
                                 f"expected bottom {i} to start with {selector[0]}, got shape "
                                 f"{list(shape)}")

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Before data flows, Caffe's first Reshape keeps the whole batch."""
        self._check(bottom_shapes)
        return [tuple(s) for s in bottom_shapes[:-1]]

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self._check([b.shape for b in bottoms])
        keep = torch.nonzero(bottoms[-1].detach().reshape(-1)).squeeze(1)
        tops = tuple(b.index_select(0, keep) for b in bottoms[:-1])
        return tops[0] if len(tops) == 1 else tops
