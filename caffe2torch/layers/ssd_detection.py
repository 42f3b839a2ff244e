"""The SSD fork's detection tail: DetectionOutput and DetectionEvaluate (forward only).

Sources: weiliu89/caffe ``detection_output_layer.cpp``, ``detection_evaluate_layer.cpp``
and ``bbox_util.cpp``. Both tops have data-dependent row counts, so ``infer_shapes``
reports Caffe's own Reshape-time shapes and the real shape comes with the data.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .base import CaffeLayer, LayerSpec, Shape
from .registry import register
from .ssd import legacy_dim
from .ssd_bbox import (CENTER_SIZE, CODE_NAMES, CORNER_SIZE, F32, decode, jaccard,
                       nms_fast, read_ground_truth, sort_desc)


def prior_count(layer: CaffeLayer, shape: Shape) -> int:
    """Priors in a PriorBox-style (1, 2, P*4) bottom: its height / 4, as Caffe takes it.

    Caffe then reads P*4 boxes and P*4 variances; a blob too small for that (OpenCV's
    proposal-as-prior nets) is an error here instead of a read past the end.
    """
    num_priors = legacy_dim(layer, shape, 2, layer.caffe_type) // 4
    if math.prod(shape) < num_priors * 8:
        raise layer.error(f"the prior bottom {list(shape)} must hold boxes and variances, "
                          f"(1, 2, P*4) as PriorBox makes it: expected at least "
                          f"{num_priors * 8} values for {num_priors} priors")
    return num_priors


def split_priors(prior: np.ndarray, num_priors: int) -> tuple[np.ndarray, np.ndarray]:
    """``GetPriorBBoxes``: boxes and variances (each (P, 4)) from PriorBox's (1, 2, P*4) top."""
    flat = prior.reshape(-1)
    return (flat[:num_priors * 4].reshape(num_priors, 4),
            flat[num_priors * 4:num_priors * 8].reshape(num_priors, 4))


def code_type_of(layer: CaffeLayer, code_type: int) -> int:
    """A known ``code_type`` (an unknown one is Caffe's LOG(FATAL) at the first box)."""
    if code_type not in CODE_NAMES:
        raise layer.error(f"unknown code_type {code_type}: expected CORNER, CENTER_SIZE or "
                          f"CORNER_SIZE")
    return int(code_type)


