"""Box arithmetic shared by the practice's layers and its detector.

A box at a feature-map cell is its distances ``(left, top, right, bottom)`` from the cell's
centre, in units of the feature stride, as UnitBox predicts them.
"""
import numpy as np


def cell_centres(height, width, stride):
    """Image coordinates (x, y) of the centres of an H x W feature map's cells."""
    xs = (np.arange(width, dtype=np.float32) + 0.5) * stride
    ys = (np.arange(height, dtype=np.float32) + 0.5) * stride
    return np.meshgrid(xs, ys)


def distance_iou(pred, gt, eps=0.0):
    """UnitBox's intersection, union and IoU of distance boxes (4 x ... arrays)."""
    pl, pt, pr, pb = pred
    gl, gt_, gr, gb = gt
    inter_w = np.minimum(pl, gl) + np.minimum(pr, gr)
    inter_h = np.minimum(pt, gt_) + np.minimum(pb, gb)
    inter = inter_w * inter_h
    union = (pl + pr) * (pt + pb) + (gl + gr) * (gt_ + gb) - inter
    return inter, union, (inter + eps) / (union + eps), inter_w, inter_h


def box_iou(box, boxes):
    """IoU of one corner box (x1, y1, x2, y2) with each row of ``boxes``."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (_area(box) + _area(boxes) - inter)


def _area(boxes):
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def nms(dets, threshold):
    """Greedy non-maximum suppression of (x1, y1, x2, y2, score) rows; kept row indices."""
    order = np.argsort(-dets[:, 4], kind="stable")
    keep = []
    while order.size:
        best, order = order[0], order[1:]
        keep.append(int(best))
        order = order[box_iou(dets[best], dets[order]) <= threshold]
    return keep


def decode(bbox, score, stride, threshold):
    """Detections (x1, y1, x2, y2, score) from one image's bbox (4 x H x W) and objectness
    logits (1 x H x W) at cells scoring above ``threshold`` (a probability)."""
    prob = 0.5 * (1.0 + np.tanh(0.5 * score[0]))  # sigmoid
    cx, cy = cell_centres(prob.shape[0], prob.shape[1], stride)
    keep = prob > threshold
    left, top, right, bottom = (bbox[i][keep] * stride for i in range(4))
    return np.stack([cx[keep] - left, cy[keep] - top, cx[keep] + right, cy[keep] + bottom,
                     prob[keep]], axis=1).reshape(-1, 5)
