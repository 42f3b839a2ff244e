"""SphereFace's MarginInnerProduct (A-Softmax), as wy1iu/sphereface's Caffe computes it.

Source: ``tools/caffe-sphereface/src/caffe/layers/margin_inner_product_layer.cu`` (and the
``.cpp`` twin). The layer normalises its weight rows in place, then replaces the label's
logit ``|x| cos(theta)`` by ``|x| psi(theta)`` with ``psi(theta) = (-1)^k cos(m theta) - 2k``
for margin ``m`` (SINGLE 1, DOUBLE 2, TRIPLE 3, QUADRUPLE 4), blended with the plain logit
by ``lambda``, which anneals with an iteration counter. Backward is the fork's own, which is
not the derivative of its forward (see :class:`MarginInnerProduct`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape, canonical_axis
from .conv import filler_of
from .registry import register

_Type = caffe_pb2.MarginInnerProductParameter


def _margin_terms(cos: torch.Tensor, kind: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(psi, coeff_w, coeff_x * |x|)`` at the label's logit for margin ``kind``.

    ``psi`` is the fork's ``(-1)^k cos(m theta) - 2k`` written with the sign helpers of
    margin_inner_product_layer.hpp; the coefficients are the fork's backward weights of
    ``w`` and ``x / |x|`` before it scales them to unit length.
    """
    sign0 = torch.sign(cos)
    c2 = cos * cos
    if kind == _Type.DOUBLE:
        psi = 2 * sign0 * c2 - 1
        return psi, 4 * sign0 * cos, -(2 * sign0 * c2 + 1)
    if kind == _Type.TRIPLE:
        sign1 = torch.sign(cos.abs() - 0.5)
        sign2 = sign0 * (1 + sign1) - 2
        c3 = c2 * cos
        psi = sign1 * (4 * c3 - 3 * cos) + sign2
        return psi, sign1 * (12 * c2 - 3), -(8 * sign1 * c3 - sign2)
    sign3 = sign0 * torch.sign(2 * c2 - 1)
    sign4 = 2 * sign0 + sign3 - 3
    c4 = c2 * c2
    psi = sign3 * (8 * c4 - 8 * c2 + 1) + sign4
    return psi, sign3 * (32 * c2 * cos - 16 * cos), -(sign3 * (24 * c4 - 8 * c2 - 1) - sign4)


class _MarginProduct(torch.autograd.Function):
    """``x (M, K)``, unit-row ``w (N, K)``, integer labels ``(M,)`` -> logits ``(M, N)``."""

    @staticmethod
    def forward(ctx, x, w, label, kind: int, lam: float):
        logits = x @ w.t()
        # the weight as used here: a later forward rescales the blob in place
        ctx.kind, ctx.lam, ctx.weight = kind, lam, w.detach().clone()
        if kind == _Type.SINGLE:
            ctx.save_for_backward(x, label, None)
            return logits
        rows = torch.arange(len(x), device=x.device)
        x_norm = x.square().sum(1).sqrt()
        plain = logits[rows, label]
        cos = plain / x_norm
        ctx.save_for_backward(x, label, cos)
        out = logits.clone()
        out[rows, label] = (plain * lam + x_norm * _margin_terms(cos, kind)[0]) / (1 + lam)
        return out

    @staticmethod
    def backward(ctx, top_diff):
        x, label, cos = ctx.saved_tensors
        w = ctx.weight
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = top_diff.t() @ x
        if ctx.needs_input_grad[0]:
            grad_x = top_diff @ w
            if ctx.kind != _Type.SINGLE:
                rows = torch.arange(len(x), device=x.device)
                w_label = w[label]
                _, coeff_w, coeff_x = _margin_terms(cos, ctx.kind)
                coeff_x = coeff_x / x.square().sum(1).sqrt()
                length = torch.sqrt(coeff_w * coeff_w + coeff_x * coeff_x)
                diff = top_diff[rows, label]
                lam = ctx.lam
                # the label's column: drop the plain term, add the fork's margin term
                grad_x = grad_x + (diff * (lam / (1 + lam) - 1))[:, None] * w_label
                scale = diff / (1 + lam) / length
                grad_x = grad_x + (scale * coeff_w)[:, None] * w_label \
                    + (scale * coeff_x)[:, None] * x
        return grad_x, grad_w, None, None, None


