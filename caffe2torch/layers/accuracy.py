"""Accuracy: Caffe's top-k classification accuracy (accuracy_layer.cpp), forward only."""
from __future__ import annotations

import math

import torch

from ..forks import current_fork
from .base import CaffeLayer, LayerSpec, Shape
from .loss import class_layout, label_indices
from .registry import register


@register("Accuracy", "ACCURACY")
class Accuracy(CaffeLayer):
    """Fraction of non-ignored predictions whose true class is in the top ``top_k``.

    Ties count against the prediction: it is right only when fewer than ``top_k``
    classes (the true one included) score ``>=`` the true class's score, Caffe's
    ``num_better_predictions`` rule. No valid label gives 0. A second top holds the
    per-class accuracy (0 for classes without samples). Caffe has no backward here,
    so the tops carry no gradient.

    With the SSD fork selected (:mod:`caffe2torch.forks`) the fork's older rule applies:
    ``partial_sort`` of (score, class) pairs, so among equal scores the higher class
    index ranks first, and no valid label gives NaN (0/0).
    """

    min_bottoms = max_bottoms = 2
    min_tops, max_tops = 1, 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.accuracy_param
        self.top_k = int(p.top_k)
        self.axis = p.axis
        self.ignore = p.ignore_label if p.HasField("ignore_label") else None
        self.ssd_fork = current_fork() == "ssd"
        self.infer_shapes(spec.bottom_shapes)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        scores, labels = bottom_shapes[0], bottom_shapes[1]
        if math.prod(labels) and self.top_k > math.prod(scores) // math.prod(labels):
            raise self.error(f"top_k must be less than or equal to the number of classes: "
                             f"top_k {self.top_k}, predictions {list(scores)} with "
                             f"{math.prod(labels)} labels")
        classes = class_layout(self, self.axis, bottom_shapes, "accuracy_param.axis")[2]
        return [(), (classes,)][:self.num_tops]

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, label: torch.Tensor):
        _, outer, classes, inner = class_layout(
            self, self.axis, [tuple(scores.shape), tuple(label.shape)], "accuracy_param.axis")
        s3 = scores.detach().reshape(outer, classes, inner)
        index, valid = label_indices(label, outer, inner, self.ignore)
        truth = s3.gather(1, index.unsqueeze(1))
        count = valid.sum().to(scores.dtype)
        if self.ssd_fork:
            later = torch.arange(classes, device=s3.device).view(1, -1, 1) > index.unsqueeze(1)
            ahead = ((s3 > truth) | ((s3 == truth) & later)).sum(dim=1)
            hits = ((ahead < self.top_k) & valid).to(scores.dtype)
            accuracy = hits.sum() / count
        else:
            at_least = (s3 >= truth).sum(dim=1)        # the true class counts itself
            hits = ((at_least <= self.top_k) & valid).to(scores.dtype)
            accuracy = torch.where(count > 0, hits.sum() / count.clamp_min(1),
                                   torch.zeros_like(count))
        if self.num_tops < 2:
            return accuracy.reshape(())
        flat = index.reshape(-1)
        seen = scores.new_zeros(classes).scatter_add_(0, flat, valid.reshape(-1).to(scores.dtype))
        right = scores.new_zeros(classes).scatter_add_(0, flat, hits.reshape(-1))
        per_class = torch.where(seen > 0, right / seen.clamp_min(1), torch.zeros_like(seen))
        return accuracy.reshape(()), per_class
