"""Resampling layers of the Caffe forks: unpooling, resizing, depth-to-space, padding.

* ``Upsample`` has two meanings under one type name: SegNet's unpooling (caffe-segnet,
  two bottoms: values and the pooling mask) and nearest-neighbour upsampling (one
  bottom: MobileNet-YOLO and the SSD-based fork of the golden data). The bottom count
  chooses; parameters of the other meaning are an error.
* ``MaxUnPool`` is the golden fork's unpooling with an explicit output size.
* ``Interp`` (DeepLab/PSPNet), ``Resize`` and ``BilinearInterpolate`` (golden fork) are
  three different bilinear rules; each is reproduced with its own sample positions and
  weights in float32, as the C++ computes them, on one shared gather-and-blend kernel.
* ``PixelShuffle`` and ``Pad`` are the golden fork's depth-to-space and padding.

Several of these have an empty ``Backward_cpu`` in the fork; here they get the exact
gradient of their forward instead of zeros.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec
from .registry import register

# One output axis of a bilinear resampling: for each output position the two source
# indices and their weights, ``out = w0 * x[i0] + w1 * x[i1]``.
Taps = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _blend(x: torch.Tensor, rows: Taps, cols: Taps) -> torch.Tensor:
    """``a0 * (b0 * x[i0, j0] + b1 * x[i0, j1]) + a1 * (b0 * x[i1, j0] + b1 * x[i1, j1])``
    over the last two axes; autograd's gradient is the adjoint (scatter-add) Caffe writes."""
    i0, i1, a0, a1 = (t.to(x.device) for t in rows)
    j0, j1, b0, b1 = (t.to(x.device) for t in cols)

    def row(i: torch.Tensor) -> torch.Tensor:
        r = x.index_select(-2, i)
        return r.index_select(-1, j0) * b0.to(x.dtype) + r.index_select(-1, j1) * b1.to(x.dtype)

    return row(i0) * a0.to(x.dtype)[:, None] + row(i1) * a1.to(x.dtype)[:, None]


def _taps(i0: torch.Tensor, i1: torch.Tensor, w0: torch.Tensor, w1: torch.Tensor,
          size: int) -> Taps:
    """Indices clamped into ``[0, size)`` (out-of-range taps always carry weight 0)."""
    return i0.clamp(0, size - 1), i1.clamp(0, size - 1), w0, w1


