"""Pooling and SPP: Caffe's 2-D MAX / AVE / STOCHASTIC pooling (pooling_layer.cpp, .cu).

Caffe's window geometry differs from torch's in a few places, all handled here:

* the output size is ``ceil((H + 2*pad - k) / stride) + 1`` (``round_mode: FLOOR`` or the
  fork spelling ``ceil_mode: false`` floors), then, only when some pad is non-zero, the
  last window is dropped if it starts at or beyond ``H + pad``; torch drops it whenever
  ``ceil_mode`` is set, so with pad 0 and stride > kernel Caffe has windows that lie
  wholly outside the input (MAX gives -FLT_MAX, mask -1; AVE divides 0 by a
  non-positive pool size: NaN or -0);
* AVE divides by the window clipped to ``H + pad`` (padding counts, the ceil overhang
  does not): torch's ``count_include_pad=True`` rule;
* Caffe allows any ``pad < kernel``; torch refuses ``pad > kernel // 2``.

Where torch's own op gives Caffe's output size it is used directly (torch then also
matches values, first-maximum tie-breaking and gradients); otherwise the input is
padded explicitly (-inf for MAX, 0 for AVE) and AVE divides by Caffe's pool sizes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec
from .registry import register

FLT_MAX = 3.4028234663852886e38   # Caffe's -FLT_MAX marks an empty MAX window
FLT_MIN = 1.1754943508222875e-38  # STOCHASTIC test-time sum starts here (no 0/0)

MAX = caffe_pb2.PoolingParameter.MAX
AVE = caffe_pb2.PoolingParameter.AVE
STOCHASTIC = caffe_pb2.PoolingParameter.STOCHASTIC
_METHOD_NAMES = {MAX: "MAX", AVE: "AVE", STOCHASTIC: "STOCHASTIC"}

Pair = tuple[int, int]


def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool, clip: bool) -> int:
    """Caffe's pooled extent of one axis (PoolingLayer::Reshape).

    ``clip`` says some pad (of either axis) is non-zero: only then is a last window that
    starts at or past ``size + pad`` dropped.
    """
    span = size + 2 * pad - kernel
    n = (-(-span // stride) if ceil else span // stride) + 1
    if clip and (n - 1) * stride >= size + pad:
        n -= 1
    return n


def _torch_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """torch's ``pooling_output_shape``: the same, but it clips whenever ``ceil`` is set."""
    return pooled_size(size, kernel, stride, pad, ceil, ceil)


def _window_sizes(n: int, size: int, kernel: int, stride: int, pad: int,
                  device: torch.device) -> torch.Tensor:
    """Caffe's AVE pool size along one axis: the window clipped to ``size + pad`` (may be <= 0)."""
    start = torch.arange(n, device=device) * stride - pad
    return torch.clamp(start + kernel, max=size + pad) - start


