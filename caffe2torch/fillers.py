"""Caffe's weight fillers (include/caffe/filler.hpp), drawn with torch's generator.

A parameter without a filler starts at constant 0, as in Caffe; PyTorch's own default
initialisation is never used, so from-scratch training starts where Caffe's would.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from .errors import NetError
from .proto import caffe_pb2

_FAN_IN, _FAN_OUT, _AVERAGE = 0, 1, 2
_deferring = [False]


@contextmanager
def deferred() -> Iterator[None]:
    """While active, new layer blobs are left unfilled and recorded for a later fill.

    The compiler builds under it so that blobs about to be overwritten by a .caffemodel
    are never drawn (filling VGG-16 alone takes seconds).
    """
    previous = _deferring[0]
    _deferring[0] = True
    try:
        yield
    finally:
        _deferring[0] = previous


def deferring() -> bool:
    """Whether blob filling is currently deferred (see :func:`deferred`)."""
    return _deferring[0]


def _fan(shape: tuple[int, ...], variance_norm: int) -> float:
    count = math.prod(shape)
    fan_in = count / shape[0] if shape and shape[0] else count
    fan_out = count / shape[1] if len(shape) > 1 and shape[1] else count
    if variance_norm == _FAN_OUT:
        return fan_out
    if variance_norm == _AVERAGE:
        return (fan_in + fan_out) / 2.0
    return fan_in


@torch.no_grad()
def fill_(tensor: torch.Tensor, filler: caffe_pb2.FillerParameter | None) -> torch.Tensor:
    """Fill ``tensor`` in place the way Caffe's filler of that type would.

    Values are drawn in the tensor's logical (C) order whatever its memory layout, so a
    channels-last weight gets the same values as a contiguous one.
    """
    if filler is None:
        return tensor.zero_()
    if not tensor.is_contiguous():
        return tensor.copy_(fill_(torch.empty_like(tensor, memory_format=torch.contiguous_format),
                                  filler))
    kind = filler.type
    shape = tuple(tensor.shape)
    if kind == "constant":
        tensor.fill_(filler.value)
    elif kind == "uniform":
        tensor.uniform_(filler.min, filler.max)
    elif kind == "gaussian":
        tensor.normal_(filler.mean, filler.std)
        if filler.sparse >= 0:
            # Keep each weight with probability sparse / num_outputs (filler.hpp GaussianFiller).
            num_outputs = shape[0] if shape else 1
            keep = torch.rand_like(tensor) < filler.sparse / num_outputs
            tensor.mul_(keep)
    elif kind == "positive_unitball":
        tensor.uniform_(0, 1)
        rows = tensor.view(shape[0] if shape else 1, -1)
        rows.div_(rows.sum(dim=1, keepdim=True))
    elif kind == "xavier":
        bound = math.sqrt(3.0 / _fan(shape, filler.variance_norm))
        tensor.uniform_(-bound, bound)
    elif kind == "msra":
        tensor.normal_(0.0, math.sqrt(2.0 / _fan(shape, filler.variance_norm)))
    elif kind == "bilinear":
        if tensor.dim() != 4 or shape[2] != shape[3]:
            raise NetError(f"bilinear filler needs a 4-D blob with square kernels, got shape {list(shape)}")
        width = shape[3]
        f = math.ceil(width / 2.0)
        c = (width - 1) / (2.0 * f)
        axis = 1 - (torch.arange(width, dtype=torch.float64) / f - c).abs()
        kernel = (axis[:, None] * axis[None, :]).to(tensor.dtype)
        tensor.copy_(kernel.expand(shape))
    else:
        raise NetError(f"unknown filler type '{kind}' (expected constant, uniform, gaussian, "
                       "positive_unitball, xavier, msra or bilinear)")
    return tensor
