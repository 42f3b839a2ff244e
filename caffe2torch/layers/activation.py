"""Caffe's element-wise "neuron" layers (one bottom, one top of the same shape).

Each layer uses the torch op whose forward and gradient agree with Caffe's
hand-written ``Forward_cpu``/``Backward_cpu``; where they do not (Power's gradient
formula, Threshold's missing backward) the Caffe rule is implemented explicitly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec
from .registry import register


class NeuronLayer(CaffeLayer):
    """Exactly one bottom and one top, as Caffe's ``NeuronLayer`` (and BatchNorm, LRN, MVN)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1


@register("ReLU", "RELU")
class ReLU(NeuronLayer):
    """``max(x, 0) + negative_slope * min(x, 0)``; the gradient at 0 is ``negative_slope``
    in Caffe (``x > 0`` test), which is also what torch's relu/leaky_relu give."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.negative_slope = float(spec.param.relu_param.negative_slope)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace``: overwrite ``x`` (the compiler asks for it only where Caffe's ReLU is
        in place and no other reader or saved-for-backward tensor can see the old values)."""
        if self.negative_slope == 0:
            return F.relu(x, inplace)
        return F.leaky_relu(x, self.negative_slope, inplace)


@register("PReLU")
class PReLU(NeuronLayer):
    """ReLU with a learned slope per channel (axis 1), or one scalar slope when
    ``channel_shared``. Caffe's default filler is constant 0.25 (prelu_layer.cpp)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.prelu_param
        shape = spec.bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"expected a bottom with at least 2 axes (N, C, ...), "
                             f"got shape {list(shape)}")
        filler = p.filler if p.HasField("filler") else \
            caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob(() if p.channel_shared else (shape[1],), filler)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.blobs[0])


@register("ELU")
class ELU(NeuronLayer):
    """``x > 0 ? x : alpha * (exp(x) - 1)``; gradient ``alpha * exp(x)`` for ``x <= 0``."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.alpha = float(spec.param.elu_param.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x, self.alpha)


@register("Sigmoid", "SIGMOID")
class Sigmoid(NeuronLayer):
    """Logistic function; the gradient ``y * (1 - y)`` is Caffe's and torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


@register("TanH", "TANH")
class TanH(NeuronLayer):
    """Hyperbolic tangent; the gradient ``1 - y^2`` is Caffe's and torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


@register("AbsVal", "ABSVAL")
class AbsVal(NeuronLayer):
    """``|x|``; the gradient is ``sign(x)``, 0 at 0, in Caffe and torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.abs(x)


@register("BNLL", "BNLL")
class BNLL(NeuronLayer):
    """``log(1 + exp(x))``. Caffe's gradient clamps the exponent at 50, where the
    float ratio ``e/(e+1)`` is already exactly 1, as softplus's threshold of 20 is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x)


def _float_pow(base: float, exponent: float) -> float:
    """C's float ``pow``: inf on overflow and NaN for a negative base's fractional power."""
    return torch.tensor(base, dtype=torch.float32).pow(exponent).item()


