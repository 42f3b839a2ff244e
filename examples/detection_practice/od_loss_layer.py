"""Python loss layer: UnitBox's IoU loss for boxes and a cross-entropy for objectness.

Bottoms: ``bbox`` and ``gt_bbox`` (N x 4 x H x W distance boxes), ``obj_score``
(N x 1 x H x W logits) and ``gt_iou`` (its soft target). Tops: ``loss_bbox``, the mean of
``-ln(IoU)`` over cells inside a ground-truth box, and ``loss_obj_score``, the mean sigmoid
cross-entropy over all cells. Gradients follow the UnitBox paper (Yu et al. 2016):
dL/dx = (1/U) dX/dx - (U + I)/(U I) dI/dx, with a small ``eps`` in I and U.
Python layers have no default loss weight: give ``loss_weight: 1`` for each top.
"""
import numpy as np

import caffe
from od_boxes import distance_iou

EPS = 1e-4


class ODLossLayer(caffe.Layer):
    def reshape(self, bottom, top):
        top[0].reshape(1)
        top[1].reshape(1)

    def forward(self, bottom, top):
        pred = bottom[0].data.transpose(1, 0, 2, 3)
        gt = bottom[1].data.transpose(1, 0, 2, 3)
        self.positive = gt.sum(0) > 0
        self.count = max(int(self.positive.sum()), 1)
        inter, union, iou, self.inter_w, self.inter_h = distance_iou(pred, gt, EPS)
        self.inter, self.union = inter + EPS, union + EPS
        top[0].data[...] = -np.log(iou[self.positive]).sum() / self.count
        score, target = bottom[2].data, bottom[3].data
        self.prob = 0.5 * (1.0 + np.tanh(0.5 * score))  # sigmoid without overflow
        loss = np.maximum(score, 0) - score * target + np.log1p(np.exp(-np.abs(score)))
        top[1].data[...] = loss.mean()

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            pl, pt, pr, pb = bottom[0].data.transpose(1, 0, 2, 3)
            gl, gt_, gr, gb = bottom[1].data.transpose(1, 0, 2, 3)
            d_area = [pt + pb, pl + pr, pt + pb, pl + pr]            # dX/d(l, t, r, b)
            d_inter = [self.inter_h * (pl < gl), self.inter_w * (pt < gt_),
                       self.inter_h * (pr < gr), self.inter_w * (pb < gb)]  # dI/d(l, t, r, b)
            coeff = (self.union + self.inter) / (self.union * self.inter)
            grad = np.stack([da / self.union - coeff * di for da, di in zip(d_area, d_inter)])
            grad = np.where(self.positive, grad, 0) / self.count * top[0].diff[0]
            bottom[0].diff[...] = grad.transpose(1, 0, 2, 3)
        if propagate_down[2]:
            target = bottom[3].data
            bottom[2].diff[...] = (self.prob - target) / target.size * top[1].diff[0]
