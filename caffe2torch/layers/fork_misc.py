"""Activation, convolution and normalisation layers of the Caffe forks.

ReLU6, HardSwish, HardSigmoid, Unsqueeze and BatchNormKyle follow the SSD-based fork
of the golden data; DepthwiseConvolution MobileNet-YOLO (eric612), whose YOLO layers
are in :mod:`.fork_yolo`; ConvolutionDepthwise and ShuffleChannel ShuffleNet
(farmingyard); Axpy SENet (hujie-frank); ``BN`` has two incompatible meanings,
SegNet/ENet's and PSPNet's, told apart by their ``bn_param`` fields.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import NetError
from ..proto import caffe_pb2
from .activation import NeuronLayer
from .base import CaffeLayer, LayerSpec
from .conv import Convolution, filler_of
from .fork_upsample import VariantLayer
from .normalization import BatchNorm
from .registry import register


class _ReLU6(torch.autograd.Function):
    """``min(max(x, 0) + slope * min(x, 0), threshold)`` with ReLU6Layer::Backward_cpu's
    gradient ``((x > 0) + slope * (x <= 0)) * (x < threshold)`` (0 at the threshold)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float, threshold: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slope, ctx.threshold = slope, threshold
        return F.leaky_relu(x, slope).clamp(max=threshold)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        slope = torch.where(x > 0, 1.0, ctx.slope).to(grad.dtype)
        return grad * slope * (x < ctx.threshold), None, None


@register("ReLU6")
class ReLU6(NeuronLayer):
    """ReLU6 with the fork's ``negative_slope`` and ``threshold`` (default 6)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.relu6_param
        self.slope, self.threshold = float(p.negative_slope), float(p.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLU6.apply(x, self.slope, self.threshold)


@register("HardSwish")
class HardSwish(NeuronLayer):
    """``x * clip(x / 6 + 0.5, 0, 1)``, in the fork's order of operations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x / 6.0 + 0.5).clamp(0, 1)


