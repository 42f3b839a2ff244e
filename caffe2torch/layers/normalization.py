"""BatchNorm, LRN and MVN with Caffe's statistics, shapes and gradients."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .activation import NeuronLayer
from .base import LayerSpec
from .registry import register


def _divided(mean_sum: torch.Tensor, var_sum: torch.Tensor,
             factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums over the factor, or zeros where it is 0, without a host read."""
    scale = torch.where(factor == 0, 0.0, factor.reciprocal())
    return mean_sum * scale, var_sum * scale


@register("BatchNorm")
class BatchNorm(NeuronLayer):
    """Caffe's BatchNorm (batch_norm_layer.cpp): normalisation only, no affine.

    Blobs are ``[mean_sum (C), var_sum (C), scale_factor (1)]``, never learned (their
    ``lr_mult`` is forced to 0). With batch statistics (the default at TRAIN) the
    top uses the biased batch variance and the blobs become
    ``factor = maf * factor + 1``, ``mean_sum = maf * mean_sum + mean`` and
    ``var_sum = maf * var_sum + m/(m-1) * var`` (m = values per channel), in any
    phase. With global statistics the stored sums are divided by the factor (a zero
    factor means zero statistics). Both gradients equal the exact derivative, so the
    native batch_norm kernels give Caffe's numbers.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.batch_norm_param
        shape = spec.bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(f"expected a bottom with at least 2 axes (N, C, ...), "
                             f"got shape {list(shape)}")
        self.use_global_stats = (p.use_global_stats if p.HasField("use_global_stats")
                                 else self.phase == caffe_pb2.TEST)
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        for blob_shape in ((shape[1],), (shape[1],), (1,)):
            self.add_blob(blob_shape, None, learnable=False)
        self._freeze_statistics()
        self._stats_key: tuple | None = None  # the blobs' versions behind _stats (GPU only)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _freeze_statistics(self) -> None:
        """BatchNormLayer::LayerSetUp: add ``lr_mult: 0`` specs, refuse learned statistics."""
        specs = self.param.param
        for i in range(len(self.blobs)):
            if len(specs) == i:
                specs.add().lr_mult = 0.0
            elif specs[i].lr_mult != 0:
                raise self.error(f"param {i} holds batch statistics and cannot be learned: "
                                 f"expected lr_mult 0, got {specs[i].lr_mult:g}")

    def global_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance used with global statistics: the stored sums divided by
        the factor (zeros when it is 0)."""
        blobs = self.blobs
        mean_sum, var_sum, factor = blobs[0], blobs[1], blobs[2]
        traced = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if factor.is_cpu and not traced:
            # A host read of the factor instead of a tensor compare and select (fewer ops).
            scale = torch.zeros_like(factor) if factor.item() == 0 else factor.reciprocal()
            return mean_sum * scale, var_sum * scale
        if traced:
            return _divided(mean_sum, var_sum, factor)
        # On a GPU each op is a kernel launch, which dominates small batches: keep the
        # result until a blob changes (every write to a device tensor bumps its version;
        # on the CPU, numpy views of the blobs can write without one).
        key = tuple((t.data_ptr(), t._version) for t in (mean_sum, var_sum, factor))
        if self._stats_key != key:
            with torch.no_grad():
                self._stats = _divided(mean_sum, var_sum, factor)
            self._stats_key = key
        return self._stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_global_stats:
            mean, var = self.global_stats()
            return F.batch_norm(x, mean, var, None, None, False, 0.0, self.eps)
        mean_sum, var_sum, factor = self.blobs
        channels = x.shape[1]
        if x.numel() == channels:
            # One value per channel: Caffe's x - mean is exactly 0 (and so is its
            # gradient; the kernel's x * invstd - mean * invstd is not) and m/(m-1) is 1.
            y = x - x
            mean, var = x.detach().reshape(channels), x.new_zeros(channels)
        else:
            mean, var = x.new_zeros(channels), x.new_ones(channels)
            # momentum 1 makes the kernel write the batch mean and unbiased variance.
            y = torch.batch_norm(x, None, None, mean, var, True, 1.0, self.eps,
                                 torch.backends.cudnn.enabled)
        maf = self.moving_average_fraction
        with torch.no_grad():
            factor.mul_(maf).add_(1.0)
            mean_sum.mul_(maf).add_(mean)
            var_sum.mul_(maf).add_(var)
        return y