class _CaffePower(torch.autograd.Function):
    """``(shift + scale * x) ^ power`` with PowerLayer::Backward_cpu's gradient formulas.

    Caffe differentiates through the output: ``power * y / x`` when ``shift == 0`` and
    ``power * scale * y / (shift + scale * x)`` otherwise, so a zero base gives NaN
    where the true derivative may be finite. ``power == 2`` uses ``2 * scale * base``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, power: float, scale: float, shift: float) -> torch.Tensor:
        base = x * scale if scale != 1 else x
        if shift != 0:
            base = base + shift
        y = base.pow(power)
        ctx.power, ctx.scale, ctx.shift = power, scale, shift
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y = ctx.saved_tensors
        power, scale, shift = ctx.power, ctx.scale, ctx.shift
        diff_scale = power * scale
        if power == 2:
            dydx = x * (diff_scale * scale)
            if shift != 0:
                dydx = dydx + diff_scale * shift
        elif shift == 0:
            dydx = y / x * power
        else:
            base = x * scale if scale != 1 else x
            dydx = y / (base + shift)
            if diff_scale != 1:
                dydx = dydx * diff_scale
        return grad * dydx, None, None, None


class _Constant(torch.autograd.Function):
    """A constant top whose bottom gradient is zeros, as Caffe writes for Power when
    ``power * scale == 0`` (the top ignores the bottom, yet backward still reaches it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, value: float) -> torch.Tensor:
        return torch.full_like(x, value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.zeros_like(grad), None


@register("Power", "POWER")
class Power(NeuronLayer):
    """``(shift + scale * x) ^ power``; when ``power * scale == 0`` the top is the
    constant ``power == 0 ? 1 : shift ^ power`` (power_layer.cpp)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.constant: float | None = None
        if self.power * self.scale == 0:
            self.constant = 1.0 if self.power == 0 else _float_pow(self.shift, self.power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        power, scale, shift = self.power, self.scale, self.shift
        if self.constant is not None:
            return _Constant.apply(x, self.constant)
        if power == 1:  # linear: autograd's gradient is Caffe's constant power * scale
            y = x * scale if scale != 1 else x.view_as(x)
            return y + shift if shift != 0 else y
        return _CaffePower.apply(x, power, scale, shift)


def _log_base(layer: CaffeLayer, base: float, what: str) -> float:
    """``ln(base)``, with Caffe's convention that base -1 means e; checks base > 0."""
    if base == -1:
        return 1.0
    if not base > 0:
        raise layer.error(f"{what}.base must be strictly positive (or -1 for e), got {base}")
    return math.log(base)


@register("Exp", "EXP")
class Exp(NeuronLayer):
    """``base ^ (shift + scale * x)`` computed as Caffe does: ``outer * exp(inner * x)``
    with ``inner = ln(base) * scale`` and ``outer = base ^ shift`` (exp_layer.cpp)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.exp_param
        log_base = _log_base(self, p.base, "exp_param")
        self.inner = log_base * p.scale
        self.outer = 1.0 if p.shift == 0 else _float_pow(math.e if p.base == -1 else p.base,
                                                         p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.exp(x * self.inner if self.inner != 1 else x)
        return y * self.outer if self.outer != 1 else y


@register("Log")
class Log(NeuronLayer):
    """``log_base(shift + scale * x)`` (log_layer.cpp); base 1 has no logarithm."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.log_param
        log_base = _log_base(self, p.base, "log_param")
        if log_base == 0:
            raise self.error("log_param.base must not be 1 (log base 1 is undefined), got 1")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self.scale if self.scale != 1 else x
        y = torch.log(z + self.shift if self.shift != 0 else z)
        return y * self.base_scale if self.base_scale != 1 else y


@register("Threshold", "THRESHOLD")
class Threshold(NeuronLayer):
    """``x > threshold ? 1 : 0`` (strict).

    Caffe has no backward for it (``NOT_IMPLEMENTED``: a net that back-propagates
    through it aborts); here the top carries no gradient, so nothing flows back.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.threshold = float(spec.param.threshold_param.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


@register("Clip")
class Clip(NeuronLayer):
    """``max(min, min(x, max))``; the gradient passes where ``min <= x <= max``
    (inclusive, clip_layer.cpp), as torch.clamp's does."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.clip_param
        missing = [f for f in ("min", "max") if not p.HasField(f)]
        if missing:
            raise self.error(f"clip_param needs both min and max; missing {' and '.join(missing)}")
        self.min, self.max = float(p.min), float(p.max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.min <= self.max:
            return torch.clamp(x, self.min, self.max)
        # torch.clamp gives max when min > max; Caffe's max(min, min(x, max)) gives min.
        return torch.clamp(torch.clamp(x, max=self.max), min=self.min)


@register("Swish")
class Swish(NeuronLayer):
    """``x * sigmoid(beta * x)`` (swish_layer.cpp); beta 1 is torch's fused SiLU."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.beta = float(spec.param.swish_param.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta == 1:
            return F.silu(x)
        return x * torch.sigmoid(x * self.beta)
