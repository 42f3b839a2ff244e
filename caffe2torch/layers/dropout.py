"""Dropout (dropout_layer.cpp), with the two fork options caffe.proto carries."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..proto import caffe_pb2
from .activation import NeuronLayer
from .base import LayerSpec
from .registry import register


@register("Dropout", "DROPOUT")
class Dropout(NeuronLayer):
    """Zeroes each value with probability ``dropout_ratio`` at TRAIN, scaling the kept
    ones by ``1 / (1 - ratio)`` (inverted dropout); the identity at TEST.

    ``scale_train: false`` (py-faster-rcnn / R-FCN fork) moves the scaling to TEST:
    TRAIN gives ``x * mask`` and TEST ``x * (1 - ratio)``. ``sample_weights_test``
    (Bayesian SegNet) samples a mask at TEST too. The mask comes from torch's
    generator, so it cannot equal Caffe's draw; its distribution does.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.dropout_param
        self.ratio = float(p.dropout_ratio)
        if not 0 <= self.ratio < 1:
            raise self.error(f"dropout_param.dropout_ratio must be in [0, 1), got {self.ratio}")
        self.sample = self.phase == caffe_pb2.TRAIN or p.sample_weights_test
        self.scale_train = p.scale_train

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ratio == 0:
            return x.view_as(x)  # a distinct top, like Caffe's copy, without copying
        y = F.dropout(x, self.ratio, training=True) if self.sample else x.view_as(x)
        # F.dropout scales by 1/(1-ratio); without scale_train Caffe scales TEST instead.
        return y if self.scale_train else y * (1.0 - self.ratio)
