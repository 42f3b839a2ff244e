"""Python layer: per-cell box targets from ground-truth boxes.

Bottoms: ``bbox`` (N x 4 x H x W predicted distance boxes, for the IoU target and the
shape) and ``label`` (K x 6 from ODDataLayer). Tops: ``gt_iou`` (N x 1 x H x W: the IoU of
the predicted box with the cell's ground truth, 0 outside every box; the objectness target)
and ``gt_bbox`` (N x 4 x H x W: distances from the cell centre to the sides of the smallest
ground-truth box containing it, in strides; 0 outside). ``param_str``: ``{"scale": stride}``.
No gradient flows through targets: give the layer ``propagate_down: false`` for both bottoms.
"""
import json

import numpy as np

import caffe
from od_boxes import cell_centres, distance_iou


class ODTargetLayer(caffe.Layer):
    def setup(self, bottom, top):
        self.stride = float(json.loads(self.param_str or "{}").get("scale", 8))

    def reshape(self, bottom, top):
        n, _, h, w = bottom[0].data.shape
        top[0].reshape(n, 1, h, w)
        top[1].reshape(n, 4, h, w)

    def forward(self, bottom, top):
        pred, labels = bottom[0].data, bottom[1].data
        n, _, h, w = pred.shape
        cx, cy = cell_centres(h, w, self.stride)
        gt = np.zeros((n, 4, h, w), np.float32)
        for b in range(n):
            boxes = labels[labels[:, 0] == b, 1:5]
            areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            for x1, y1, x2, y2 in boxes[np.argsort(-areas)]:  # smaller boxes win
                inside = (cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)
                sides = np.stack([cx - x1, cy - y1, x2 - cx, y2 - cy]) / self.stride
                gt[b][:, inside] = sides[:, inside]
        positive = gt.sum(1, keepdims=True) > 0
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 outside every box
            iou = distance_iou(pred.transpose(1, 0, 2, 3), gt.transpose(1, 0, 2, 3))[2]
        top[0].data[...] = np.where(positive, iou[:, None], 0)
        top[1].data[...] = gt

    def backward(self, top, propagate_down, bottom):
        pass
