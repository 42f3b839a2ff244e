"""The FlowNet2 fork's layers (lmb-freiburg/flownet2): Correlation, Correlation1D, FlowWarp,
Resample, Accum and DataAugmentation.

Each follows the fork's own definition (``src/caffe/layers/*_layer.{cpp,cu}`` of
lmb-freiburg/flownet2, whose forward passes are CUDA kernels), with the positions and
weights computed in float32 as the kernels compute them:

* ``Correlation`` (correlation_layer.cu): for every displacement ``(dx, dy)`` of the
  ``(2 * (max_displacement / stride_2) + 1)^2`` grid (``dy`` major), the mean over a
  ``kernel_size``^2 x C patch of ``a * b`` (MULTIPLY) or ``|a - b|`` (SUBTRACT), both
  bottoms zero padded by ``pad``; patch corners at ``(y * stride_1 + max_displacement,
  x * stride_1 + max_displacement)``, output size ``ceil((H + 2 pad - 2 border) /
  stride_1)`` with ``border = max_displacement + (kernel_size - 1) / 2``.
* ``Correlation1D`` (correlation_layer1d.cu, DispNet): the same along x only, see the
  class docstring.
* ``FlowWarp`` (flow_warp_layer.cu): ``out(x, y) = bilinear(image, x + u, y + v)`` where
  ``0 <= x + u < W`` and ``0 <= y + v < H`` (the right/bottom neighbour clamped to the last
  column/row), else the fill value (0, or NaN for ``fill_value: NOT_A_NUMBER``).
* ``Resample`` (resample_layer.cu): NEAREST, LINEAR (triangle filter) and CUBIC
  (a = -0.5) sampling at ``x_in = x_out * fx + fy / 2 - 0.5`` (``fx = W_in / W_out``;
  the kernel really adds half of the *other* axis' factor), rounded half away from zero;
  LINEAR and CUBIC normalise the weights of the taps that fall inside the image and,
  when either axis shrinks and ``antialias`` is set, widen the filter by the factor.
  The output size is ``width``/``height``, or the second bottom's size, or (OpenCV's
  reading of the fork's ``factor`` field, which the fork's own Reshape never reads)
  ``int(H * factor) x int(W * factor)``.
* ``Accum`` (accum_layer.cpp): concatenates the bottoms along channels, each resized
  with align-corners bilinear interpolation (``x_in = x_out / (W_out - 1) * (W_in - 1)``)
  to the largest bottom (or ``top_height``/``top_width``, or the size rounded up to
  ``size_divisible_by``, when that is larger in both axes), or to the last bottom's
  size when ``have_reference`` (the reference itself is not copied).
* ``DataAugmentation`` (data_augmentation_layer.{cpp,cu}): the deterministic part only,
  see the class docstring.

OpenCV's dnn implements Correlation, FlowWarp, Accum and DataAugmentation with the same
numbers in the cases it supports (its Accum handles one image per batch and floors
``size_divisible_by``'s ceiling; its DataAugmentation handles one image per batch and
ignores the stored iteration and mean). Its
Resample is its own Resize layer instead: floor(x_out * W_in / W_out) for NEAREST,
which equals the fork for integer upscaling, and corner-aligned-at-0 ("asymmetric")
bilinear for LINEAR, which never equals the fork's kernel; here the fork's kernels win.

The fork has no (or a LOG(FATAL)) backward for Resample and DataAugmentation; every layer
here gets autograd's exact gradient of its forward (Accum's equals the fork's CPU
backward; the fork's GPU backward of Accum is a different, approximate downscaling).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape
from .registry import register

# One axis of a separable resampling: for each output position K source indices (all
# inside the input) and their weights, ``out[o] = sum_k weight[o, k] * x[index[o, k]]``.
Taps = tuple[torch.Tensor, torch.Tensor]

_F32 = torch.float32


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=_F32)


def _apply_taps(x: torch.Tensor, dim: int, taps: Taps) -> torch.Tensor:
    """Resample axis ``dim`` (-1 or -2) of ``x`` with ``taps``."""
    ones = taps[1].eq(1).all(0).tolist()  # on the CPU: x may be a meta tensor
    index, weight = taps[0].to(x.device), taps[1].to(device=x.device, dtype=x.dtype)
    out = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k])
        if not ones[k]:
            term = term * (weight[:, k] if dim == -1 else weight[:, k, None])
        out = term if out is None else out + term
    return out


def _resample2d(x: torch.Tensor, rows: Taps, cols: Taps) -> torch.Tensor:
    return _apply_taps(_apply_taps(x, -1, cols), -2, rows)


def _two_taps(pos: torch.Tensor, size: int) -> Taps:
    """Bilinear taps ``floor(pos)`` and ``floor(pos) + 1`` (clamped to the last index, where
    its weight is 0 in every caller)."""
    low = torch.floor(pos)
    frac = pos - low
    low = low.long().clamp(0, size - 1)
    high = (low + 1).clamp(max=size - 1)
    return torch.stack([low, high], 1), torch.stack([1 - frac, frac], 1)


def _check_4d(layer: CaffeLayer, shape, which: str = "bottom") -> None:
    if len(shape) != 4:
        raise layer.error(f"expected a 4-D {which} (num, channels, height, width), got shape "
                          f"{list(shape)}")


# -- Correlation ---------------------------------------------------------------------------

class _CorrelationBase(CaffeLayer):
    """``correlation_param`` and the patch correlation shared by Correlation and Correlation1D.

    ``f = a * b`` (MULTIPLY) or ``|a - b|`` (SUBTRACT) is averaged over a
    ``kernel_size``^2 x C patch; ``R = max_displacement / stride_2`` displacements of
    ``stride_2`` pixels each way. ``do_abs`` is read but not used by the fork's kernels.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.correlation_param
        for name in ("kernel_size", "max_displacement"):
            if not p.HasField(name):
                raise self.error(f"correlation_param.{name} is required")
        self.kernel = int(p.kernel_size)
        if self.kernel % 2 == 0:
            raise self.error(f"correlation_param.kernel_size must be odd, got {self.kernel}")
        self.max_disp, self.pad = int(p.max_displacement), int(p.pad)
        self.stride1, self.stride2 = int(p.stride_1), int(p.stride_2)
        for name, value in (("stride_1", self.stride1), ("stride_2", self.stride2)):
            if value < 1:
                raise self.error(f"correlation_param.{name} must be positive, got {value}")
        self.single_direction = int(p.single_direction)
        self.subtract = p.correlation_type == caffe_pb2.CorrelationParameter.SUBTRACT
        self.radius = self.max_disp // self.stride2
        self.border = self.max_disp + (self.kernel - 1) // 2

    def _padded_out(self, size: int) -> int:
        """Output extent along an axis padded by ``pad`` with ``border`` unreachable each side."""
        return -(-(size + 2 * self.pad - 2 * self.border) // self.stride1)

    def _out_hw(self, height: int, width: int) -> tuple[int, int]:
        raise NotImplementedError

    def _output_size(self, a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
        """The top's (H, W) for these bottoms, after checking their shapes."""
        _check_4d(self, a.shape)
        if a.shape != b.shape:
            raise self.error(f"both bottoms must have the same shape, got {list(a.shape)} and "
                             f"{list(b.shape)}")
        out_h, out_w = self._out_hw(a.shape[2], a.shape[3])
        if out_h < 1 or out_w < 1:
            raise self.error(f"the {a.shape[2]}x{a.shape[3]} bottoms (padded by {self.pad}) are "
                             f"too small for max_displacement {self.max_disp} and kernel_size "
                             f"{self.kernel}: the output would be {out_h}x{out_w}")
        return out_h, out_w

    def _correlate(self, a: torch.Tensor, b: torch.Tensor, out_h: int, out_w: int,
                   origin: tuple[int, int], row_shifts: list[int],
                   col_shifts: list[int]) -> torch.Tensor:
        """One channel per (row shift, column shift), row shift major: the patch of ``a`` at
        ``origin + (y, x) * stride_1`` against the patch of ``b`` that far from it."""
        k, s1 = self.kernel, self.stride1
        y0, x0 = origin
        # Products are needed at the patch pixels: every pixel of the span for a k x k patch,
        # only the strided patch corners for a 1 x 1 patch.
        step = s1 if k == 1 else 1
        span_h, span_w = (out_h - 1) * s1 + k, (out_w - 1) * s1 + k
        first = a[:, :, y0:y0 + span_h:step, x0:x0 + span_w:step]
        n, channels, rows, cols = first.shape
        maps = []
        if self.subtract:
            for dy in row_shifts:
                for dx in col_shifts:
                    second = b[:, :, y0 + dy:y0 + dy + span_h:step,
                               x0 + dx:x0 + dx + span_w:step]
                    maps.append((first - second).abs().sum(1))
            corr = torch.stack(maps, 1)
        else:
            # Per row shift: all (x, x') channel dot products of a row pair in one matmul,
            # then the x' = x + dx ones.
            lhs = first.permute(0, 2, 3, 1)
            index = (x0 + torch.arange(cols)[:, None] * step + torch.tensor(col_shifts))
            index = index.to(a.device).expand(n, rows, cols, len(col_shifts))
            for dy in row_shifts:
                rhs = b[:, :, y0 + dy:y0 + dy + span_h:step, :].permute(0, 2, 1, 3)
                maps.append(torch.matmul(lhs, rhs).gather(3, index))
            corr = torch.stack(maps, 3).flatten(3).permute(0, 3, 1, 2)
        if k > 1:
            corr = F.avg_pool2d(corr, k, stride=s1, divisor_override=1)
        return corr / (k * k * channels)


@register("Correlation")
class Correlation(_CorrelationBase):
    """FlowNet's correlation of two feature maps (correlation_layer.cu), MULTIPLY or SUBTRACT.

    ``top[d, y, x] = mean over j, i < kernel_size and channels c of
    f(a[c, y1 + j, x1 + i], b[c, y1 + dy + j, x1 + dx + i])`` on the zero-padded bottoms,
    ``(y1, x1) = (y, x) * stride_1 + max_displacement``, and
    ``d = (dy / stride_2 + R) * (2R + 1) + dx / stride_2 + R``.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        if self.single_direction:
            raise self.error(f"correlation_param.single_direction ({self.single_direction}) "
                             f"belongs to the fork's Correlation1D layer; Correlation compares "
                             f"all 2-D displacements")

    def _out_hw(self, height: int, width: int) -> tuple[int, int]:
        return self._padded_out(height), self._padded_out(width)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out_h, out_w = self._output_size(a, b)
        if self.pad:
            a = F.pad(a, (self.pad,) * 4)
            b = F.pad(b, (self.pad,) * 4)
        shifts = [d * self.stride2 for d in range(-self.radius, self.radius + 1)]
        return self._correlate(a, b, out_h, out_w, (self.max_disp, self.max_disp), shifts,
                               shifts)


@register("Correlation1D")
class Correlation1D(_CorrelationBase):
    """DispNet's horizontal correlation (correlation_layer1d.cu of the same fork).

    The bottoms are zero padded by ``pad`` left and right only, patches start at
    ``(y1, x1) = (y * stride_1, x * stride_1 + max_displacement)`` and are compared with
    the patches ``dx = o * stride_2`` to the right: ``top[o', y, x] = mean over j, i and c of
    f(a[c, y1 + j, x1 + i], b[c, y1 + j, x1 + dx + i])``, with o from -R to R
    (``single_direction: 0``), from 0 to R (``1``, rightwards) or from -(R + 1) to -1
    (``-1``, the fork's leftward range; at the left edge its kernel then reads up to
    ``stride_2`` pixels before the padded row, which here are 0). The output is
    ``ceil((H - 2r) / stride_1) x ceil((W + 2 pad - 2 border) / stride_1)``, r the kernel
    radius and ``border = max_displacement + r``. The fork has GPU kernels only; the
    gradients are the exact ones of this forward.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        if self.single_direction not in (-1, 0, 1):
            raise self.error(f"correlation_param.single_direction must be -1 (left), 0 (both "
                             f"ways) or 1 (right), got {self.single_direction}")
        first = {0: -self.radius, 1: 0, -1: -self.radius - 1}[self.single_direction]
        count = 2 * self.radius + 1 if self.single_direction == 0 else self.radius + 1
        self.offsets = list(range(first, first + count))

    def _out_hw(self, height: int, width: int) -> tuple[int, int]:
        # Rows: no padding, only the kernel radius unreachable each side.
        return -(-(height - (self.kernel - 1)) // self.stride1), self._padded_out(width)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out_h, out_w = self._output_size(a, b)
        # Extra zeros on the left for the leftward range's reads before the padded row.
        extra = self.stride2 if self.single_direction == -1 else 0
        if self.pad or extra:
            a = F.pad(a, (self.pad + extra, self.pad))
            b = F.pad(b, (self.pad + extra, self.pad))
        shifts = [o * self.stride2 for o in self.offsets]
        return self._correlate(a, b, out_h, out_w, (0, self.max_disp + extra), [0], shifts)


# -- FlowWarp ------------------------------------------------------------------------------

@register("FlowWarp")
class FlowWarp(CaffeLayer):
    """Backward warping of bottom 0 (N x C x H x W) by the flow in bottom 1 (N x 2 x H x W).

    ``out[c, y, x]`` is the bilinear sample of the image at ``(x + flow[0], y + flow[1])``
    when ``0 <= x + flow[0] < W`` and ``0 <= y + flow[1] < H`` (the right and bottom taps
    clamped to the last column and row), otherwise 0 (``fill_value: ZERO``) or NaN
    (``NOT_A_NUMBER``). A NaN flow counts as outside.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        fill = spec.param.flow_warp_param.fill_value
        self.fill = float("nan") if fill == caffe_pb2.FlowWarpParameter.NOT_A_NUMBER else 0.0

    def forward(self, image: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        _check_4d(self, image.shape)
        n, c, h, w = image.shape
        if tuple(flow.shape) != (n, 2, h, w):
            raise self.error(f"the flow (bottom 1) must have shape {[n, 2, h, w]} for the image "
                             f"{list(image.shape)}, got {list(flow.shape)}")
        flow = flow.to(image.dtype)
        xs = torch.arange(w, device=image.device, dtype=image.dtype)
        ys = torch.arange(h, device=image.device, dtype=image.dtype)[:, None]
        x2, y2 = xs + flow[:, 0], ys + flow[:, 1]
        inside = (x2 >= 0) & (y2 >= 0) & (x2 < w) & (y2 < h)
        x2 = torch.where(inside, x2, torch.zeros_like(x2))
        y2 = torch.where(inside, y2, torch.zeros_like(y2))
        left, top = torch.floor(x2.detach()), torch.floor(y2.detach())
        alpha, beta = (x2 - left)[:, None], (y2 - top)[:, None]
        left, top = left.long(), top.long()
        right, bottom = (left + 1).clamp(max=w - 1), (top + 1).clamp(max=h - 1)
        flat = image.reshape(n, c, h * w)

        def sample(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
            index = (row * w + col).reshape(n, 1, h * w).expand(n, c, h * w)
            return flat.gather(2, index).view(n, c, h, w)

        warped = ((1 - alpha) * (1 - beta) * sample(top, left)
                  + alpha * (1 - beta) * sample(top, right)
                  + (1 - alpha) * beta * sample(bottom, left)
                  + alpha * beta * sample(bottom, right))
        return torch.where(inside[:, None], warped, torch.full_like(warped, self.fill))


# -- Resample ------------------------------------------------------------------------------

def _round_half_away(t: torch.Tensor) -> torch.Tensor:
    """CUDA's ``round``: halves away from zero (torch.round goes to even)."""
    whole = torch.trunc(t)
    frac = t - whole
    return whole + (frac >= 0.5).to(t.dtype) - (frac <= -0.5).to(t.dtype)


def _triangle(t: torch.Tensor) -> torch.Tensor:
    return (1 - t.abs()).clamp(min=0)


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    t = t.abs()
    near = t * t * (1.5 * t - 2.5) + 1
    far = t * (t * (-0.5 * t + 2.5) - 4) + 2
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


_FILTERS = {caffe_pb2.ResampleParameter.LINEAR: (_triangle, 2),
            caffe_pb2.ResampleParameter.CUBIC: (_bicubic, 4)}


def _resample_taps(kind: int, out_size: int, in_size: int, f_this: torch.Tensor,
                   f_other: torch.Tensor, antialias: bool) -> Taps:
    """One axis of resample_layer.cu's kernels (``f_*`` = in / out of this and the other axis)."""
    pos = torch.arange(out_size, dtype=_F32) * f_this + f_other / 2 - 0.5
    center = _round_half_away(pos).long()
    if kind == caffe_pb2.ResampleParameter.NEAREST:
        index = center.clamp(0, in_size - 1)[:, None]
        return index, torch.ones(index.shape, dtype=_F32)
    filt, kernel_width = _FILTERS[kind]
    scale = 1 / f_this if antialias else _f32(1.0)
    radius = 2 if f_this < 1 else math.ceil(float(_f32(kernel_width) / scale))
    taps = center[:, None] + torch.arange(-radius, radius + 1)
    valid = (taps >= 0) & (taps < in_size)
    weight = scale * filt(scale * (pos[:, None] - taps.to(_F32)))
    weight = torch.where(valid, weight, torch.zeros_like(weight))
    total = weight.sum(1, keepdim=True)
    # sum / wsum, and 0 where no tap has weight; wsum is the product of the axes' sums.
    weight = torch.where(total != 0, weight / torch.where(total != 0, total, 1),
                         torch.zeros_like(weight))
    keep = weight.ne(0).any(0)
    if not bool(keep.any()):
        keep[0] = True
    return taps.clamp(0, in_size - 1)[:, keep], weight[:, keep]


@register("Resample")
class Resample(CaffeLayer):
    """The fork's resampling of a 4-D bottom (``resample_param``): NEAREST, LINEAR or CUBIC.

    Output size: with two bottoms, the second bottom's height and width (``width`` and
    ``height`` are then ignored, as by the fork; ``factor`` must be 1, as OpenCV requires);
    with one, ``width`` and ``height`` (both), else ``int(H * factor) x int(W * factor)``
    (OpenCV's meaning of ``factor``). AREA is not supported by the fork either.
    """

    min_bottoms, max_bottoms = 1, 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.resample_param
        self.kind = p.type
        if self.kind not in (caffe_pb2.ResampleParameter.NEAREST, *_FILTERS):
            name = caffe_pb2.ResampleParameter.ResampleType.Name(self.kind)
            raise self.error(f"resample_param.type {name} is not supported (the fork implements "
                             f"NEAREST, LINEAR and CUBIC)")
        self.antialias = bool(p.antialias)
        self.factor = float(p.factor)
        if not self.factor > 0:
            raise self.error(f"resample_param.factor must be positive, got {self.factor:g}")
        self.size: tuple[int, int] | None = None
        if len(spec.param.bottom) == 2:
            if self.factor != 1:
                raise self.error(f"with two bottoms the output takes bottom 1's size; "
                                 f"resample_param.factor must be 1, got {self.factor:g}")
            return
        if p.HasField("width") != p.HasField("height"):
            raise self.error("give both resample_param.width and height (or neither, with "
                             "factor, or a second bottom whose size the output takes)")
        if p.HasField("width"):
            if self.factor != 1:
                raise self.error(f"resample_param gives width/height and factor "
                                 f"{self.factor:g}; give one of them")
            self.size = (int(p.height), int(p.width))
            if min(self.size) < 1:
                raise self.error(f"resample_param.width and height must be positive, got "
                                 f"{p.width}x{p.height}")
        elif not p.HasField("factor"):
            raise self.error("resample_param needs width and height, or factor, or a second "
                             "bottom whose size the output takes")

    def _out_size(self, shape: Shape, ref: Shape | None) -> tuple[int, int]:
        if ref is not None:
            _check_4d(self, ref, "bottom 1")
            return int(ref[2]), int(ref[3])
        if self.size is not None:
            return self.size
        factor = _f32(self.factor)
        size = tuple(int(_f32(float(s)) * factor) for s in shape[2:])
        if min(size) < 1:
            raise self.error(f"factor {self.factor:g} gives an empty output for the "
                             f"{shape[2]}x{shape[3]} bottom")
        return size

    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        _check_4d(self, x.shape)
        out_h, out_w = self._out_size(tuple(x.shape), None if ref is None else tuple(ref.shape))
        in_h, in_w = x.shape[2], x.shape[3]
        fx, fy = _f32(in_w) / _f32(out_w), _f32(in_h) / _f32(out_h)
        antialias = self.antialias and bool(fx > 1 or fy > 1)
        cols = _resample_taps(self.kind, out_w, in_w, fx, fy, antialias)
        rows = _resample_taps(self.kind, out_h, in_h, fy, fx, antialias)
        return _resample2d(x, rows, cols)


# -- Accum ---------------------------------------------------------------------------------

def _corner_taps(out_size: int, in_size: int) -> Taps:
    """accum_layer.cpp's ``x_in = x_out / (W_out - 1) * (W_in - 1)``; a 1-wide output reads
    position 0 (the fork divides 0 by 0 there)."""
    if out_size == 1:
        pos = torch.zeros(1, dtype=_F32)
    else:
        pos = torch.arange(out_size, dtype=_F32) / _f32(out_size - 1) * _f32(in_size - 1)
    return _two_taps(pos, in_size)


@register("Accum")
class Accum(CaffeLayer):
    """Channel concatenation of the bottoms, each resized (align-corners bilinear) to the
    output size (``accum_param``).

    Without ``have_reference`` the output size is the largest bottom height and width;
    ``size_divisible_by`` (if given) or ``top_height``/``top_width`` replace it only when
    larger in *both* axes (the fork's rule). With ``have_reference`` the last bottom only
    gives the size and is not part of the output.
    """

    min_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.accum_param
        self.reference = bool(p.have_reference)
        if self.reference and len(spec.param.bottom) < 2:
            raise self.error("accum_param.have_reference needs at least two bottoms (the last "
                             "one is the size reference)")
        self.divisor = int(p.size_divisible_by) if p.HasField("size_divisible_by") else None
        if self.divisor == 0:
            raise self.error("accum_param.size_divisible_by must be positive, got 0")
        self.top_size = (int(p.top_height), int(p.top_width))

    def _out_size(self, shapes: list[Shape]) -> tuple[int, int]:
        for i, shape in enumerate(shapes):
            _check_4d(self, shape, f"bottom {i}")
        accumulated = shapes[:-1] if self.reference else shapes
        nums = {s[0] for s in accumulated}
        if len(nums) > 1:
            raise self.error(f"all accumulated bottoms must have the same num, got shapes "
                             f"{[list(s) for s in accumulated]}")
        if self.reference:
            return int(shapes[-1][2]), int(shapes[-1][3])
        max_h, max_w = max(s[2] for s in shapes), max(s[3] for s in shapes)
        if self.divisor is not None:
            top = tuple(int(math.ceil(float(_f32(m) / _f32(self.divisor)))) * self.divisor
                        for m in (max_h, max_w))
        else:
            top = self.top_size
        return top if top[0] > max_h and top[1] > max_w else (int(max_h), int(max_w))

    def forward(self, *bottoms: torch.Tensor) -> torch.Tensor:
        out_h, out_w = self._out_size([tuple(b.shape) for b in bottoms])
        parts = []
        for x in bottoms[:len(bottoms) - self.reference]:
            rows, cols = _corner_taps(out_h, x.shape[2]), _corner_taps(out_w, x.shape[3])
            parts.append(_resample2d(x, rows, cols))
        return torch.cat(parts, 1)


# -- DataAugmentation ----------------------------------------------------------------------

_RANDOM_OPTIONS = tuple(
    f.name for f in caffe_pb2.AugmentationParameter.DESCRIPTOR.fields
    if f.message_type is not None and f.message_type.name == "RandomGeneratorParameter")


def _crop_taps(out_size: int, in_size: int) -> Taps:
    """SpatialAugmentation's sample positions for identity coefficients: a centred crop,
    ``x + (W_in - W_out) / 2`` clamped to ``[0, W_in - 1.05]``, sampled bilinearly."""
    offset = _f32(-0.5 * out_size) + _f32(0.5 * in_size)
    pos = torch.arange(out_size, dtype=_F32) + offset
    pos = torch.maximum(torch.minimum(pos, _f32(in_size) - _f32(1.05)), _f32(0.0))
    return _two_taps(pos, in_size)


@register("DataAugmentation")
class DataAugmentation(CaffeLayer):
    """The deterministic part of FlowNet2's DataAugmentation (``augmentation_param``).

    Done here:

    * cropping to ``crop_width`` x ``crop_height`` (both given) with identity augmentation
      coefficients: the fork's bilinear spatial kernel at the centred positions, clamped
      to ``W - 1.05`` (so even a full-size "crop" blends the last row and column);
    * ``recompute_mean > 0``: blobs ``[iteration (1), mean (1 x C x h x w), per-channel
      mean (1 x C x 1 x 1)]``, never learned. Every forward increments the iteration; while
      it is ``<= recompute_mean`` the running mean becomes ``(mean * (i - 1) + batch mean)
      / i``. The top is then the (cropped) bottom minus the per-pixel mean
      (``mean_per_pixel``) or the per-channel mean. A fresh net's first forward subtracts
      the batch's own mean, which is all OpenCV's DataAugmentation ever does (it ignores
      the stored iteration and mean);
    * otherwise, three ``mean`` values with ``mean_per_pixel: false`` are subtracted per
      channel (3-channel bottoms); the fork ignores ``mean`` in every other case.

    Not done: the random spatial, chromatic and effect augmentations (the
    RandomGeneratorParameter options such as ``translate``, ``gamma`` or ``noise``), which
    the fork applies only with cropping, in TRAIN or with ``augment_during_test``: that
    combination is an error here. Without cropping the fork ignores them, and so does
    this layer. The coefficient bottom/top of the fork's training nets are not supported,
    nor are mean blobs of another size than the layer's (the fork's ``adjust_blobs``).
    ``write_augmented``/``write_mean`` (debug output) are ignored. The top's gradient
    passes straight through (the mean is a statistic, not a function of the input).
    """

    min_bottoms, max_bottoms = 1, 2
    min_tops, max_tops = 1, 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.augmentation_param
        if len(spec.param.bottom) > 1 or len(spec.param.top) > 1:
            raise self.error("augmentation coefficient bottoms/tops (the fork's training nets "
                             "share random coefficients between layers) are not supported; "
                             "give one bottom and one top")
        shape = tuple(spec.bottom_shapes[0]) if spec.bottom_shapes else None
        if shape is None:
            raise self.error("the bottom's shape is unknown")
        _check_4d(self, shape)
        self.crop = None
        if p.HasField("crop_width") and p.HasField("crop_height"):
            self.crop = (int(p.crop_height), int(p.crop_width))
            if min(self.crop) < 1:
                raise self.error(f"crop_width and crop_height must be positive, got "
                                 f"{p.crop_width}x{p.crop_height}")
            options = [name for name in _RANDOM_OPTIONS if p.HasField(name)]
            if options and (self.phase == caffe_pb2.TRAIN or p.augment_during_test):
                when = "in TRAIN" if self.phase == caffe_pb2.TRAIN else "with augment_during_test"
                raise self.error(f"random augmentation ({', '.join(options)}) {when} is not "
                                 f"supported: only the deterministic crop and mean subtraction "
                                 f"of DataAugmentation are implemented")
        self.recompute = int(p.recompute_mean)
        self.per_pixel = bool(p.mean_per_pixel)
        out = self._top_shape(shape)
        self.register_buffer("fixed_mean", None, persistent=False)
        if self.recompute > 0:
            for blob_shape in ((1, 1, 1, 1), (1, *out[1:]), (1, out[1], 1, 1)):
                self.add_blob(blob_shape, None, learnable=False)
        else:
            self.add_blob((1, 1, 1, 1), None, learnable=False)
            if len(p.mean) == 3 and not self.per_pixel:
                if shape[1] != 3:
                    raise self.error(f"three mean values need a 3-channel bottom, got shape "
                                     f"{list(shape)}")
                self.fixed_mean = torch.tensor(list(p.mean), dtype=_F32).view(1, 3, 1, 1)
        specs = self.param.param
        for i in range(len(self.blobs)):
            if len(specs) == i:
                spec_ = specs.add()
                spec_.lr_mult, spec_.decay_mult = 0.0, 0.0

    def _top_shape(self, shape: Shape) -> Shape:
        _check_4d(self, shape)
        if self.crop is None:
            return tuple(shape)
        if self.crop[0] > shape[2] or self.crop[1] > shape[3]:
            raise self.error(f"the crop {self.crop[1]}x{self.crop[0]} (width x height) is larger "
                             f"than the bottom {list(shape)}")
        return (shape[0], shape[1], *self.crop)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        top = self._top_shape(tuple(bottom_shapes[0]))
        self._check_mean_shape(top)
        return [top]

    def _check_mean_shape(self, top: Shape) -> None:
        if self.recompute > 0 and tuple(self.blobs[1].shape[1:]) != tuple(top[1:]):
            raise self.error(f"the mean blob has shape {list(self.blobs[1].shape)} but the top "
                             f"is {list(top)}: the fork sizes its mean blobs once, at setup")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top_shape = self._top_shape(tuple(x.shape))
        self._check_mean_shape(top_shape)
        if self.crop is not None:
            rows = _crop_taps(top_shape[2], x.shape[2])
            cols = _crop_taps(top_shape[3], x.shape[3])
            x = _resample2d(x, rows, cols)
        if self.recompute > 0:
            iteration, mean, channel_mean = self.blobs
            with torch.no_grad():
                iteration.add_(1)
                count = int(iteration.item())
                if count <= self.recompute:
                    data = x.detach().to(mean.dtype)
                    mean.mul_(count - 1).add_((data / data.shape[0]).sum(0, keepdim=True))
                    mean.mul_(1.0 / count)
                    area = mean.shape[2] * mean.shape[3]
                    channel_mean.copy_(mean.sum((2, 3), keepdim=True) * (1.0 / area))
            subtrahend = mean if self.per_pixel else channel_mean
            return x - subtrahend.detach().to(x.dtype)
        with torch.no_grad():
            self.blobs[0].add_(1)
        if self.fixed_mean is not None:
            return x - self.fixed_mean.to(x.dtype)
        return x
