"""Channels-last (NHWC) memory for the 2-D convolutions of a net: same values, faster kernels.

oneDNN's CPU convolutions and torch's max pooling run much faster on NHWC tensors than on
NCHW ones (LeNet training step 0.7x, CIFAR10-quick 0.75x the time of a hand-written NCHW
module; see README, Speed). A tensor's memory layout never changes its values or shape, so
Caffe's semantics, blob names, shapes and ``net.blobs[...].data`` are unchanged; only the
strides differ (a blob's numpy array may not be C-contiguous).

On the CPU, every 2-D Convolution/Deconvolution (channel axis 1) stores its weight
channels-last, so torch's convolution computes in NHWC and returns an NHWC top; the layers
after it keep that layout. Measured with ``scripts/bench_net.py`` this is faster on all six
benchmark nets, depthwise MobileNet included; on CUDA (float32 cuDNN) NCHW was faster, so a
net moved there goes back to NCHW. ``CaffeNet.use_channels_last(True/False)`` forces one
layout on any device; ``CAFFE2TORCH_CHANNELS_LAST=0`` in the environment before import
keeps every tensor NCHW.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

ENABLED = os.environ.get("CAFFE2TORCH_CHANNELS_LAST", "1") != "0"


def is_nhwc(x: torch.Tensor) -> bool:
    """Whether ``x`` (4-D) has NHWC strides with the channel stride 1 (as torch's kernels
    need to pick their channels-last path when C is 1)."""
    return x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) as the convolution should see it: a free NHWC view when C is 1.

    torch reads a one-channel contiguous tensor as NCHW and would return an NCHW output;
    the view (no copy) makes the layout explicit. Other NCHW bottoms are left alone: with
    an NHWC weight, torch's convolution converts them itself, and a copy made here would be
    kept alive for the backward.
    """
    if x.shape[1] == 1 and x.is_contiguous() and not is_nhwc(x):
        n, _, h, w = x.shape
        return x.reshape(n, h, w, 1).permute(0, 3, 1, 2)
    return x


def _planar(layer: nn.Module) -> bool:
    """Whether a (De)Convolution layer is 2-D with its channels on axis 1 (NHWC applies)."""
    return layer.geometry.channel_axis == 1 and len(layer.geometry.kernel) == 2


@torch.no_grad()
def set_weight_layout(convolutions: Iterable[nn.Module], nhwc: bool) -> None:
    """Store the 4-D weights of these layers channels-last (``nhwc``) or contiguous.

    Only the parameter's storage moves (``param.data``), so optimizers, sharing and
    ``state_dict`` keep the same objects; a shared weight is converted once.
    """
    for layer in convolutions:
        layer.channels_last = nhwc and _planar(layer)
        fmt = torch.channels_last if layer.channels_last else torch.contiguous_format
        weight = layer.blobs[0]
        if isinstance(weight, nn.Parameter) and weight.dim() == 4 and \
                not weight.is_contiguous(memory_format=fmt):
            weight.data = weight.data.contiguous(memory_format=fmt)