def _check_4d(layer: CaffeLayer, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise layer.error(f"expected a 4-D bottom (num, channels, height, width), got shape "
                          f"{list(x.shape)}")


class _Unpool(torch.autograd.Function):
    """Scatter each plane's values to the flat positions of ``index`` in a zero plane of ``size``.

    Forward: ``top[idx] = bottom[i]``, where a later i wins a repeated idx (Caffe's loop
    order). Backward: ``bottom_diff[i] = top_diff[idx]`` (caffe-segnet's Backward_cpu),
    so every source of a repeated idx receives the gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
        flat_x, flat_i = x.flatten(-2), index.flatten(-2)
        order = torch.arange(flat_x.shape[-1], device=x.device).expand_as(flat_i)
        winner = torch.full((*flat_x.shape[:-1], size), -1, dtype=torch.long, device=x.device)
        winner.scatter_reduce_(-1, flat_i, order, "amax")
        values = flat_x.gather(-1, winner.clamp(min=0))
        ctx.save_for_backward(flat_i)
        ctx.in_shape = x.shape
        return torch.where(winner >= 0, values, torch.zeros_like(values))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat_i,) = ctx.saved_tensors
        return grad.gather(-1, flat_i).view(ctx.in_shape), None, None


def _unpool(layer: CaffeLayer, x: torch.Tensor, mask: torch.Tensor, out_h: int,
            out_w: int) -> torch.Tensor:
    """Shared forward of SegNet's Upsample and MaxUnPool: mask holds ``h * W_out + w`` as floats."""
    _check_4d(layer, x)
    if mask.shape != x.shape:
        raise layer.error(f"the mask (bottom 1) must have the values' shape {list(x.shape)}, got "
                          f"{list(mask.shape)}")
    index = mask.detach().to(torch.long)  # static_cast<int>: truncation toward zero
    if index.numel() and not x.is_meta:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= out_h * out_w:
            raise layer.error(f"mask index out of range for a {out_h}x{out_w} output: expected "
                              f"0 <= index < {out_h * out_w}, got {low if low < 0 else high} "
                              f"(check that the pooling layer's input had this size)")
    return _Unpool.apply(x, index, out_h * out_w).view(*x.shape[:2], out_h, out_w)


class VariantLayer(CaffeLayer):
    """A type name that means different layers in different forks.

    The registered class defines ``pick(spec)``, which returns the subclass to build;
    constructing the registered class builds that subclass instead.
    """

    @classmethod
    def pick(cls, spec: LayerSpec) -> type:
        raise NotImplementedError

    def __new__(cls, *args, **kwargs):
        if "pick" in cls.__dict__:
            cls = cls.pick(args[0] if args else kwargs["spec"])
        return super().__new__(cls)


@register("Upsample")
class Upsample(VariantLayer):
    """SegNet's unpooling (2 bottoms) or nearest-neighbour upsampling (1 bottom)."""

    min_bottoms = 1
    max_bottoms = 2
    min_tops = max_tops = 1

    @classmethod
    def pick(cls, spec: LayerSpec) -> type:
        return SegNetUpsample if len(spec.param.bottom) == 2 else NearestUpsample


class SegNetUpsample(Upsample):
    """caffe-segnet's Upsample: ``top[mask[i]] = bottom[i]`` per (n, c) plane, zeros elsewhere.

    Output size: ``upsample_h``/``upsample_w`` when both are given, else ``H * scale_h -
    pad_out_h`` (``scale`` for both axes, or ``scale_h``/``scale_w``; ``pad_out_*`` only
    with scale 2), as UpsampleLayer::LayerSetUp/Reshape check and compute it.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.upsample_param
        if p.HasField("dims_num"):
            raise self.error("upsample_param.dims_num belongs to the one-bottom nearest-neighbour "
                             "Upsample; SegNet's unpooling (two bottoms: values, mask) has no "
                             "dims_num")
        explicit = p.HasField("upsample_h") and p.HasField("upsample_w")
        per_axis = not p.HasField("scale") and p.HasField("scale_h") and p.HasField("scale_w")
        if not (explicit or per_axis or not (p.HasField("scale_h") or p.HasField("scale_w"))):
            raise self.error("give upsample_h and upsample_w, or scale, or both scale_h and "
                             "scale_w (not scale together with scale_h/scale_w)")
        self.size: tuple[int, int] | None = None
        if explicit:
            self.size = (int(p.upsample_h), int(p.upsample_w))
            if min(self.size) <= 1:
                raise self.error(f"upsample_h and upsample_w must be > 1, got {list(self.size)}")
            return
        self.scale = (int(p.scale_h), int(p.scale_w)) if per_axis else (int(p.scale),) * 2
        if min(self.scale) <= 1:
            raise self.error(f"the scale must be > 1, got {list(self.scale)}")
        self.pad_out = (int(p.pad_out_h), int(p.pad_out_w))
        for axis, pad, scale in zip("hw", self.pad_out, self.scale):
            if pad and scale != 2:
                raise self.error(f"pad_out_{axis} requires scale_{axis} == 2 (otherwise the output "
                                 f"size is ill-defined), got scale {scale}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        _check_4d(self, x)
        out_h, out_w = self.size or (x.shape[2] * self.scale[0] - self.pad_out[0],
                                     x.shape[3] * self.scale[1] - self.pad_out[1])
        return _unpool(self, x, mask, out_h, out_w)


class NearestUpsample(Upsample):
    """Nearest-neighbour upsampling: ``top[.., h, w] = bottom[.., h / scale, w / scale]``.

    ``dims_num`` 4 (default) scales the last two axes of a 4-D bottom, 3 only the last
    axis of a 3-D one (golden fork); MobileNet-YOLO's version is the 4-D case. The
    gradient sums each scale x scale block (MobileNet-YOLO's Backward_cpu).
    """

    _SEGNET_ONLY = ("scale_h", "scale_w", "pad_out_h", "pad_out_w", "upsample_h", "upsample_w")

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.upsample_param
        given = [f for f in self._SEGNET_ONLY if p.HasField(f)]
        if given:
            raise self.error(f"{', '.join(given)} belong(s) to SegNet's unpooling, which needs the "
                             f"pooling mask as a second bottom; nearest-neighbour Upsample (one "
                             f"bottom) takes only scale and dims_num")
        self.scale = int(p.scale)
        self.dims = int(p.dims_num)
        if self.scale < 1:
            raise self.error(f"upsample_param.scale must be positive, got {self.scale}")
        if self.dims not in (3, 4):
            raise self.error(f"upsample_param.dims_num must be 3 or 4, got {self.dims}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.dims:
            raise self.error(f"dims_num {self.dims} expects a {self.dims}-D bottom, got shape "
                             f"{list(x.shape)}")
        y = x.repeat_interleave(self.scale, dim=-1)
        return y.repeat_interleave(self.scale, dim=-2) if self.dims == 4 else y


@register("MaxUnPool")
class MaxUnPool(CaffeLayer):
    """Golden fork's unpooling into ``dst_h x dst_w``: ``top[idx[i]] = bottom[i]`` per plane.

    Bottom 1 holds flat indices ``h * dst_w + w`` (a MAX Pooling layer's mask top).
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.max_unpool_param
        if not (p.HasField("dst_h") and p.HasField("dst_w")):
            raise self.error("max_unpool_param.dst_h and dst_w are required")
        self.size = (int(p.dst_h), int(p.dst_w))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _unpool(self, x, mask, *self.size)


def _interp_taps(src: int, dst: int, offset: int, full: int) -> Taps:
    """caffe_cpu_interp2's align-corners rule: ``r = (src-1)/(dst-1)``, position ``r * i``
    truncated, the upper tap only inside the (cropped) source; offset is the crop start."""
    ratio = np.float32(src - 1) / np.float32(dst - 1) if dst > 1 else np.float32(0)
    pos = torch.arange(dst, dtype=torch.float32) * float(ratio)
    low = pos.to(torch.long)
    step = (low < src - 1).to(torch.long)
    frac = pos - low
    return _taps(low + offset, low + step + offset, 1 - frac, frac, full)


@register("Interp")
class Interp(CaffeLayer):
    """DeepLab/PSPNet bilinear resize with align-corners semantics (caffe_cpu_interp2).

    The input is first cropped by ``-pad_beg`` / ``-pad_end`` (only non-positive pads);
    the output size is ``height``/``width``, or ``(in-1)/shrink_factor + 1`` and/or
    ``in + (in-1)*(zoom_factor-1)`` (both: shrink, then zoom), as PSPNet's InterpLayer.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.interp_param
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(f"only non-positive pad_beg/pad_end (cropping) are supported, got "
                             f"pad_beg {self.pad_beg}, pad_end {self.pad_end}")
        self.shrink = int(p.shrink_factor) if p.HasField("shrink_factor") else None
        self.zoom = int(p.zoom_factor) if p.HasField("zoom_factor") else None
        self.size = (int(p.height), int(p.width)) if p.HasField("height") and p.HasField("width") \
            else None
        if self.shrink is None and self.zoom is None and self.size is None:
            raise self.error("give the output size: zoom_factor, shrink_factor, or height and "
                             "width")
        for name, factor in (("shrink_factor", self.shrink), ("zoom_factor", self.zoom)):
            if factor is not None and factor < 1:
                raise self.error(f"interp_param.{name} must be >= 1, got {factor}")

    def _out_size(self, size: int, axis: int) -> int:
        """InterpLayer::Reshape's precedence: a single factor, else height/width, else both."""
        if self.size is not None and (self.shrink is None) == (self.zoom is None):
            return self.size[axis]
        if self.shrink is not None:
            size = (size - 1) // self.shrink + 1
        if self.zoom is not None:
            size = size + (size - 1) * (self.zoom - 1)
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(self, x)
        eff = [s + self.pad_beg + self.pad_end for s in x.shape[2:]]
        out = [self._out_size(s, axis) for axis, s in enumerate(eff)]
        if min(eff) <= 0 or min(out) <= 0:
            raise self.error(f"input {list(x.shape[2:])} cropped by pad_beg {self.pad_beg}, "
                             f"pad_end {self.pad_end} gives {eff} and output {out}: expected "
                             f"positive sizes")
        rows, cols = (_interp_taps(e, o, -self.pad_beg, full)
                      for e, o, full in zip(eff, out, x.shape[2:]))
        return _blend(x, rows, cols)


def _resize_taps(src: int, dst: int) -> Taps:
    """GetBiLinearResizeMatRules_cpu: position ``i * (src/dst)`` floored, weights
    ``|1 - frac|`` and ``|frac|``; the upper tap is dropped (weight 0, no renormalising)
    past the last row/column."""
    scale = np.float32(src) / np.float32(dst)
    pos = torch.arange(dst, dtype=torch.float32) * float(scale)
    low = torch.floor(pos)
    frac = pos - low
    low = low.to(torch.long)
    inside = low + 1 < src
    return _taps(low, low + 1, (1 - frac).abs(), torch.where(inside, frac.abs(), 0.0), src)


@register("Resize")
class Resize(CaffeLayer):
    """Golden fork's bilinear Resize (util_img.cpp) to ``height x width``, or with
    ``is_pyramid_test`` to ``int(out_*_scale * in)``. No half-pixel offset, no corner alignment."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.resize_param
        self.pyramid = bool(p.is_pyramid_test)
        need = ("out_height_scale", "out_width_scale") if self.pyramid else ("height", "width")
        missing = [f for f in need if not p.HasField(f)]
        if missing:
            raise self.error(f"resize_param needs {' and '.join(need)}"
                             f"{' with is_pyramid_test' if self.pyramid else ''}; missing "
                             f"{', '.join(missing)}")
        self.values = tuple(np.float32(getattr(p, f)) if self.pyramid else int(getattr(p, f))
                            for f in need)

    def _out_size(self, x: torch.Tensor) -> tuple[int, int]:
        if self.pyramid:
            return tuple(int(np.float32(s) * scale) for s, scale in zip(x.shape[2:], self.values))
        return self.values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(self, x)
        out = self._out_size(x)
        if min(out) <= 0:
            raise self.error(f"output size must be positive, got {list(out)} for input "
                             f"{list(x.shape[2:])}")
        rows, cols = (_resize_taps(s, o) for s, o in zip(x.shape[2:], out))
        return _blend(x, rows, cols)


def _bilinear_taps(src: int, dst: int, align_corners: bool) -> Taps:
    """BilinearInterpolateLayer's positions: half-pixel ``src/dst*(i+0.5)-0.5`` (in double)
    or align-corners ``(src-1)/(dst-1)*i``, clamped to ``[0, src-1]``; lower tap clamped to
    ``[0, src-2]`` with weights ``(low+1) - pos`` and ``pos - low``."""
    index = torch.arange(dst, dtype=torch.float64)
    if align_corners:
        ratio = np.float32(src - 1) / np.float32(dst - 1) if dst > 1 else np.float32(0)
        pos = index.to(torch.float32) * float(ratio)
    else:
        pos = (float(np.float32(src) / np.float32(dst)) * (index + 0.5) - 0.5).to(torch.float32)
    pos = pos.clamp(0, src - 1)
    low = torch.floor(pos).clamp(0, src - 2)
    high = low + 1
    return _taps(low.to(torch.long), high.to(torch.long), high - pos, pos - low, src)


@register("BilinearInterpolate")
class BilinearInterpolate(CaffeLayer):
    """Golden fork's bilinear resize to ``dst_h x dst_w`` (a missing one keeps the input
    size), or to ``int(in * scale_factor)``, fixed from the first bottom shape as
    LayerSetUp does; ``align_corners`` picks the sampling rule."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.bilinear_interpolate_param
        has_dst = p.HasField("dst_h") or p.HasField("dst_w")
        if has_dst == p.HasField("scale_factor"):
            raise self.error("give either dst_h/dst_w or scale_factor in "
                             "bilinear_interpolate_param (exactly one of them)")
        shape = spec.bottom_shapes[0]
        if len(shape) != 4:
            raise self.error(f"expected a 4-D bottom (num, channels, height, width), got shape "
                             f"{list(shape)}")
        if has_dst:
            self.size = (int(p.dst_h) if p.HasField("dst_h") else shape[2],
                         int(p.dst_w) if p.HasField("dst_w") else shape[3])
        else:
            self.size = tuple(int(np.float32(s) * np.float32(p.scale_factor)) for s in shape[2:])
        if min(self.size) <= 0:
            raise self.error(f"output size must be positive, got {list(self.size)}")
        self.align_corners = bool(p.align_corners)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(self, x)
        rows, cols = (_bilinear_taps(s, o, self.align_corners)
                      for s, o in zip(x.shape[2:], self.size))
        return _blend(x, rows, cols)


@register("PixelShuffle")
class PixelShuffle(CaffeLayer):
    """Depth-to-space: ``top[n, p, i*r+sh, j*r+sw] = bottom[n, p*r*r + sh*r + sw, i, j]``."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.factor = int(spec.param.pixelshuffle_param.upscale_factor)
        if self.factor < 1:
            raise self.error(f"pixelshuffle_param.upscale_factor must be positive, got "
                             f"{self.factor}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(self, x)
        if x.shape[1] % (self.factor * self.factor):
            raise self.error(f"channels must be a multiple of upscale_factor^2 = "
                             f"{self.factor * self.factor}, got {x.shape[1]}")
        return F.pixel_shuffle(x, self.factor)


_PAD_MODES = {caffe_pb2.PadParameter.CONSTANT: "constant",
              caffe_pb2.PadParameter.REFLECT: "reflect",
              caffe_pb2.PadParameter.REPLICATE: "replicate"}


@register("Pad")
class Pad(CaffeLayer):
    """Golden fork's Pad of H and W (4-D): CONSTANT (``pad_value``), REFLECT (edge not
    repeated) or REPLICATE; when all four pads are negative it crops instead, whatever the
    type. Mixed signs are refused (the fork writes outside the top there)."""

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        if spec.param.top and spec.param.top[0] == spec.param.bottom[0]:
            raise self.error("does not allow in-place computation: give the top another name")
        p = spec.param.pad_param
        self.pads = (int(p.pad_u), int(p.pad_d), int(p.pad_l), int(p.pad_r))
        self.crop = all(v < 0 for v in self.pads)
        if not self.crop and min(self.pads) < 0:
            raise self.error(f"pads must be all >= 0 (padding) or all < 0 (cropping), got "
                             f"u/d/l/r = {list(self.pads)}")
        self.mode = _PAD_MODES[p.pad_type]
        self.value = float(p.pad_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_4d(self, x)
        up, down, left, right = self.pads
        if self.crop:
            height, width = x.shape[2:]
            if height + up + down < 0 or width + left + right < 0:
                raise self.error(f"cropping u/d/l/r = {list(self.pads)} exceeds the input "
                                 f"{[height, width]}")
            return x[:, :, -up:height + down, -left:width + right]
        if self.mode == "constant":
            return F.pad(x, (left, right, up, down), value=self.value)
        return F.pad(x, (left, right, up, down), mode=self.mode)
