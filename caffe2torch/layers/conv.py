"""Convolution, Deconvolution and Im2col: Caffe's N-D convolution geometry on torch's conv ops.

The geometry rules are ``BaseConvolutionLayer::LayerSetUp`` (base_conv_layer.cpp): a
channel ``axis`` (default 1; the axes before it are batch axes, the axes after it
spatial), per-axis ``kernel_size``/``stride``/``pad``/``dilation`` given once or once
per spatial axis, or the 2-D-only ``kernel_h/w``, ``stride_h/w``, ``pad_h/w``.
``force_nd_im2col`` picks Caffe's N-D im2col code path; the maths is the same.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..layout import to_nhwc
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape, canonical_axis
from .registry import register


def filler_of(message, field: str) -> caffe_pb2.FillerParameter | None:
    """The filler set in ``message.field``, or None (Caffe's default: constant 0)."""
    return getattr(message, field) if message.HasField(field) else None


@dataclass(frozen=True)
class ConvGeometry:
    """Where the channels are and how the window moves along each spatial axis."""

    channel_axis: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]

    def extent(self, i: int) -> int:
        """Span of the dilated kernel along spatial axis ``i``."""
        return self.dilation[i] * (self.kernel[i] - 1) + 1

    def conv_out(self, layer: CaffeLayer, spatial: Sequence[int]) -> tuple[int, ...]:
        """``(in + 2*pad - extent) / stride + 1`` per axis (ConvolutionLayer::compute_output_shape).

        Caffe would truncate a negative numerator toward zero; a kernel wider than the
        padded input is refused instead.
        """
        out = []
        for i, size in enumerate(spatial):
            span = size + 2 * self.pad[i] - self.extent(i)
            if span < 0:
                raise layer.error(f"kernel extent {self.extent(i)} on spatial axis {i} exceeds the "
                                  f"padded input: expected at most {size + 2 * self.pad[i]} "
                                  f"(size {size} + 2*pad {self.pad[i]}), got {self.extent(i)}")
            out.append(span // self.stride[i] + 1)
        return tuple(out)


def _axis_values(layer: CaffeLayer, p: caffe_pb2.ConvolutionParameter, name: str, hw: str | None,
                 num_spatial: int, default: int | None) -> tuple[int, ...]:
    """One value per spatial axis from a repeated field or its ``<hw>_h``/``<hw>_w`` pair."""
    values = list(getattr(p, name))
    if hw is not None and (p.HasField(f"{hw}_h") or p.HasField(f"{hw}_w")):
        if num_spatial != 2:
            raise layer.error(f"{hw}_h/{hw}_w can only be used for 2-D convolution: expected 2 "
                              f"spatial axes, got {num_spatial}")
        if values:
            raise layer.error(f"give either {name} or {hw}_h/{hw}_w, not both")
        return int(getattr(p, f"{hw}_h")), int(getattr(p, f"{hw}_w"))
    if not values:
        if default is None and num_spatial:
            raise layer.error(f"{name} is required: give it once or once per spatial axis "
                              f"({num_spatial}), or {hw}_h and {hw}_w")
        return (default,) * num_spatial
    if len(values) not in (1, num_spatial):
        raise layer.error(f"{name} must be given once or once per spatial axis: expected 1 or "
                          f"{num_spatial} values, got {len(values)}")
    return tuple(int(v) for v in (values * num_spatial if len(values) == 1 else values))


def conv_geometry(layer: CaffeLayer, shape: Shape, *, min_spatial: int = 0) -> ConvGeometry:
    """Parse ``convolution_param`` for a bottom of ``shape`` with Caffe's checks."""
    p = layer.param.convolution_param
    axis = canonical_axis(layer, p.axis, shape)
    num_spatial = len(shape) - axis - 1
    if num_spatial < min_spatial:
        raise layer.error(f"needs at least {min_spatial} spatial axis after channel axis {axis}: "
                          f"bottom shape {list(shape)} has {num_spatial}")
    kernel = _axis_values(layer, p, "kernel_size", "kernel", num_spatial, None)
    stride = _axis_values(layer, p, "stride", "stride", num_spatial, 1)
    pad = _axis_values(layer, p, "pad", "pad", num_spatial, 0)
    dilation = _axis_values(layer, p, "dilation", None, num_spatial, 1)
    for name, values in (("kernel size", kernel), ("stride", stride), ("dilation", dilation)):
        if any(v <= 0 for v in values):
            raise layer.error(f"{name} must be positive on every spatial axis, got {list(values)}")
    return ConvGeometry(axis, kernel, stride, pad, dilation)


@contextmanager
def _without_mkldnn() -> Iterator[None]:
    """Let ATen pick its im2col + GEMM CPU kernels instead of oneDNN for the block."""
    previous = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(previous)


_exact_weight_grads = [False]


def set_exact_weight_grads(exact: bool) -> None:
    """Choose how CPU convolutions sum their weight gradients over the batch.

    ``False`` (the default): oneDNN's blocked reduction, within about 6e-6 of the
    float64 gradient relative to its largest element, well inside the golden cases'
    tolerances; ``True``: image by image, in Caffe's order (about 4e-7), but 1.1x to 4x
    slower training on small conv nets with ATen's single-threaded loop (README, Speed).
    GPU convolutions are unaffected.
    """
    _exact_weight_grads[0] = bool(exact)


def _image_by_image(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                    bias_sizes: list[int] | None, conf: tuple, need_w: bool, need_b: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias gradients summed one image at a time, in Caffe's order.

    Caffe accumulates ``weight_diff += top_diff_n x col(bottom_n)^T`` one image at a
    time (BaseConvolutionLayer::weight_cpu_gemm); ATen's im2col kernels do the same,
    while oneDNN's blocked reduction over the batch is several times less precise (about
    1.5e-6 against 3e-7 relative on 3x3 layers).
    """
    with _without_mkldnn():
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, x, weight, bias_sizes, *conf, [False, need_w, need_b])
    return grad_w, grad_b


def _patch_gemm(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                bias_sizes: list[int] | None, conf: tuple, need_w: bool, need_b: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Weight and bias gradients of a 2-D, one-group convolution as one matrix product
    written straight into the channels-last weight's layout.

    With P the input's patches as rows, (N*Ho*Wo, kh*kw*C), the weight gradient is
    ``top_diff^T @ P``, (O, kh*kw*C): the memory order of an (O, C, kh, kw) channels-last
    weight. oneDNN's channels-last backward instead fills a buffer of its own and copies
    it into the weight's layout, so each weight gradient is briefly alive twice.
    """
    stride, pad, dilation = conf[:3]
    out_ch, channels, kh, kw = weight.shape
    rows = grad.permute(0, 2, 3, 1).reshape(-1, out_ch)  # a view when grad is NHWC
    grad_w = grad_b = None
    if need_w:
        if any(pad):
            x = F.pad(x, (pad[1], pad[1], pad[0], pad[0]))
        nhwc = x.permute(0, 2, 3, 1)
        sn, sh, sw, sc = nhwc.stride()
        patches = nhwc.as_strided(
            (x.shape[0], grad.shape[2], grad.shape[3], kh, kw, channels),
            (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc),
            nhwc.storage_offset()).reshape(-1, kh * kw * channels)
        grad_w = torch.mm(rows.t(), patches).view(out_ch, kh, kw, channels).permute(0, 3, 1, 2)
    if need_b:
        grad_b = rows.sum(0).view(bias_sizes)
    return grad_w, grad_b


class _WeightGradConv(torch.autograd.Function):
    """A convolution whose weight and bias gradients come from ``method``
    (``_image_by_image`` or ``_patch_gemm``); the forward and the bottom gradient keep
    torch's default kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conf: tuple, method) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = conf
        ctx.method = method
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return torch.convolution(x, weight, bias, *conf)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, *ctx.conf, [True, False, False])[0]
        if need_w or need_b:
            grad_w, grad_b = ctx.method(grad, x, weight, ctx.bias_sizes, ctx.conf,
                                        need_w, need_b)
        return grad_x, grad_w, grad_b, None, None


class _ConvolutionBase(CaffeLayer):
    """Shared set-up of Convolution and Deconvolution (they differ in weight layout and op).

    Like Caffe, several bottoms of one shape may be given; each gives its own top with
    the same weights.
    """

    min_bottoms = 1
    min_tops = 1
    transposed = False

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.convolution_param
        if len(spec.param.top) != len(spec.param.bottom):
            raise self.error(f"needs one top per bottom: expected {len(spec.param.bottom)} top(s), "
                             f"got {len(spec.param.top)}")
        shape = spec.bottom_shapes[0]
        for other in spec.bottom_shapes[1:]:
            if other != shape:
                raise self.error(f"all bottoms must have the same shape: expected {list(shape)}, "
                                 f"got {list(other)}")
        self.geometry = conv_geometry(self, shape)
        num_spatial = len(self.geometry.kernel)
        if num_spatial > 3:
            raise self.error(f"supports 0 to 3 spatial axes (torch has no {num_spatial}-D "
                             f"convolution), got bottom shape {list(shape)}")
        self.channels = shape[self.geometry.channel_axis]
        self.num_output = int(p.num_output)
        self.groups = int(p.group)
        if self.num_output <= 0:
            raise self.error(f"convolution_param.num_output must be positive, got "
                             f"{self.num_output}")
        if self.groups <= 0:
            raise self.error(f"convolution_param.group must be positive, got {self.groups}")
        if self.channels % self.groups:
            raise self.error(f"input channels must be a multiple of group: got {self.channels} "
                             f"channels for group {self.groups}")
        if self.num_output % self.groups:
            raise self.error(f"num_output must be a multiple of group: got num_output "
                             f"{self.num_output} for group {self.groups}")
        # BaseConvolutionLayer: blobs_[0] is (conv_out_channels, conv_in_channels / group, k...),
        # where Deconvolution swaps the roles of channels and num_output.
        out_ch, in_ch = ((self.channels, self.num_output) if self.transposed
                         else (self.num_output, self.channels))
        self.add_blob((out_ch, in_ch // self.groups, *self.geometry.kernel),
                      filler_of(p, "weight_filler"))
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            self.add_blob((self.num_output,), filler_of(p, "bias_filler"))
        # ATen's im2col kernels loop over groups: for depthwise-like layers (one input
        # channel per group) they are an order of magnitude slower, so keep oneDNN there.
        self.precise_weight_grad = self.groups == 1 or in_ch // self.groups > 1
        g = self.geometry
        # aten::convolution's arguments after (input, weight, bias); 0 spatial axes run as 1-D.
        self.conf = (list(g.stride) or [1], list(g.pad) or [0], list(g.dilation) or [1],
                     self.transposed, [0] * max(len(g.kernel), 1), self.groups)
        self._checked_shape: torch.Size | None = None  # the last bottom shape found valid
        self._patch_rows = 0  # output pixels of that whole batch: _patch_gemm's matrix rows
        self.channels_last = False  # set by the net (caffe2torch.layout), with the weight's layout

    def _check_bottom(self, x: torch.Tensor) -> None:
        g = self.geometry
        axes = g.channel_axis + 1 + len(g.kernel)
        if x.dim() != axes or x.shape[g.channel_axis] != self.channels:
            raise self.error(f"bottom shape {list(x.shape)} is incompatible with the layer: "
                             f"expected {axes} axes with {self.channels} channels on axis "
                             f"{g.channel_axis}")

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """Run the op on (batch, C, spatial...) with batch = every axis before the channel axis."""
        g = self.geometry
        if x.shape != self._checked_shape:
            self._check_bottom(x)
            out = self._output_size(tuple(x.shape[g.channel_axis + 1:]))
            self._patch_rows = math.prod(x.shape[:g.channel_axis]) * math.prod(out)
            self._checked_shape = x.shape
        y = x if g.channel_axis == 1 else x.reshape(-1, *x.shape[g.channel_axis:])
        if self.channels_last and not torch.jit.is_tracing():  # traced graphs stay layout-free
            y = to_nhwc(y)
        blobs = self.blobs
        weight = blobs[0]
        bias = blobs[1] if self.bias_term else None
        flat = not g.kernel  # 0 spatial axes: a grouped matrix product, run as a 1-D conv
        if flat:
            y, weight = y.unsqueeze(-1), weight.unsqueeze(-1)
        method = self._weight_grad_method(y, weight, bias)
        if method is None:
            out = torch.convolution(y, weight, bias, *self.conf)
        else:
            out = _WeightGradConv.apply(y, weight, bias, self.conf, method)
        if flat:
            out = out.squeeze(-1)
        return out if g.channel_axis == 1 else out.reshape(*x.shape[:g.channel_axis],
                                                           *out.shape[1:])

    def _weight_grad_method(self, y: torch.Tensor, weight: torch.Tensor,
                            bias: torch.Tensor | None):
        """How this CPU call's weight gradient is computed if not by torch's default kernel.

        ``_image_by_image`` under ``set_exact_weight_grads(True)``; ``_patch_gemm`` for a
        channels-last, one-group convolution whose patch matrix (N*Ho*Wo rows) has no more
        rows than the weight has filters, so that it is no larger than the weight gradient
        whose second copy it saves: the late layers of ResNet-50 and MobileNet, where a
        training step peaks. There it also measured as fast or faster (scripts/bench_net.py).
        """
        if (not torch.is_grad_enabled() or y.device.type != "cpu" or torch.jit.is_tracing()
                or not (weight.requires_grad or (bias is not None and bias.requires_grad))):
            return None
        if _exact_weight_grads[0]:
            return _image_by_image if self.precise_weight_grad else None
        if (self.channels_last and self.groups == 1 and not self.transposed
                and self._patch_rows <= self.num_output):
            return _patch_gemm
        return None

    def _output_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        """The top's spatial sizes for these bottom sizes; a NetError when one would be
        empty."""
        raise NotImplementedError

    def forward(self, *bottoms: torch.Tensor):
        if len(bottoms) == 1:
            return self._convolve(bottoms[0])
        return tuple(self._convolve(x) for x in bottoms)


@register("Convolution", "CONVOLUTION")
class Convolution(_ConvolutionBase):
    """Caffe's cross-correlation; weight (num_output, C/group, k...), output size floored."""

    def _output_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        return self.geometry.conv_out(self, spatial)


@register("Deconvolution", "DECONVOLUTION")
class Deconvolution(_ConvolutionBase):
    """Convolution transposed: weight (C, num_output/group, k...), torch's ConvTranspose layout.

    Output size ``stride*(in-1) + extent - 2*pad`` (DeconvolutionLayer::compute_output_shape);
    there is no output_padding.
    """

    transposed = True

    def _output_size(self, spatial: tuple[int, ...]) -> tuple[int, ...]:
        g = self.geometry
        sizes = []
        for i, size in enumerate(spatial):
            out = g.stride[i] * (size - 1) + g.extent(i) - 2 * g.pad[i]
            if out <= 0:
                raise self.error(f"output size on spatial axis {i} must be positive, got {out} "
                                 f"(stride*(in-1) + extent - 2*pad with in={size})")
            sizes.append(out)
        return tuple(sizes)


@register("Im2col", "IM2COL")
class Im2col(CaffeLayer):
    """Caffe's column buffer as a blob: (batch..., C*prod(kernel), out spatial...).

    Rows are ordered channel-major then kernel offsets (im2col_cpu / im2col_nd_cpu),
    padding reads zeros; the backward (col2im) sums overlapping windows, which is
    autograd's gradient of the unfold.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.geometry = conv_geometry(self, spec.bottom_shapes[0], min_spatial=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        n = len(g.kernel)
        if x.dim() != g.channel_axis + 1 + n:
            raise self.error(f"bottom must keep {g.channel_axis + 1 + n} axes, got shape "
                             f"{list(x.shape)}")
        lead, channels = x.shape[:g.channel_axis], x.shape[g.channel_axis]
        out = g.conv_out(self, x.shape[g.channel_axis + 1:])
        y = x.reshape(-1, *x.shape[g.channel_axis:])
        rows = channels * math.prod(g.kernel)
        if n == 2:
            cols = F.unfold(y, g.kernel, dilation=g.dilation, padding=g.pad, stride=g.stride)
        else:
            if any(g.pad):
                y = F.pad(y, [p for p in reversed(g.pad) for _ in range(2)])
            for i in range(n):
                y = y.unfold(2 + i, g.extent(i), g.stride[i])
            if any(d > 1 for d in g.dilation):
                y = y[(..., *(slice(None, None, d) for d in g.dilation))]
            # (batch, C, out..., kernel...) -> (batch, C, kernel..., out...)
            cols = y.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
        return cols.reshape(*lead, rows, *out)