def _channel_window_mean(x: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over ``size`` neighbouring channels (zero padded at the ends): an AVE pool
    along C of an (N, 1, C, H*W) view, which is faster than avg_pool3d over (N, 1, C, H, W)."""
    n, c = x.shape[:2]
    window = F.avg_pool2d(x.reshape(n, 1, c, -1), (size, 1), stride=1,
                          padding=((size - 1) // 2, 0), count_include_pad=True)
    return window.view(x.shape)


class _CrossChannelLRN(torch.autograd.Function):
    """ACROSS_CHANNELS LRN with LRNLayer::CrossChannelBackward_cpu's formula
    ``g * scale^-beta - 2 * alpha * beta / n * x * sum(g * y / scale)``, which needs no
    second ``pow`` (autograd's pow backward does) and saves a third of the time."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float,
                k: float) -> torch.Tensor:
        scale = _channel_window_mean(x * x, size).mul_(alpha).add_(k)
        scale_pow = scale.pow(-beta)
        y = x * scale_pow
        ctx.size, ctx.coeff = size, -2.0 * alpha * beta
        ctx.save_for_backward(x, y, scale, scale_pow)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, scale, scale_pow = ctx.saved_tensors
        # The window mean is the window sum / n, so the coefficient loses its 1/n.
        ratio = _channel_window_mean((grad * y).div_(scale), ctx.size)
        return (grad * scale_pow).addcmul_(x, ratio, value=ctx.coeff), None, None, None, None


@register("LRN", "LRN")
class LRN(NeuronLayer):
    """Local response normalisation (lrn_layer.cpp) over 4-D bottoms.

    ACROSS_CHANNELS: ``x * (k + alpha/n * sum of x^2 over n channels)^-beta`` with zero
    padding at the ends. WITHIN_CHANNEL is built by Caffe from Power, AVE Pooling
    (kernel n, pad (n-1)/2, divisor n^2 counting the padding) and Power with shift 1:
    ``x * (1 + alpha * mean of x^2 over the n x n window)^-beta``; ``k`` is not used.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.lrn_param
        self.size = int(p.local_size)
        if self.size % 2 != 1:
            raise self.error(f"lrn_param.local_size must be odd, got {self.size}")
        shape = spec.bottom_shapes[0]
        if len(shape) != 4:
            raise self.error(f"expected a 4-D bottom (num, channels, height, width), "
                             f"got shape {list(shape)}")
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.within = p.norm_region == caffe_pb2.LRNParameter.WITHIN_CHANNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.within:
            return _CrossChannelLRN.apply(x, self.size, self.alpha, self.beta, self.k)
        window = F.avg_pool2d(x * x, self.size, stride=1, padding=(self.size - 1) // 2,
                              ceil_mode=True, count_include_pad=True)
        return x * (window * self.alpha + 1.0).pow(-self.beta)


class _MeanVarianceNorm(torch.autograd.Function):
    """``(x - mean) / (std + eps)`` per row, with MVNLayer::Backward_cpu's gradient
    ``(g - mean(g) - y * mean(g * y)) / (std + eps)``. That is the exact derivative
    only when eps is 0: Caffe treats the eps on the std as if it were on the variance.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        centered = x - x.mean(dim=1, keepdim=True)
        denom = centered.square().mean(dim=1, keepdim=True).sqrt_().add_(eps)
        y = centered / denom
        ctx.save_for_backward(y, denom)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, denom = ctx.saved_tensors
        dx = grad - grad.mean(dim=1, keepdim=True) - y * (grad * y).mean(dim=1, keepdim=True)
        return dx / denom, None


@register("MVN", "MVN")
class MVN(NeuronLayer):
    """Mean (and variance) normalisation per (n, c), or per n with ``across_channels``
    (mvn_layer.cpp). ``eps`` is added to the standard deviation, not the variance.

    Caffe shapes the top with the legacy 4-D accessors, so a bottom of fewer axes
    gives a 4-D top padded with 1s, and more than 4 axes is refused.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.mvn_param
        shape = spec.bottom_shapes[0]
        if len(shape) > 4:
            raise self.error(f"expected a bottom of at most 4 axes (Caffe's MVN uses the legacy "
                             f"num/channels/height/width shape), got shape {list(shape)}")
        self.normalize_variance = p.normalize_variance
        self.across_channels = p.across_channels
        self.eps = float(p.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        legacy = tuple(x.shape) + (1,) * (4 - x.dim())
        rows = legacy[0] if self.across_channels else legacy[0] * legacy[1]
        flat = x.reshape(rows, -1)
        if self.normalize_variance:
            y = _MeanVarianceNorm.apply(flat, self.eps)
        else:
            y = flat - flat.mean(dim=1, keepdim=True)
        return y.view(legacy)
