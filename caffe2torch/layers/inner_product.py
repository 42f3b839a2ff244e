"""InnerProduct and Embed: Caffe's fully connected layer and its index-lookup twin."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import CaffeLayer, LayerSpec, canonical_axis
from .conv import filler_of
from .registry import register


@register("InnerProduct", "INNER_PRODUCT")
class InnerProduct(CaffeLayer):
    """``y = x W^T + b`` over K = the product of all bottom axes from ``axis`` on.

    InnerProductLayer: the leading axes are kept, top shape ``bottom.shape[:axis] + (N,)``;
    the weight is (N, K), or (K, N) with ``transpose: true``; the bias is (N,).
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.inner_product_param
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error(f"inner_product_param.num_output must be positive, got "
                             f"{self.num_output}")
        self.axis_param = int(p.axis)
        shape = spec.bottom_shapes[0]
        axis = canonical_axis(self, self.axis_param, shape)
        self.k = math.prod(shape[axis:])
        self.transpose = bool(p.transpose)
        weight_shape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.add_blob(weight_shape, filler_of(p, "weight_filler"))
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), filler_of(p, "bias_filler"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = canonical_axis(self, self.axis_param, x.shape)
        k = math.prod(x.shape[axis:])
        if k != self.k:
            raise self.error(f"input size incompatible with the weights: expected {self.k} "
                             f"values from axis {axis} on, got {k} (bottom shape {list(x.shape)})")
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        return F.linear(x.flatten(axis), weight, self.blobs[1] if self.bias_term else None)


@register("Embed")
class Embed(CaffeLayer):
    """Rows of a (input_dim, num_output) table picked by float indices, plus an optional bias.

    EmbedLayer casts each index with ``static_cast<int>`` (truncation toward zero); an
    index outside [0, input_dim) is an error. The bottom gets no gradient (Caffe refuses
    to back-propagate to it); the weight gradient accumulates repeated indices.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.embed_param
        self.num_output = int(p.num_output)
        self.input_dim = int(p.input_dim)
        if self.num_output <= 0:
            raise self.error(f"embed_param.num_output must be positive, got {self.num_output}")
        if self.input_dim <= 0:
            raise self.error(f"embed_param.input_dim must be positive, got {self.input_dim}")
        self.add_blob((self.input_dim, self.num_output), filler_of(p, "weight_filler"))
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), filler_of(p, "bias_filler"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = x.detach().to(torch.int64)
        if x.device.type != "meta" and not torch.jit.is_tracing():
            bad = (index < 0) | (index >= self.input_dim)
            if bool(bad.any()):
                value = x.detach()[bad].flatten()[0].item()
                raise self.error(f"index out of range: expected 0 <= index < {self.input_dim} "
                                 f"(input_dim), got {value:g}")
        out = F.embedding(index, self.blobs[0])
        return out + self.blobs[1] if self.bias_term else out