@register("HardSigmoid")
class HardSigmoid(NeuronLayer):
    """``clip(alpha * x + beta, 0, 1)`` with float alpha/beta (defaults 0.2, 0.5)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.hardsigmoid_param
        self.alpha, self.beta = float(np.float32(p.alpha)), float(np.float32(p.beta))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.alpha + self.beta).clamp(0, 1)


def _with_depthwise_group(spec: LayerSpec, *, outputs: bool) -> LayerSpec:
    """The spec with ``group`` = input channels (and ``num_output`` = channels when
    ``outputs``), unless the bottom's channel axis cannot be read (Convolution then
    reports the problem)."""
    p = spec.param.convolution_param
    shape = spec.bottom_shapes[0] if spec.bottom_shapes else ()
    if not -len(shape) <= p.axis < len(shape):
        return spec
    param = caffe_pb2.LayerParameter()
    param.CopyFrom(spec.param)
    channels = shape[p.axis]
    if outputs:
        param.convolution_param.num_output = channels
    if outputs or not p.HasField("group"):
        param.convolution_param.group = channels
    return dataclasses.replace(spec, param=param)


@register("DepthwiseConvolution")
class DepthwiseConvolution(Convolution):
    """MobileNet-YOLO's depthwise convolution: Caffe's Convolution (its CPU path) with
    ``group`` defaulting to the input channels, which its GPU kernel assumes."""

    def __init__(self, spec: LayerSpec):
        super().__init__(_with_depthwise_group(spec, outputs=False))


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    """ShuffleNet's depthwise convolution: weight (C, 1, kh, kw), bias (C), C output
    channels whatever ``num_output`` says (ConvolutionDepthwiseLayer ignores it)."""

    def __init__(self, spec: LayerSpec):
        super().__init__(_with_depthwise_group(spec, outputs=True))


@register("ShuffleChannel")
class ShuffleChannel(CaffeLayer):
    """Channel shuffle: output channel ``j * group + i`` is input channel ``i * (C/group) + j``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.group = int(spec.param.shuffle_channel_param.group)
        if self.group < 1:
            raise self.error(f"shuffle_channel_param.group must be positive, got {self.group}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] % self.group:
            raise self.error(f"channels must be a multiple of group {self.group}, got bottom "
                             f"shape {list(x.shape)}")
        n, c = x.shape[:2]
        return x.reshape(n, self.group, c // self.group, *x.shape[2:]).transpose(1, 2) \
            .reshape(x.shape)


@register("Axpy")
class Axpy(CaffeLayer):
    """SENet's ``top = a * bottom[1] + bottom[2]``, ``a`` per channel: (N, C) or (N, C, 1, 1)."""

    min_bottoms = max_bottoms = 3
    min_tops = max_tops = 1

    def forward(self, a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() < 2 or a.shape[:2] != x.shape[:2] \
                or any(d != 1 for d in a.shape[2:]):
            raise self.error(f"expected a (N, C[, 1, 1]) and x, y of one shape (N, C, ...), got "
                             f"{list(a.shape)}, {list(x.shape)}, {list(y.shape)}")
        return a.reshape(*x.shape[:2], *([1] * (x.dim() - 2))) * x + y


@register("Unsqueeze")
class Unsqueeze(CaffeLayer):
    """Inserts a size-1 axis at ``dim`` (negative: counted from the end, -1 appends)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.unsqueeze_param
        if not p.HasField("dim"):
            raise self.error("unsqueeze_param.dim must be set")
        self.dim = int(p.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self.dim + x.dim() + 1 if self.dim < 0 else self.dim
        if not 0 <= index <= x.dim():
            raise self.error(f"dim {self.dim} is out of range for a {x.dim()}-D bottom: expected "
                             f"{-x.dim() - 1} <= dim <= {x.dim()}")
        return x.unsqueeze(index)


@register("BatchNormKyle")
class BatchNormKyle(CaffeLayer):
    """The golden fork's BatchNorm with ``use_alpha_beta``: blobs 0-2 are BatchNorm's
    statistics (same rules), blobs 3 and 4 a learned per-channel scale (init 1) and
    shift (init 0) applied after normalising.

    With global statistics its Backward_cpu returns before computing their gradients,
    so alpha and beta get none there.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.norm = BatchNorm(spec)
        self.blobs.extend(self.norm.blobs)
        self.use_alpha_beta = bool(spec.param.batch_norm_param.use_alpha_beta)
        if self.use_alpha_beta:
            channels = spec.bottom_shapes[0][1]
            self.add_blob((channels,), caffe_pb2.FillerParameter(type="constant", value=1))
            self.add_blob((channels,), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if not self.use_alpha_beta:
            return y
        alpha, beta = self.blobs[3], self.blobs[4]
        if self.norm.use_global_stats:
            alpha, beta = alpha.detach(), beta.detach()
        shape = (1, -1, *([1] * (x.dim() - 2)))
        return y * alpha.view(shape) + beta.view(shape)


class _BatchFormulaNorm(torch.autograd.Function):
    """``(x - mean) * invstd`` per channel whose backward is the batch-statistics formula
    ``invstd * (g - mean(g) - xhat * mean(g * xhat))`` (means over N, H, W).

    With batch statistics that is the exact gradient; PSPNet's BN applies it at TEST
    too, where the statistics are the stored ones.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
        xhat = (x - mean) * invstd
        ctx.save_for_backward(xhat, invstd)
        return xhat

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, invstd = ctx.saved_tensors
        dims = (0, 2, 3)
        centred = grad - grad.mean(dims, keepdim=True)
        return invstd * (centred - xhat * (grad * xhat).mean(dims, keepdim=True)), None, None


def _channel_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over H*W, then over N (Caffe's two gemv calls), as (1, C, 1, 1)."""
    return x.mean((2, 3), keepdim=True).mean(0, keepdim=True)


_SEGNET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")
_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen")


@register("BN")
class BN(VariantLayer):
    """The forks' ``BN`` layer, two incompatible meanings under one name.

    SegNet/ENet (caffe-segnet): blobs ``[scale, shift]`` (1, C, 1, 1), ``bn_mode``
    LEARN/INFERENCE, fields ``scale_filler``/``shift_filler``. PSPNet (yjxiong-style):
    blobs ``[slope, bias, mean, variance]``, fields ``slope_filler``/``bias_filler``/
    ``momentum``/``eps``/``frozen``. Fields of both kinds are an error; with neither,
    four ``param`` specs mean PSPNet, otherwise SegNet.
    """

    min_bottoms = max_bottoms = 1
    min_tops = 1

    @classmethod
    def pick(cls, spec: LayerSpec) -> type:
        p = spec.param.bn_param
        segnet = [f for f in _SEGNET_FIELDS if p.HasField(f)]
        pspnet = [f for f in _PSPNET_FIELDS if p.HasField(f)]
        if segnet and pspnet:
            raise NetError(f"bn_param mixes SegNet's fields ({', '.join(segnet)}) with PSPNet's "
                           f"({', '.join(pspnet)}); give one kind", layer=spec.param.name,
                           layer_type=spec.param.type, location=spec.location)
        return PSPNetBN if pspnet or (not segnet and len(spec.param.param) == 4) else SegNetBN

    def _check_bottom(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise self.error(f"expected a 4-D bottom (num, channels, height, width), got shape "
                             f"{list(x.shape)}")


class SegNetBN(BN):
    """caffe-segnet's BN. LEARN normalises with the batch's mean and ``E(x^2) - E(x)^2``
    (+1e-9) in every phase, then ``scale * xhat + shift``; optional tops 2 and 3 are the
    batch mean and variance (1, C, 1, 1). INFERENCE is ``scale * x + shift`` (statistics
    folded into the blobs by SegNet's compute_bn_statistics.py)."""

    max_tops = 3
    VAR_EPS = 1e-9

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.bn_param
        shape = (1, spec.bottom_shapes[0][1], 1, 1)
        self.add_blob(shape, filler_of(p, "scale_filler"))
        self.add_blob(shape, filler_of(p, "shift_filler"))
        self.learn = p.bn_mode == caffe_pb2.BNParameter.LEARN

    def forward(self, x: torch.Tensor):
        self._check_bottom(x)
        scale, shift = self.blobs
        if self.learn:
            mean = _channel_mean(x.detach())
            var = _channel_mean(x.detach() * x.detach()) - mean * mean
            y = _BatchFormulaNorm.apply(x, mean, (var + self.VAR_EPS).rsqrt()) * scale + shift
        else:
            mean = var = x.new_zeros(scale.shape)
            y = x * scale + shift
        return y if self.num_tops == 1 else (y, mean, var)[:self.num_tops]


class PSPNetBN(BN):
    """PSPNet's BN: ``slope * (x - mean) / sqrt(var + eps) + bias``.

    TRAIN (not frozen) uses the batch mean and biased variance and updates the stored
    ones as ``(1 - momentum) * batch + momentum * stored``; TEST or ``frozen`` uses the
    stored ones. Frozen: no gradient for slope/bias and their lr_mult forced to 0
    (BNLayer::LayerSetUp), like the statistics' always.
    """

    max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.bn_param
        self.frozen = bool(p.frozen)
        self.momentum, self.eps = float(p.momentum), float(p.eps)
        shape = (1, spec.bottom_shapes[0][1], 1, 1)
        self.add_blob(shape, filler_of(p, "slope_filler"))
        self.add_blob(shape, filler_of(p, "bias_filler"))
        self.add_blob(shape, None, learnable=False)
        self.add_blob(shape, caffe_pb2.FillerParameter(type="constant", value=float(self.frozen)),
                      learnable=False)
        while len(self.param.param) < 4:
            self.param.param.add()
        for i in (0, 1, 2, 3) if self.frozen else (2, 3):
            self.param.param[i].lr_mult = 0.0
            self.param.param[i].decay_mult = 0.0
        self.batch_stats = not self.frozen and self.phase == caffe_pb2.TRAIN

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_bottom(x)
        slope, bias, mean, var = self.blobs
        if self.batch_stats:
            batch_mean = _channel_mean(x.detach())
            centred = x.detach() - batch_mean
            batch_var = _channel_mean(centred * centred)
            with torch.no_grad():
                mean.mul_(self.momentum).add_(batch_mean, alpha=1 - self.momentum)
                var.mul_(self.momentum).add_(batch_var, alpha=1 - self.momentum)
            mean, var = batch_mean, batch_var
        invstd = (var.detach() + self.eps).rsqrt()
        if self.frozen:
            return (x - mean.detach()) * invstd * slope.detach() + bias.detach()
        return _BatchFormulaNorm.apply(x, mean.detach(), invstd) * slope + bias
