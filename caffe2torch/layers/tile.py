"""Tile: repeat the blob block from ``axis`` on, ``tiles`` times (tile_layer.cpp)."""
from __future__ import annotations

import torch

from .base import CaffeLayer, LayerSpec, canonical_axis
from .registry import register


@register("Tile")
class Tile(CaffeLayer):
    """Caffe copies each outer block (axes ``axis..``) ``tiles`` times in a row, which is
    ``Tensor.repeat`` on ``axis`` (not ``repeat_interleave``); backward sums the copies."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.tile_param
        if not p.HasField("tiles"):
            raise self.error("tile_param.tiles is required: expected a positive number of tiles, got none")
        if p.tiles <= 0:
            raise self.error(f"tile_param.tiles must be positive, got {p.tiles}")
        self.axis = int(p.axis)
        self.tiles = int(p.tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = canonical_axis(self, self.axis, x.shape, "tile_param.axis")
        repeats = [1] * x.dim()
        repeats[axis] = self.tiles
        return x.repeat(repeats)