def pool2d(x: torch.Tensor, method: int, kernel: Pair, stride: Pair, pad: Pair, out: Pair, *,
           ceil: bool, train: bool = False, with_mask: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Caffe's pooling of an (N, C, H, W) tensor to ``out`` = (Ho, Wo), already validated.

    Returns (top, mask); mask is Caffe's argmax ``h * W + w`` as floats (MAX with
    ``with_mask`` only). ``train`` selects STOCHASTIC sampling over its test-time average.
    """
    height, width = x.shape[-2:]
    native = (method != STOCHASTIC
              and all(p <= k // 2 for p, k in zip(pad, kernel))
              and out == (_torch_size(height, kernel[0], stride[0], pad[0], ceil),
                          _torch_size(width, kernel[1], stride[1], pad[1], ceil)))
    if native and method == MAX:
        if with_mask:
            top, idx = F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil, return_indices=True)
            return top, idx.to(x.dtype)
        return F.max_pool2d(x, kernel, stride, pad, ceil_mode=ceil), None
    if native:
        return F.avg_pool2d(x, kernel, stride, pad, ceil_mode=ceil, count_include_pad=True), None
    # Pad (or crop) so that plain floor-mode pooling yields exactly Caffe's windows.
    extra_h = (out[0] - 1) * stride[0] + kernel[0] - height - 2 * pad[0]
    extra_w = (out[1] - 1) * stride[1] + kernel[1] - width - 2 * pad[1]
    padding = (pad[1], pad[1] + extra_w, pad[0], pad[0] + extra_h)
    if method == MAX:
        xp = F.pad(x, padding, value=float("-inf"))
        top, idx = F.max_pool2d(xp, kernel, stride, return_indices=True)
        has_empty = (out[0] - 1) * stride[0] - pad[0] >= height or \
            (out[1] - 1) * stride[1] - pad[1] >= width
        if has_empty:  # windows wholly past the input: Caffe leaves -FLT_MAX and mask -1
            empty_h = torch.arange(out[0], device=x.device) * stride[0] - pad[0] >= height
            empty_w = torch.arange(out[1], device=x.device) * stride[1] - pad[1] >= width
            empty = empty_h[:, None] | empty_w[None, :]
            top = top.masked_fill(empty, -FLT_MAX)
        if not with_mask:
            return top, None
        padded_w = xp.shape[-1]
        idx = (idx // padded_w - pad[0]) * width + idx % padded_w - pad[1]
        if has_empty:
            idx = idx.masked_fill(empty, -1)
        return top, idx.to(x.dtype)
    xp = F.pad(x, padding)
    if method == STOCHASTIC and train:
        return _stochastic_sample(xp, kernel, stride, out), None
    sums = F.avg_pool2d(xp, kernel, stride, divisor_override=1)
    if method == AVE:
        divisor = (_window_sizes(out[0], height, kernel[0], stride[0], pad[0], x.device)[:, None]
                   * _window_sizes(out[1], width, kernel[1], stride[1], pad[1], x.device)[None, :])
        return sums / divisor.to(x.dtype), None
    # StoPoolForwardTest: the activations weighted by themselves, sum(x^2) / sum(x).
    squares = F.avg_pool2d(xp * xp, kernel, stride, divisor_override=1)
    return squares / (sums + FLT_MIN), None


def _stochastic_sample(xp: torch.Tensor, kernel: Pair, stride: Pair, out: Pair) -> torch.Tensor:
    """StoPoolForwardTrain: pick one activation per window with probability value / window sum.

    A threshold ``u * sum`` with u in (0, 1] selects the first position whose running
    sum reaches it; the gradient flows to that position only (StoPoolBackward), which
    is autograd's gradient of the gather.
    """
    n, c = xp.shape[:2]
    cols = F.unfold(xp, kernel, stride=stride).view(n, c, kernel[0] * kernel[1], -1)
    running = cols.cumsum(dim=2)
    threshold = (1 - torch.rand_like(running[:, :, -1:])) * running[:, :, -1:]
    chosen = (running >= threshold).to(torch.uint8).argmax(dim=2, keepdim=True)
    return cols.gather(2, chosen).view(n, c, *out)


class _PoolingChecks(CaffeLayer):
    """Checks both pooling layers share: a 4-D bottom and Caffe's pad/method rules."""

    def _check_bottom(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise self.error(f"input must have 4 axes (num, channels, height, width), got shape "
                             f"{list(x.shape)}")

    def _check_pad(self, method: int, kernel: Pair, pad: Pair, where: str = "") -> None:
        if pad == (0, 0):
            return
        if method not in (MAX, AVE):
            raise self.error(f"padding is implemented only for MAX and AVE pooling, got pad "
                             f"{list(pad)} with {_METHOD_NAMES.get(method, method)}{where}")
        for axis, k, p in zip("hw", kernel, pad):
            if p >= k:
                raise self.error(f"pad_{axis} must be smaller than kernel_{axis}: expected pad "
                                 f"< {k}, got {p}{where}")

    def _out_size(self, x: torch.Tensor, kernel: Pair, stride: Pair, pad: Pair, ceil: bool,
                  where: str = "") -> Pair:
        clip = pad != (0, 0)
        out = tuple(pooled_size(s, k, st, p, ceil, clip)
                    for s, k, st, p in zip(x.shape[-2:], kernel, stride, pad))
        if min(out) < 1:
            raise self.error(f"kernel {list(kernel)} with pad {list(pad)} does not fit input "
                             f"{list(x.shape[-2:])}: expected a positive output size, got "
                             f"{list(out)}{where}")
        return out


@register("Pooling", "POOLING")
class Pooling(_PoolingChecks):
    """Caffe's Pooling; MAX may have a second top, the argmax ``mask`` (floats, h*W+w).

    STOCHASTIC samples at TRAIN and takes the self-weighted average at TEST (Caffe's
    GPU kernels; its CPU build has none). At TEST Caffe's backward reads stale sample
    indices; here it is the derivative of the test-time formula.
    """

    min_bottoms = max_bottoms = 1
    min_tops = 1
    max_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.pooling_param
        self.method = int(p.pool)
        if len(spec.param.top) == 2 and self.method != MAX:
            raise self.error(f"only MAX pooling has a second (mask) top: expected 1 top for "
                             f"{_METHOD_NAMES.get(self.method, self.method)}, got 2")
        self.global_pooling = bool(p.global_pooling)
        has_kernel = p.HasField("kernel_size") or p.HasField("kernel_h") or p.HasField("kernel_w")
        self.kernel: Pair | None = None  # global pooling: the bottom's H x W at each forward
        if self.global_pooling:
            if has_kernel:
                raise self.error("with global_pooling: true the kernel size cannot be given, "
                                 "got kernel_size or kernel_h/kernel_w")
        else:
            self.kernel = self._pair(p, "kernel_size", "kernel_h", "kernel_w", None)
            if min(self.kernel) <= 0:
                raise self.error(f"kernel size must be positive, got {list(self.kernel)}")
        self.pad = self._pair(p, "pad", "pad_h", "pad_w", 0)
        self.stride = self._pair(p, "stride", "stride_h", "stride_w", 1)
        if min(self.stride) <= 0:
            raise self.error(f"stride must be positive, got {list(self.stride)}")
        if self.global_pooling:
            if self.pad != (0, 0) or self.stride != (1, 1):
                raise self.error(f"global_pooling needs pad 0 and stride 1, got pad "
                                 f"{list(self.pad)} and stride {list(self.stride)}")
        else:
            self._check_pad(self.method, self.kernel, self.pad)
        self.ceil = self._ceil_mode(p)
        self.sample_at_train = self.phase == caffe_pb2.TRAIN
        self._geometry_for: torch.Size | None = None  # the bottom shape _geometry is for
        self._geometry: tuple[Pair, Pair] = ((0, 0), (0, 0))  # (kernel, output size)

    def _pair(self, p: caffe_pb2.PoolingParameter, both: str, h: str, w: str,
              default: int | None) -> Pair:
        """``both`` for the two axes, or the ``h``/``w`` pair (each needs the other)."""
        has_h, has_w = p.HasField(h), p.HasField(w)
        if has_h or has_w:
            if p.HasField(both) or not (has_h and has_w):
                raise self.error(f"give {both} or both {h} and {w}, got "
                                 + ", ".join(f for f in (both, h, w) if p.HasField(f)))
            return int(getattr(p, h)), int(getattr(p, w))
        if default is None and not p.HasField(both):
            raise self.error(f"the kernel size is required: give {both} or both {h} and {w}")
        value = int(getattr(p, both))
        return value, value

    def _ceil_mode(self, p: caffe_pb2.PoolingParameter) -> bool:
        """CEIL unless ``round_mode: FLOOR`` (BVLC) or ``ceil_mode: false`` (forks)."""
        floor_round = p.round_mode == caffe_pb2.PoolingParameter.FLOOR
        if p.HasField("ceil_mode") and p.HasField("round_mode") and p.ceil_mode == floor_round:
            raise self.error(f"round_mode {'FLOOR' if floor_round else 'CEIL'} contradicts "
                             f"ceil_mode {str(p.ceil_mode).lower()}; give one of them")
        return not floor_round and p.ceil_mode

    def forward(self, x: torch.Tensor):
        if x.shape != self._geometry_for:  # checked and sized once per bottom shape
            self._check_bottom(x)
            kernel = self.kernel or tuple(x.shape[-2:])
            self._geometry = kernel, self._out_size(x, kernel, self.stride, self.pad, self.ceil)
            self._geometry_for = x.shape
        kernel, out = self._geometry
        top, mask = pool2d(x, self.method, kernel, self.stride, self.pad, out, ceil=self.ceil,
                           train=self.sample_at_train, with_mask=self.num_tops == 2)
        return top if mask is None else (top, mask)


@register("SPP")
class SPP(_PoolingChecks):
    """Spatial pyramid pooling: level i pools into 2^i bins per axis, flattened and concatenated.

    Per level (SPPLayer::GetPoolingParam): kernel = stride = ceil(H / bins), pad =
    (kernel * bins - H + 1) / 2, then Caffe's Pooling rules (so pad must stay below the
    kernel). With one level the pooled (N, C, 1, 1) blob is the top, unflattened. Caffe
    builds the inner pooling layers without a phase, i.e. as TRAIN, so STOCHASTIC SPP
    samples in both phases; this does the same.
    """

    min_bottoms = max_bottoms = 1
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.spp_param
        self.levels = int(p.pyramid_height)
        if self.levels <= 0:
            raise self.error(f"spp_param.pyramid_height must be positive, got {self.levels}")
        self.method = int(p.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_bottom(x)
        outs = []
        for level in range(self.levels):
            bins = 2 ** level
            kernel = tuple(-(-size // bins) for size in x.shape[-2:])
            pad = tuple((k * bins - size + 1) // 2 for k, size in zip(kernel, x.shape[-2:]))
            where = f" (pyramid level {level}, {bins} bins, input {list(x.shape[-2:])})"
            self._check_pad(self.method, kernel, pad, where)
            out = self._out_size(x, kernel, kernel, pad, True, where)
            outs.append(pool2d(x, self.method, kernel, kernel, pad, out, ceil=True, train=True)[0])
        if self.levels == 1:
            return outs[0]
        return torch.cat([o.flatten(1) for o in outs], dim=1)