def check_priors(layer: CaffeLayer, prior: np.ndarray, code_type: int) -> None:
    """DecodeBBox/EncodeBBox CHECK a positive prior width and height for the SIZE codes."""
    if code_type in (CENTER_SIZE, CORNER_SIZE):
        bad = (prior[:, 2] - prior[:, 0] <= 0) | (prior[:, 3] - prior[:, 1] <= 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise layer.error(f"prior {i} {prior[i].tolist()} has no positive width and "
                              f"height, which code_type {CODE_NAMES[code_type]} needs")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


@register("DetectionOutput")
class DetectionOutput(CaffeLayer):
    """Decoded, per-class NMS'd detections: top (1, 1, K, 7) rows
    ``[image, label, score, xmin, ymin, xmax, ymax]`` (normalised, unclipped).

    Bottoms: loc (N, P*4*loc_classes), conf (N, P*num_classes) probabilities, prior
    (1, 2, P*4) from PriorBox. Per image and class (background skipped) the boxes
    scoring above ``confidence_threshold`` go through ``ApplyNMSFast``
    (``nms_param``: threshold, ``top_k``, adaptive ``eta``); ``keep_top_k`` then keeps the
    best over all classes. Rows are grouped by image, then ascending label, then NMS
    order. No detection at all gives one row ``[i, -1, -1, -1, -1, -1, -1]`` per image.
    As in the recorded fork, without ``nms_param`` there is neither NMS nor a confidence
    threshold (every box is a candidate). ``save_output_param`` (result files) and
    ``visualize`` (a window) are ignored with a warning.
    """

    min_bottoms = max_bottoms = 3
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error("detection_output_param must specify num_classes")
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        if self.share_location and self.background == -1:
            raise self.error("background_label_id -1 with share_location: the fork skips "
                             "decoding the shared boxes (label -1 is taken for background) "
                             "and aborts; use share_location: false or a background class")
        self.code_type = code_type_of(self, p.code_type)
        self.variance_in_target = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        self.use_nms = p.HasField("nms_param")
        self.confidence = float(p.confidence_threshold) if p.HasField("confidence_threshold") \
            else -float(np.finfo(np.float32).max)
        nms = p.nms_param
        if nms.nms_threshold < 0:
            raise self.error(f"nms_param.nms_threshold must be non negative, got "
                             f"{nms.nms_threshold:g}")
        if not 0 < nms.eta <= 1:
            raise self.error(f"nms_param.eta must be in (0, 1], got {nms.eta:g}")
        self.nms_threshold, self.eta = float(nms.nms_threshold), float(nms.eta)
        self.top_k = int(nms.top_k) if nms.HasField("top_k") else -1
        if p.save_output_param.output_directory or p.visualize:
            warnings.warn(str(self.error("save_output_param and visualize are ignored: the "
                                         "detections are only returned as the top blob")),
                          stacklevel=2)
        self.infer_shapes(spec.bottom_shapes)

    def _num_priors(self, shapes: list[Shape]) -> int:
        loc, conf, prior = shapes
        num_priors = prior_count(self, prior)
        if legacy_dim(self, loc, 0, "DetectionOutput") != \
                legacy_dim(self, conf, 0, "DetectionOutput"):
            raise self.error(f"loc and conf must have the same number of images, got shapes "
                             f"{list(loc)} and {list(conf)}")
        if num_priors * self.loc_classes * 4 != legacy_dim(self, loc, 1, "DetectionOutput"):
            raise self.error(f"number of priors must match number of location predictions: "
                             f"{num_priors} priors x {self.loc_classes} loc classes x 4, got "
                             f"loc shape {list(loc)}")
        if num_priors * self.num_classes != legacy_dim(self, conf, 1, "DetectionOutput"):
            raise self.error(f"number of priors must match number of confidence predictions: "
                             f"{num_priors} priors x {self.num_classes} classes, got conf shape "
                             f"{list(conf)}")
        return num_priors

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        self._num_priors(bottom_shapes)
        return [(1, 1, 1, 7)]

    def _candidates(self, boxes: np.ndarray, scores: np.ndarray) -> list[int]:
        if not self.use_nms:
            return [int(i) for i in sort_desc(scores)]
        return nms_fast(boxes, scores, self.confidence, self.nms_threshold, self.eta, self.top_k)

    @torch.no_grad()
    def forward(self, loc: torch.Tensor, conf: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        num_priors = self._num_priors([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
        num = loc.shape[0]
        boxes, variances = split_priors(_numpy(prior), num_priors)
        check_priors(self, boxes, self.code_type)
        loc_np = _numpy(loc).reshape(num, num_priors, self.loc_classes, 4).transpose(0, 2, 1, 3)
        decoded = decode(boxes, variances, loc_np, self.code_type, self.variance_in_target)
        scores = _numpy(conf).reshape(num, num_priors, self.num_classes)
        rows: list[list[float]] = []
        for i in range(num):
            kept: list[tuple[int, int]] = []   # (label, prior), grouped by label
            for c in range(self.num_classes):
                if c == self.background:
                    continue
                loc_c = 0 if self.share_location else c
                kept += [(c, j) for j in self._candidates(decoded[i, loc_c], scores[i, :, c])]
            if -1 < self.keep_top_k < len(kept):
                best = sort_desc(np.array([scores[i, j, c] for c, j in kept], dtype=F32))
                chosen = sorted(best[:self.keep_top_k],
                                key=lambda k: kept[k][0])   # stable: score order per label
                kept = [kept[k] for k in chosen]
            for c, j in kept:
                box = decoded[i, 0 if self.share_location else c, j]
                rows.append([i, c, scores[i, j, c], *box])
        if not rows:
            rows = [[i, -1, -1, -1, -1, -1, -1] for i in range(num)]
        out = torch.tensor(np.array(rows, dtype=F32)).view(1, 1, -1, 7)
        return out.to(loc.device)


@register("DetectionEvaluate")
class DetectionEvaluate(CaffeLayer):
    """True/false positives of detections against ground truth, for mAP in the solver.

    Bottoms: detections (1, 1, D, 7) as DetectionOutput writes them, ground truth
    (1, 1, G, 8). Top (1, 1, classes + valid detections, 5): first one row per
    non-background class ``[-1, label, num_gt, -1, -1]`` (difficult ground truth counts
    only with ``evaluate_difficult_gt``), then per image, label and descending score
    ``[image, label, score, tp, fp]``; a detection matching difficult ground truth that
    is not evaluated stays ``tp = fp = 0``. With ``name_size_file`` boxes are scaled to
    each image's pixel size (one image per detection-bearing image, cycling through the
    file) and overlaps use Caffe's pixel (+1) convention; ``resize_param`` is not
    supported.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error("detection_evaluate_param must provide num_classes")
        self.num_classes = int(p.num_classes)
        self.background = int(p.background_label_id)
        self.overlap_threshold = float(p.overlap_threshold)
        if self.overlap_threshold <= 0:
            raise self.error(f"overlap_threshold must be positive, got {self.overlap_threshold:g}")
        self.evaluate_difficult = bool(p.evaluate_difficult_gt)
        if p.HasField("resize_param"):
            raise self.error("detection_evaluate_param.resize_param is not supported")
        self.sizes: list[tuple[int, int]] = []
        if p.name_size_file:
            self.sizes = self._read_sizes(self.resolve_path(p.name_size_file, "name_size_file"))
        self.count = 0   # which line of the name size file the next image uses
        self.infer_shapes(spec.bottom_shapes)

    @staticmethod
    def _read_sizes(path: Path) -> list[tuple[int, int]]:
        words = path.read_text().split()
        return [(int(words[k + 1]), int(words[k + 2])) for k in range(0, len(words) - 2, 3)]

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        for shape, width, what in ((bottom_shapes[0], 7, "detections"),
                                   (bottom_shapes[1], 8, "ground truth")):
            dims = [legacy_dim(self, shape, a, "DetectionEvaluate") for a in range(4)]
            if dims[0] != 1 or dims[1] != 1 or dims[3] != width:
                raise self.error(f"{what} must have shape (1, 1, rows, {width}), got "
                                 f"{list(shape)}")
        rows = legacy_dim(self, bottom_shapes[0], 2, "DetectionEvaluate")
        return [(1, 1, self._positive_classes() + rows, 5)]

    def _positive_classes(self) -> int:
        return self.num_classes if self.background == -1 else self.num_classes - 1

    def _to_pixels(self, box: np.ndarray) -> np.ndarray:
        """``OutputBBox`` without resize: clip to [0, 1], scale to the image's size."""
        height, width = self.sizes[self.count]
        return (np.clip(box, 0, 1) * np.array([width, height, width, height], F32)).astype(F32)

    def _overlaps(self, det: np.ndarray, gts: np.ndarray) -> np.ndarray:
        if not self.sizes:
            return jaccard(det[None], gts)[0]
        # JaccardOverlap(normalized=false): +1 on the intersection, (w + 1)(h + 1) areas
        # only when the scaled box is not within [0, 1]
        iw = np.minimum(det[2], gts[:, 2]) - np.maximum(det[0], gts[:, 0]) + 1
        ih = np.minimum(det[3], gts[:, 3]) - np.maximum(det[1], gts[:, 1]) + 1
        height, width = self.sizes[self.count]
        plus = F32(0 if width <= 1 and height <= 1 else 1)

        def area(b: np.ndarray) -> np.ndarray:
            w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
            return np.where((w < 0) | (h < 0), F32(0), (w + plus) * (h + plus))

        inter = iw * ih
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where((iw > 0) & (ih > 0), inter / (area(det) + area(gts) - inter), F32(0))

    @torch.no_grad()
    def forward(self, det: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        self.infer_shapes([tuple(det.shape), tuple(gt.shape)])
        det_np, gt_np = _numpy(det).reshape(-1, 7), _numpy(gt)
        try:
            truth = read_ground_truth(gt_np, self.background, True, stop_at_invalid=True)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        detections: dict[int, dict[int, list[np.ndarray]]] = {}
        for row in det_np:
            item = int(row[0])
            if item == -1:
                continue
            label = int(row[1])
            if label == self.background:
                raise self.error(f"found background label {label} in the detection results")
            detections.setdefault(item, {}).setdefault(label, []).append(row)
        rows = []
        for c in range(self.num_classes):
            if c != self.background:
                num_gt = sum(1 for boxes in truth.values() for label, _, hard in boxes
                             if label == c and (self.evaluate_difficult or not hard))
                rows.append([-1, c, num_gt, -1, -1])
        for item in sorted(detections):
            for label, found in sorted(detections[item].items()):
                if label != -1:
                    rows += self._judge(item, label, found, truth.get(item, []))
            if self.sizes:
                self.count = (self.count + 1) % len(self.sizes)
        # Caffe sizes the top by the rows whose label is not -1 and zero-fills it.
        out = np.zeros((self._positive_classes() + int((det_np[:, 1] != -1).sum()), 5), F32)
        out[:len(rows)] = np.array(rows, dtype=F32).reshape(-1, 5)
        return torch.from_numpy(out).view(1, 1, -1, 5).to(det.device)

    def _judge(self, item: int, label: int, found: list[np.ndarray],
               truth: list[tuple[int, np.ndarray, bool]]) -> list[list[float]]:
        """Rows ``[item, label, score, tp, fp]`` for one image's detections of one label."""
        gts = [(box, hard) for c, box, hard in truth if c == label]
        found = [found[k] for k in sort_desc(np.array([r[2] for r in found], dtype=F32))]
        if not gts:
            return [[item, label, r[2], 0, 1] for r in found]
        gt_boxes = np.stack([b for b, _ in gts])
        if self.sizes:
            gt_boxes = self._to_pixels(gt_boxes)
        visited = [False] * len(gts)
        rows = []
        for r in found:
            box = self._to_pixels(r[3:7]) if self.sizes else r[3:7]
            overlaps = self._overlaps(box, gt_boxes)
            j = int(np.argmax(overlaps))
            tp = fp = 0
            if overlaps[j] >= F32(self.overlap_threshold):
                if self.evaluate_difficult or not gts[j][1]:
                    tp, fp = (0, 1) if visited[j] else (1, 0)
                    visited[j] = True
            else:
                fp = 1
            rows.append([item, label, r[2], tp, fp])
        return rows
