"""Eltwise: element-wise PROD, SUM and MAX of same-shaped bottoms (eltwise_layer.cpp)."""
from __future__ import annotations

import torch

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec
from .registry import register

_OP = caffe_pb2.EltwiseParameter


class _Prod(torch.autograd.Function):
    """Product of the bottoms, with Caffe's PROD backward.

    ``stable`` (stable_prod_grad, the default): bottom i's diff is the product of the
    other bottoms, multiplied in bottom order, times the top diff. Otherwise it is
    ``top / x_i * top_diff``, which is inf/nan where ``x_i == 0``, exactly as in Caffe.
    """

    @staticmethod
    def forward(ctx, stable: bool, *xs: torch.Tensor) -> torch.Tensor:
        top = torch.mul(xs[0], xs[1])
        for x in xs[2:]:
            top.mul_(x)
        ctx.stable = stable
        ctx.save_for_backward(*(xs if stable else (top, *xs)))
        return top

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        xs = saved if ctx.stable else saved[1:]
        grads: list[torch.Tensor | None] = []
        for i, x in enumerate(xs):
            if not ctx.needs_input_grad[i + 1]:
                grads.append(None)
            elif ctx.stable:
                others = [xj for j, xj in enumerate(xs) if j != i]
                partial = others[0]
                for xj in others[1:]:
                    partial = partial * xj
                grads.append(partial * grad)
            else:
                grads.append(saved[0] / x * grad)
        return (None, *grads)


def _max(bottoms: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Caffe's MAX: ``a > b ? a : b`` for bottoms 0 and 1 (a tie picks bottom 1), then a
    strict ``>`` for each further bottom (a tie keeps the earlier one).

    The chain of ``where`` routes the whole top diff to the recorded argmax bottom, as
    Caffe's mask-based backward does.
    """
    top = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
    for x in bottoms[2:]:
        top = torch.where(x > top, x, top)
    return top


@register("Eltwise", "ELTWISE")
class Eltwise(CaffeLayer):
    """PROD, SUM (default; one optional ``coeff`` per bottom) or MAX of 2+ equal-shaped bottoms.

    Like Caffe, coefficients are refused for PROD and ignored by MAX.
    """

    min_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.eltwise_param
        self.op = p.operation
        n = len(spec.param.bottom)
        if len(p.coeff) not in (0, n):
            raise self.error(f"eltwise_param.coeff takes one coefficient per bottom: expected "
                             f"0 or {n}, got {len(p.coeff)}")
        if self.op == _OP.PROD and len(p.coeff):
            raise self.error("eltwise_param.coeff is only for operation SUM, got it with PROD")
        self.coeffs = [float(c) for c in p.coeff] or [1.0] * n
        self.stable_prod_grad = p.stable_prod_grad

    def forward(self, *bottoms: torch.Tensor, into: int | None = None) -> torch.Tensor:
        """``into`` (SUM with unit coefficients only): bottom 0 or 1, which the sum may
        overwrite (the compiler passes it only where nothing else can see that bottom)."""
        shape = bottoms[0].shape
        for i, b in enumerate(bottoms[1:], 1):
            if b.shape != shape:
                raise self.error(f"all bottoms must have the same shape: expected bottom {i} of "
                                 f"shape {list(shape)} (bottom 0), got {list(b.shape)}")
        if self.op == _OP.PROD:
            return _Prod.apply(self.stable_prod_grad, *bottoms)
        if self.op == _OP.MAX:
            return _max(bottoms)
        # SUM: top = sum_i coeff_i * bottom_i, accumulated in bottom order like caffe_axpy
        if into is not None:  # b0 + b1 == b1 + b0 exactly; then the same order
            top = bottoms[into].add_(bottoms[1 - into])
            for b in bottoms[2:]:
                top.add_(b)
            return top
        c0 = self.coeffs[0]
        top = bottoms[0] if c0 == 1.0 else bottoms[0] * c0
        for c, b in zip(self.coeffs[1:], bottoms[1:]):
            top = top + b if c == 1.0 else torch.add(top, b, alpha=c)
        return top
