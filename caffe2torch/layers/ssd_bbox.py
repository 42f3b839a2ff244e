"""The SSD fork's box arithmetic (``src/caffe/util/bbox_util.cpp``) in float32 numpy.

Shared by DetectionOutput, DetectionEvaluate and MultiBoxLoss. Boxes are float32
arrays ``[..., 4]`` of ``[xmin, ymin, xmax, ymax]``. The arithmetic follows the fork's
float operations in the same order, so thresholds (NMS, matching) decide as in Caffe;
the sequential parts (NMS, bipartite matching) keep the fork's visiting order and
tie-breaking.
"""
from __future__ import annotations

import numpy as np

from ..proto import caffe_pb2

CORNER = caffe_pb2.PriorBoxParameter.CORNER
CENTER_SIZE = caffe_pb2.PriorBoxParameter.CENTER_SIZE
CORNER_SIZE = caffe_pb2.PriorBoxParameter.CORNER_SIZE
CODE_NAMES = {CORNER: "CORNER", CENTER_SIZE: "CENTER_SIZE", CORNER_SIZE: "CORNER_SIZE"}
PER_PREDICTION = caffe_pb2.MultiBoxLossParameter.PER_PREDICTION

F32 = np.float32


def box_size(boxes: np.ndarray) -> np.ndarray:
    """``BBoxSize`` (normalized): width * height, 0 for an inverted box."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    with np.errstate(invalid="ignore", over="ignore"):
        return np.where((w < 0) | (h < 0), F32(0), w * h).astype(F32)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``JaccardOverlap`` of every box in ``a`` (n, 4) with every box in ``b`` (m, 4): (n, m)."""
    a, b = a[:, None, :], b[None, :, :]
    with np.errstate(all="ignore"):   # inf/nan boxes compare as Caffe's do
        iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
        ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
        inter = iw * ih
        union = box_size(a) + box_size(b) - inter
        return np.where((iw > 0) & (ih > 0), inter / union, F32(0)).astype(F32)


def _prior_geometry(prior: np.ndarray) -> tuple[np.ndarray, ...]:
    width = prior[..., 2] - prior[..., 0]
    height = prior[..., 3] - prior[..., 1]
    cx = (prior[..., 0] + prior[..., 2]) * F32(0.5)
    cy = (prior[..., 1] + prior[..., 3]) * F32(0.5)
    return width, height, cx, cy


def decode(prior: np.ndarray, var: np.ndarray, loc: np.ndarray, code_type: int,
           variance_in_target: bool) -> np.ndarray:
    """``DecodeBBox`` of predictions ``loc`` (..., P, 4) against priors (P, 4), unclipped."""
    if variance_in_target:
        var = np.ones_like(var)
    if code_type == CORNER:
        return (prior + var * loc).astype(F32)
    pw, ph, pcx, pcy = _prior_geometry(prior)
    if code_type == CORNER_SIZE:
        scale = np.stack([pw, ph, pw, ph], axis=-1)
        return (prior + var * loc * scale).astype(F32)
    cx = var[..., 0] * loc[..., 0] * pw + pcx
    cy = var[..., 1] * loc[..., 1] * ph + pcy
    with np.errstate(over="ignore"):   # huge offsets give inf boxes, as in Caffe
        half_w = np.exp(var[..., 2] * loc[..., 2]) * pw * F32(0.5)
        half_h = np.exp(var[..., 3] * loc[..., 3]) * ph * F32(0.5)
    return np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1).astype(F32)


def encode(prior: np.ndarray, var: np.ndarray, gt: np.ndarray, code_type: int,
           variance_in_target: bool) -> np.ndarray:
    """``EncodeBBox`` of ground truth ``gt`` (M, 4) against its matched priors (M, 4)."""
    if variance_in_target:
        var = np.ones_like(var)
    if code_type == CORNER:
        return ((gt - prior) / var).astype(F32)
    pw, ph, pcx, pcy = _prior_geometry(prior)
    if code_type == CORNER_SIZE:
        scale = np.stack([pw, ph, pw, ph], axis=-1)
        return ((gt - prior) / scale / var).astype(F32)
    gw, gh, gcx, gcy = _prior_geometry(gt)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.stack([(gcx - pcx) / pw / var[..., 0], (gcy - pcy) / ph / var[..., 1],
                         np.log(gw / pw) / var[..., 2], np.log(gh / ph) / var[..., 3]],
                        axis=-1).astype(F32)