@register("MarginInnerProduct")
class MarginInnerProduct(CaffeLayer):
    """A-Softmax logits: bottoms ``x`` and ``label``; tops the logits and, optionally, lambda.

    Each forward adds 1 to the iteration counter (starting at ``iteration``), sets
    ``lambda = max(lambda_min, base * (1 + gamma * iter)^-power)`` (float, as the fork)
    and first rescales every weight row to unit length in place, as the fork does to
    its blob. Logits are ``x . w_j`` except at the label, where they become
    ``(lambda x . w_y + |x| psi(theta)) / (1 + lambda)`` (SINGLE: no change).

    Backward (the fork's): the weight gets ``top_diff^T x`` as if the logits were plain;
    ``x`` gets ``top_diff w`` except at the label, where ``d/dx`` of ``|x| psi`` is
    written ``coeff_w w + coeff_x x`` and the fork rescales ``(coeff_w, coeff_x)`` to unit
    length before adding ``top_diff / (1 + lambda)`` times it, plus ``lambda / (1 +
    lambda)`` of the plain term. The label gets no gradient.
    """

    min_bottoms = max_bottoms = 2
    min_tops, max_tops = 1, 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.margin_inner_product_param
        self.p = p
        self.num_output = int(p.num_output)
        if self.num_output <= 0:
            raise self.error(f"margin_inner_product_param.num_output must be positive, got "
                             f"{self.num_output}")
        if p.type not in _Type.MarginType.values():
            raise self.error(f"unknown margin_inner_product_param.type {p.type}: expected "
                             "SINGLE, DOUBLE, TRIPLE or QUADRUPLE")
        self.kind = int(p.type)
        self.axis_param = int(p.axis)
        shape = spec.bottom_shapes[0]
        axis = canonical_axis(self, self.axis_param, shape)
        self.k = math.prod(shape[axis:])
        first = [s[0] if s else 1 for s in spec.bottom_shapes]
        if first[0] != first[1]:
            raise self.error(f"number of labels must match number of outputs: bottom shapes "
                             f"{list(shape)} and {list(spec.bottom_shapes[1])} differ in num "
                             f"(one label per sample)")
        self.iteration = int(p.iteration)
        self.lambda_ = 0.0
        self.add_blob((self.num_output, self.k), filler_of(p, "weight_filler"))

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        axis, m = self._layout(bottom_shapes[0], bottom_shapes[1])
        return [(*bottom_shapes[0][:axis], self.num_output), (1,)][:self.num_tops]

    def _layout(self, shape: Shape, label_shape: Shape) -> tuple[int, int]:
        axis = canonical_axis(self, self.axis_param, shape)
        k, m = math.prod(shape[axis:]), math.prod(shape[:axis])
        if k != self.k:
            raise self.error(f"input size incompatible with the weights: expected {self.k} "
                             f"values from axis {axis} on, got {k} (bottom shape {list(shape)})")
        if math.prod(label_shape) != m:
            raise self.error(f"expected one label per inner product ({m}), got label shape "
                             f"{list(label_shape)}")
        return axis, m

    def next_lambda(self) -> float:
        """Advance the iteration counter and return the fork's lambda for it (float32)."""
        self.iteration += 1
        f32, p = np.float32, self.p
        with np.errstate(all="ignore"):
            value = f32(p.base) * np.power(f32(1) + f32(p.gamma) * f32(self.iteration),
                                           -f32(p.power))
        return float(max(value, f32(p.lambda_min)))

    def forward(self, x: torch.Tensor, label: torch.Tensor):
        axis, m = self._layout(tuple(x.shape), tuple(label.shape))
        self.lambda_ = self.next_lambda()
        weight = self.blobs[0]
        with torch.no_grad():
            weight.mul_(1 / weight.square().sum(1, keepdim=True).sqrt())
        index = label.detach().reshape(m).to(torch.int64)
        if bool(((index < 0) | (index >= self.num_output)).any()):
            bad = label.detach().reshape(m)[(index < 0) | (index >= self.num_output)][0]
            raise self.error(f"label {bad.item():g} out of range: expected 0 <= label < "
                             f"{self.num_output} (num_output)")
        out = _MarginProduct.apply(x.reshape(m, self.k), weight, index, self.kind, self.lambda_)
        out = out.reshape(*x.shape[:axis], self.num_output)
        if self.num_tops == 1:
            return out
        return out, torch.full((1,), self.lambda_, dtype=x.dtype, device=x.device)