def sort_desc(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score, ties in index order (``std::stable_sort``)."""
    return np.argsort(-scores, kind="stable")


def nms_fast(boxes: np.ndarray, scores: np.ndarray, score_threshold: float,
             nms_threshold: float, eta: float, top_k: int) -> list[int]:
    """``ApplyNMSFast``: greedy NMS over the boxes scoring above the threshold.

    Candidates are taken by descending score (stable), cut to ``top_k`` (-1: all);
    a candidate is kept when its overlap with every kept box is ``<=`` the adaptive
    threshold, which shrinks by ``eta`` after each kept box while above 0.5.
    """
    order = np.nonzero(scores > F32(score_threshold))[0]
    order = order[sort_desc(scores[order])]
    if -1 < top_k < len(order):
        order = order[:top_k]
    kept: list[int] = []
    threshold = F32(nms_threshold)
    for idx in order:
        if kept and not (jaccard(boxes[idx:idx + 1], boxes[kept])[0] <= threshold).all():
            continue
        kept.append(int(idx))
        if eta < 1 and threshold > 0.5:
            threshold = F32(threshold * F32(eta))
    return kept


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, top_k: int) -> list[int]:
    """``ApplyNMS`` (used by hard example mining): boxes smaller than 1e-5 are dropped and
    the search stops once ``top_k`` (> -1) boxes are kept."""
    order = list(sort_desc(scores))
    if -1 < top_k < len(order):
        order = order[:top_k]
    small = box_size(boxes) < 1e-5
    kept: list[int] = []
    while order:
        best = order.pop(0)
        if small[best]:
            continue
        kept.append(int(best))
        if -1 < top_k <= len(kept):
            break
        rest = np.array([i for i in order if not small[i]], dtype=np.int64)
        if len(rest) == 0:
            break
        overlap = jaccard(boxes[best:best + 1], boxes[rest])[0]
        order = [int(i) for i in rest[overlap <= F32(threshold)]]
    return kept


def match(gt: np.ndarray, preds: np.ndarray, match_type: int, overlap_threshold: float,
          ignore_cross_boundary: bool) -> tuple[np.ndarray, np.ndarray]:
    """``MatchBBox``: (match index per prediction, its best overlap).

    Index -1 is unmatched, -2 ignored (a cross-boundary prediction). Bipartite matching
    repeatedly takes the largest remaining overlap (first prediction, then first ground
    truth, on ties); PER_PREDICTION then gives each unmatched prediction its best ground
    truth with overlap ``>= overlap_threshold``. Overlaps ``<= 1e-6`` count as none.
    """
    num_pred = len(preds)
    indices = np.full(num_pred, -1, dtype=np.int64)
    overlaps = np.zeros(num_pred, dtype=F32)
    if len(gt) == 0:
        return indices, overlaps
    ious = jaccard(preds, gt)
    if ignore_cross_boundary:
        crossing = ((preds < 0) | (preds > 1)).any(axis=1)
        indices[crossing] = -2
        ious[crossing] = 0
    present = ious > F32(1e-6)
    overlaps = np.where(present, ious, F32(0)).max(axis=1).astype(F32)
    table = np.where(present, ious, -np.inf)
    free_gt = np.ones(len(gt), dtype=bool)
    for _ in range(len(gt)):
        candidates = np.where((indices == -1)[:, None] & free_gt[None, :], table, -np.inf)
        flat = int(np.argmax(candidates))
        i, j = divmod(flat, len(gt))
        if candidates[i, j] == -np.inf:
            break
        indices[i], overlaps[i] = j, table[i, j]
        free_gt[j] = False
    if match_type == PER_PREDICTION:
        good = np.where(table >= F32(overlap_threshold), table, -np.inf)
        best = np.argmax(good, axis=1)
        best_overlap = good[np.arange(num_pred), best]
        extra = (indices == -1) & (best_overlap > -np.inf)
        indices[extra] = best[extra]
        overlaps[extra] = best_overlap[extra]
    return indices, overlaps


def read_ground_truth(gt: np.ndarray, background_label_id: int, use_difficult: bool,
                      stop_at_invalid: bool) -> dict[int, list[tuple[int, np.ndarray, bool]]]:
    """``GetGroundTruth``: rows ``[item, label, instance, xmin, ymin, xmax, ymax, difficult]``
    as ``{item: [(label, box, difficult), ...]}``.

    Item -1 marks padding: the vector form skips it, the per-label form
    (``stop_at_invalid``) stops reading there. A background label raises ValueError.
    """
    out: dict[int, list[tuple[int, np.ndarray, bool]]] = {}
    for row in gt.reshape(-1, 8):
        item = int(row[0])
        if item == -1:
            if stop_at_invalid:
                break
            continue
        label = int(row[1])
        if label == background_label_id:
            raise ValueError(f"found background label {label} in the ground truth")
        difficult = bool(row[7])
        if difficult and not use_difficult:
            continue
        out.setdefault(item, []).append((label, row[3:7].astype(F32), difficult))
    return out
