"""Detection losses of the SSD / Faster R-CNN forks: SmoothL1Loss and MultiBoxLoss.

Sources: weiliu89/caffe ``smooth_L1_loss_layer.cpp`` and ``multibox_loss_layer.cpp``,
``bbox_util.cpp`` (FindMatches, MineHardExamples, EncodeLocPrediction,
EncodeConfPrediction); rbgirshick/caffe-fast-rcnn ``smooth_L1_loss_layer.cu``. Both use
the loss bridge of :mod:`.loss`, so backward is the fork's hand-written gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..proto import caffe_pb2
from .base import LayerSpec, Shape
from .loss import FLT_MIN, LossValue, _LossLayer, _legacy_dim, _normalization, _normalizer, \
    _scalar
from .registry import register
from .ssd_bbox import F32, decode, encode, match, nms, read_ground_truth, sort_desc
from .ssd_detection import check_priors, code_type_of, prior_count, split_priors

_MB = caffe_pb2.MultiBoxLossParameter


def smooth_l1(d: torch.Tensor, sigma2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth L1 of ``d`` and its derivative: quadratic ``0.5 sigma^2 d^2`` inside
    ``|d| < 1 / sigma^2``, linear ``|d| - 0.5 / sigma^2`` outside (sigma 1: SSD's form)."""
    inside = d.abs() < 1.0 / sigma2
    value = torch.where(inside, 0.5 * sigma2 * d * d, d.abs() - 0.5 / sigma2)
    return value, torch.where(inside, sigma2 * d, torch.sign(d))


@register("SmoothL1Loss")
class SmoothL1Loss(_LossLayer):
    """``sum(smooth_l1(b0 - b1)) / num`` with the forks' optional weight bottoms.

    2 bottoms: both forks agree. 3 bottoms (SSD): ``d = w * (b0 - b1)``, and the
    gradient is ``smooth_l1'(d)`` without the chain factor ``w``, as SSD computes it.
    4 bottoms (py-faster-rcnn): inside weights scale ``d``, outside weights scale each
    term, and both scale the gradient. ``smooth_l1_loss_param.sigma`` (py-faster-rcnn)
    moves the switch point to ``1 / sigma^2``. Only b0 and b1 get gradients (+ and -).
    """

    max_bottoms = 4

    def configure(self, spec: LayerSpec) -> None:
        sigma = float(spec.param.smooth_l1_loss_param.sigma)
        if sigma <= 0:
            raise self.error(f"smooth_l1_loss_param.sigma must be positive, got {sigma:g}")
        self.sigma2 = sigma * sigma

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        first = [_legacy_dim(self, shapes[0], a, "SmoothL1Loss") for a in (1, 2, 3)]
        for k, shape in enumerate(shapes[1:], start=1):
            dims = [_legacy_dim(self, shape, a, "SmoothL1Loss") for a in (1, 2, 3)]
            if dims != first:
                raise self.error(f"bottom {k} must match bottom 0 in channels, height and "
                                 f"width: got shapes {list(shapes[0])} and {list(shape)}")

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        pred, target = bottoms[0], bottoms[1].reshape(bottoms[0].shape)
        weights = [w.detach().reshape(pred.shape) for w in bottoms[2:]]
        d = pred - target
        if weights:
            d = weights[0] * d
        value, slope = smooth_l1(d, self.sigma2)
        if len(weights) == 2:
            value = weights[1] * value
            slope = slope * weights[0] * weights[1]
        num = float(_legacy_dim(self, tuple(pred.shape), 0, "SmoothL1Loss"))
        grads: list[torch.Tensor | None] = [None] * len(bottoms)
        if need_grad[0]:
            grads[0] = slope
        if need_grad[1]:
            grads[1] = (-slope).reshape(bottoms[1].shape)
        return LossValue(_scalar(value.sum(), num), num, grads)


@dataclass
class _Selection:
    """What matching and mining chose, in the order Caffe lays out its loss inputs.

    ``pos_*``: one entry per matched prediction (image, prior, location class, class
    label, encoded target box, prior variance); ``conf_rows``: (image, prior, label) of
    every row the confidence loss sees (positives then negatives per image).
    """

    pos_image: np.ndarray
    pos_prior: np.ndarray
    pos_loc_class: np.ndarray
    pos_label: np.ndarray
    pos_target: np.ndarray
    pos_variance: np.ndarray
    pos_inside: np.ndarray            # bp_inside: which coordinates keep the prediction
    conf_rows: np.ndarray             # (rows, 3) int: image, prior, label
    conf_positive: np.ndarray         # (rows,) bool: the row is a matched prediction


@register("MultiBoxLoss")
class MultiBoxLoss(_LossLayer):
    """SSD's training loss: ``(loc_weight * loc_loss + conf_loss) / normalizer``.

    Bottoms: loc (N, P*4*loc_classes), conf (N, P*num_classes) raw scores, prior
    (1, 2, P*4), ground truth (1, 1, G, 8) rows ``[image, label, instance, xmin, ymin,
    xmax, ymax, difficult]``; only loc and conf get gradients. Priors (or decoded
    predictions, ``use_prior_for_matching: false``) are matched to ground truth
    (``match_type`` BIPARTITE, or PER_PREDICTION adding every overlap >=
    ``overlap_threshold``); ``mining_type`` MAX_NEGATIVE keeps the ``neg_pos_ratio *
    positives`` unmatched priors (overlap < ``neg_overlap``) of highest confidence loss,
    HARD_EXAMPLE the ``sample_size`` hardest predictions, NONE every prior (all
    negatives). The loc loss is SmoothL1 or L2 (halved) summed over matched boxes; the
    conf loss Softmax or Logistic summed over the chosen rows. The normalizer follows
    ``loss_param.normalization`` with VALID = number of matches (at least 1).
    As in the fork, a ``propagate_down: false`` on loc or conf also drops that term.
    """

    min_bottoms = max_bottoms = 4

    def configure(self, spec: LayerSpec) -> None:
        p = spec.param.multibox_loss_param
        self.p = p
        if not p.HasField("num_classes") or p.num_classes < 1:
            raise self.error("multibox_loss_param must provide num_classes >= 1")
        self.num_classes = int(p.num_classes)
        self.share_location = bool(p.share_location)
        self.loc_classes = 1 if self.share_location else self.num_classes
        self.background = int(p.background_label_id)
        self.mining = int(p.mining_type)
        if p.HasField("do_neg_mining") and p.do_neg_mining != (self.mining != _MB.NONE):
            raise self.error(f"do_neg_mining (deprecated) {str(p.do_neg_mining).lower()} "
                             f"contradicts mining_type {_MB.MiningType.Name(self.mining)}; "
                             f"use mining_type only")
        if self.mining != _MB.NONE and not self.share_location:
            raise self.error("negative mining needs share_location: true (the fork supports "
                             "no other); set mining_type: NONE or share the locations")
        if self.mining == _MB.HARD_EXAMPLE and p.sample_size <= 0:
            raise self.error(f"HARD_EXAMPLE mining needs sample_size > 0, got {p.sample_size}")
        if p.map_object_to_agnostic and self.num_classes != (2 if self.background >= 0 else 1):
            raise self.error(f"map_object_to_agnostic needs num_classes "
                             f"{2 if self.background >= 0 else 1}, got {self.num_classes}")
        if p.conf_loss_type == _MB.SOFTMAX and not 0 <= self.background < self.num_classes:
            raise self.error(f"Softmax confidence loss needs 0 <= background_label_id < "
                             f"num_classes, got {self.background} for {self.num_classes} classes")
        if p.loc_loss_type not in (_MB.L2, _MB.SMOOTH_L1) or \
                p.conf_loss_type not in (_MB.SOFTMAX, _MB.LOGISTIC):
            raise self.error("unknown loc_loss_type or conf_loss_type")
        code_type_of(self, p.code_type)
        self.mode = _normalization(spec.param.loss_param, caffe_pb2.LossParameter.VALID)
        _normalizer(self, self.mode, 1, 1, None)
        down = list(spec.param.propagate_down) or [True, True]
        self.use_loc, self.use_conf = bool(down[0]), bool(down[1])

    def check_shapes(self, shapes: list[Shape]) -> None:
        super().check_shapes(shapes)
        self._num_priors(shapes)

    def _num_priors(self, shapes: list[Shape]) -> int:
        num_priors = prior_count(self, shapes[2])
        if num_priors * self.loc_classes * 4 != _legacy_dim(self, shapes[0], 1, "MultiBoxLoss"):
            raise self.error(f"number of priors must match number of location predictions: "
                             f"{num_priors} priors x {self.loc_classes} loc classes x 4, got "
                             f"loc shape {list(shapes[0])}")
        if num_priors * self.num_classes != _legacy_dim(self, shapes[1], 1, "MultiBoxLoss"):
            raise self.error(f"number of priors must match number of confidence predictions: "
                             f"{num_priors} priors x {self.num_classes} classes, got conf shape "
                             f"{list(shapes[1])}")
        return num_priors

    # -- matching and mining (numpy, as bbox_util.cpp) -------------------------------
    def _matches(self, truth: dict, priors: np.ndarray, variances: np.ndarray,
                 loc: np.ndarray, num: int) -> list[dict[int, tuple[np.ndarray, np.ndarray]]]:
        """FindMatches: per image ``{loc label: (match indices, overlaps)}`` (-1 = shared)."""
        p = self.p
        out: list[dict[int, tuple[np.ndarray, np.ndarray]]] = []
        for i in range(num):
            found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            gts = truth.get(i)
            if gts:
                boxes = np.stack([b for _, b, _ in gts])
                labels = np.array([c for c, _, _ in gts])
                if not p.use_prior_for_matching:
                    for c in range(self.loc_classes):
                        label = -1 if self.share_location else c
                        if not self.share_location and label == self.background:
                            continue
                        preds = decode(priors, variances, loc[i, :, c], p.code_type,
                                       p.encode_variance_in_target)
                        keep = np.arange(len(gts)) if label == -1 else \
                            np.nonzero(labels == label)[0]
                        idx, ov = match(boxes[keep], preds, p.match_type, p.overlap_threshold,
                                        p.ignore_cross_boundary_bbox)
                        found[label] = (np.where(idx >= 0, keep[np.maximum(idx, 0)], idx), ov)
                else:
                    idx, ov = match(boxes, priors, p.match_type, p.overlap_threshold,
                                    p.ignore_cross_boundary_bbox)
                    if self.share_location:
                        found[-1] = (idx, ov)
                    else:
                        for c in range(self.loc_classes):
                            if c != self.background:
                                mine = (idx > -1) & (labels[np.maximum(idx, 0)] == c)
                                found[c] = (np.where(mine, idx, -1), ov)
            out.append(found)
        return out

    def _conf_losses(self, conf: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """ComputeConfLoss: per prior confidence loss against ``labels`` (N, P), float."""
        if self.p.conf_loss_type == _MB.SOFTMAX:
            shifted = conf - conf.max(axis=2, keepdims=True)
            e = np.exp(shifted)
            prob = np.take_along_axis(e, labels[..., None], 2)[..., 0] / e.sum(axis=2)
            return -np.log(np.maximum(prob, F32(FLT_MIN)))
        target = (np.arange(self.num_classes) == labels[..., None]).astype(F32)
        positive = (conf >= 0).astype(F32)
        terms = conf * (target - positive) - np.log1p(np.exp(conf - 2 * conf * positive))
        return -terms.sum(axis=2)

    def _mine(self, matches: list[dict], truth: dict, conf: np.ndarray, loc: np.ndarray,
              priors: np.ndarray, variances: np.ndarray) -> list[list[int]]:
        """MineHardExamples: per image the chosen negatives (ascending prior order);
        HARD_EXAMPLE also drops the matches it did not select (in ``matches``)."""
        p = self.p
        num, num_priors = conf.shape[:2]
        labels = np.full((num, num_priors), self.background, dtype=np.int64)
        for i, found in enumerate(matches):
            gt_labels = np.array([c for c, _, _ in truth.get(i, [])] or [0])
            for label in sorted(found, reverse=True):   # the first matching label wins
                idx = found[label][0]
                labels[i, idx > -1] = gt_labels[idx[idx > -1]]
        self._check_labels(labels[labels != self.background])
        loss = self._conf_losses(conf, labels)
        if self.mining == _MB.HARD_EXAMPLE:
            loss = loss + self._loc_losses(matches, truth, loc, priors, variances, num_priors)
        use_nms = p.HasField("nms_param") and p.nms_param.nms_threshold > 0
        negatives: list[list[int]] = []
        for i, found in enumerate(matches):
            chosen_neg: list[int] = []
            for label in sorted(found):
                idx, overlaps = found[label]
                if self.mining == _MB.MAX_NEGATIVE:
                    eligible = np.nonzero((idx == -1) & (overlaps < F32(p.neg_overlap)))[0]
                    num_sel = min(int(F32((idx > -1).sum()) * F32(p.neg_pos_ratio)), len(eligible))
                else:
                    eligible = np.arange(len(idx))
                    num_sel = min(int(p.sample_size), len(eligible))
                if use_nms:
                    boxes = priors if p.use_prior_for_nms else decode(
                        priors, variances, loc[i, :, 0 if label == -1 else label], p.code_type,
                        p.encode_variance_in_target)
                    order = nms(boxes[eligible], loss[i, eligible], p.nms_param.nms_threshold,
                                int(p.nms_param.top_k))
                else:
                    order = sort_desc(loss[i, eligible])
                selected = set(eligible[np.asarray(order[:num_sel], dtype=np.int64)].tolist())
                for m in range(len(idx)):
                    if idx[m] > -1 and self.mining == _MB.HARD_EXAMPLE and m not in selected:
                        idx[m] = -1
                    elif idx[m] == -1 and m in selected:
                        chosen_neg.append(m)
            negatives.append(chosen_neg)
        return negatives

    def _check_labels(self, labels: np.ndarray) -> None:
        """ComputeConfLoss CHECKs the matched ground truth labels against num_classes."""
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise self.error(f"ground truth label {int(bad[0])} is out of range for "
                             f"num_classes {self.num_classes}")

    def _positives(self, matches: list[dict], truth: dict, loc: np.ndarray, priors: np.ndarray,
                   variances: np.ndarray) -> tuple[np.ndarray, ...]:
        """EncodeLocPrediction: (image, prior, loc class, label, target, inside) per match."""
        p = self.p
        rows = [(i, j, 0 if label == -1 else label, gt)
                for i, found in enumerate(matches) for label in sorted(found)
                for j, gt in enumerate(found[label][0]) if gt > -1]
        image = np.array([r[0] for r in rows], dtype=np.int64)
        prior = np.array([r[1] for r in rows], dtype=np.int64)
        loc_class = np.array([r[2] for r in rows], dtype=np.int64)
        gt_boxes = np.array([truth[r[0]][r[3]][1] for r in rows], dtype=F32).reshape(-1, 4)
        label = np.array([truth[r[0]][r[3]][0] for r in rows], dtype=np.int64)
        target = encode(priors[prior], variances[prior], gt_boxes, p.code_type,
                        p.encode_variance_in_target)
        inside = np.ones_like(target, dtype=bool)
        if p.bp_inside:
            where = priors[prior]
            if not p.use_prior_for_matching:
                where = decode(where, variances[prior], loc[image, prior, loc_class], p.code_type,
                               p.encode_variance_in_target)
            inside = (where >= 0) & (where <= 1)
        if p.encode_variance_in_target:
            target = target / variances[prior]
        return image, prior, loc_class, label, target.astype(F32), inside

    def _loc_losses(self, matches: list[dict], truth: dict, loc: np.ndarray, priors: np.ndarray,
                    variances: np.ndarray, num_priors: int) -> np.ndarray:
        """ComputeLocLoss (for HARD_EXAMPLE ranking): per prior loc loss of its match."""
        image, prior, loc_class, _, target, inside = self._positives(
            matches, truth, loc, priors, variances)
        pred = loc[image, prior, loc_class]
        if self.p.encode_variance_in_target:
            pred = pred / variances[prior]
        d = np.where(inside, pred, target) - target
        if self.p.loc_loss_type == _MB.SMOOTH_L1:
            per = np.where(np.abs(d) < 1, F32(0.5) * d * d, np.abs(d) - F32(0.5))
        else:
            per = F32(0.5) * d * d
        out = np.zeros(loc.shape[:2], dtype=F32)
        out[image, prior] = per.sum(axis=1)
        return out

    def _select(self, loc: np.ndarray, conf: np.ndarray, prior: np.ndarray,
                gt: np.ndarray) -> _Selection:
        num, num_priors = conf.shape[:2]
        priors, variances = split_priors(prior, num_priors)
        check_priors(self, priors, self.p.code_type)
        try:
            truth = read_ground_truth(gt, self.background, self.p.use_difficult_gt,
                                      stop_at_invalid=False)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        matches = self._matches(truth, priors, variances, loc, num)
        negatives = self._mine(matches, truth, conf, loc, priors, variances) \
            if self.mining != _MB.NONE else None
        image, prior_idx, loc_class, label, target, inside = self._positives(
            matches, truth, loc, priors, variances)
        if self.p.map_object_to_agnostic:
            label = np.full_like(label, self.background + 1)
        self._check_labels(label)
        if negatives is None:   # every prior is a row, background unless matched
            rows = np.stack(np.meshgrid(np.arange(num), np.arange(num_priors), indexing="ij"),
                            axis=-1).reshape(-1, 2)
            labels = np.full((num, num_priors), self.background, dtype=np.int64)
            labels[image, prior_idx] = label
            positive = np.zeros((num, num_priors), dtype=bool)
            positive[image, prior_idx] = True
            conf_rows = np.column_stack([rows, labels.reshape(-1)])
            conf_positive = positive.reshape(-1)
        else:
            parts, kinds = [], []
            for i in range(num):
                mine = image == i
                neg = np.array(negatives[i], dtype=np.int64)
                parts += [np.column_stack([image[mine], prior_idx[mine], label[mine]]),
                          np.column_stack([np.full_like(neg, i), neg,
                                           np.full_like(neg, self.background)])]
                kinds += [np.ones(int(mine.sum()), dtype=bool), np.zeros(len(neg), dtype=bool)]
            conf_rows = np.concatenate(parts).reshape(-1, 3)
            conf_positive = np.concatenate(kinds)
        return _Selection(image, prior_idx, loc_class, label, target, variances[prior_idx],
                          inside, conf_rows, conf_positive)

    # -- the losses (torch, differentiable by Caffe's rules) ---------------------------
    def _loc_term(self, loc: torch.Tensor, sel: _Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Loc loss (unweighted) and its gradient w.r.t. loc (N, P, L, 4), times loc_weight."""
        device = loc.device
        idx = [torch.from_numpy(a).to(device) for a in (sel.pos_image, sel.pos_prior,
                                                        sel.pos_loc_class)]
        target = torch.from_numpy(sel.pos_target).to(device)
        inside = torch.from_numpy(sel.pos_inside).to(device)
        pred = loc[idx[0], idx[1], idx[2]]
        if self.p.encode_variance_in_target:
            pred = pred / torch.from_numpy(sel.pos_variance).to(device)
        pred = torch.where(inside, pred, target)
        d = pred - target
        if self.p.loc_loss_type == _MB.SMOOTH_L1:
            value, slope = smooth_l1(d, 1.0)
        else:
            value, slope = 0.5 * d * d, d
        grad = torch.zeros_like(loc)
        grad[idx[0], idx[1], idx[2]] = slope * float(self.p.loc_weight)
        return value.sum(), grad

    def _conf_term(self, conf: torch.Tensor, sel: _Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Conf loss over the chosen rows and its gradient w.r.t. conf (N, P, C)."""
        device = conf.device
        rows = torch.from_numpy(sel.conf_rows).to(device)
        pred = conf[rows[:, 0], rows[:, 1]]
        label = rows[:, 2]
        if self.p.conf_loss_type == _MB.SOFTMAX:
            prob = torch.softmax(pred, dim=1)
            picked = prob.gather(1, label[:, None]).clamp_min(FLT_MIN)
            total = -torch.log(picked).sum()
            slope = prob.scatter_add(1, label[:, None], -torch.ones_like(picked))
        else:
            target = self._logistic_target(sel, conf.shape).to(device)
            positive = (pred >= 0).to(pred.dtype)
            total = -(pred * (target - positive)
                      - torch.log(1 + torch.exp(pred - 2 * pred * positive))).sum()
            slope = torch.sigmoid(pred) - target
        grad = torch.zeros_like(conf)
        grad[rows[:, 0], rows[:, 1]] = slope
        return total, grad

    def _logistic_target(self, sel: _Selection, shape: torch.Size) -> torch.Tensor:
        """EncodeConfPrediction's 0/1 targets, filled with ``background_label_id`` first.

        Without mining the fork steps its target pointer by P (not P * C) per image, so
        image i's positives land at flat offset ``i*P + j*C + label``; kept as Caffe does.
        """
        _, num_priors, classes = shape
        target = np.full((len(sel.conf_rows), classes), F32(self.background))
        if self.mining == _MB.NONE:
            flat = target.reshape(-1)
            flat[sel.pos_image * num_priors + sel.pos_prior * classes + sel.pos_label] = 1
            return torch.from_numpy(target)
        positive, labels = sel.conf_positive, sel.conf_rows[:, 2]
        target[positive, labels[positive]] = 1
        if 0 <= self.background < classes:
            target[~positive, self.background] = 1
        return torch.from_numpy(target)

    def _evaluate(self, bottoms, need_grad) -> LossValue:
        loc, conf, prior, gt = bottoms
        num_priors = self._num_priors([tuple(b.shape) for b in bottoms])
        num = loc.shape[0]
        loc4 = loc.reshape(num, num_priors, self.loc_classes, 4)
        conf3 = conf.reshape(num, num_priors, self.num_classes)
        as_np = [b.detach().to("cpu", torch.float32).numpy() for b in (loc4, conf3, prior, gt)]
        sel = self._select(*as_np)
        matches = len(sel.pos_image)
        normalizer = _normalizer(self, self.mode, num, num_priors,
                                 torch.ones(matches, dtype=torch.bool))
        total = loc.new_zeros(())
        grads: list[torch.Tensor | None] = [None, None, None, None]
        if matches:
            loc_loss, loc_grad = self._loc_term(loc4, sel)
            if self.use_loc:
                total = total + float(self.p.loc_weight) * loc_loss
            grads[0] = loc_grad.reshape(loc.shape) if need_grad[0] else None
        if len(sel.conf_rows):
            conf_loss, conf_grad = self._conf_term(conf3, sel)
            if self.use_conf:
                total = total + conf_loss
            grads[1] = conf_grad.reshape(conf.shape) if need_grad[1] else None
        if need_grad[0] and grads[0] is None:
            grads[0] = torch.zeros_like(loc)
        if need_grad[1] and grads[1] is None:
            grads[1] = torch.zeros_like(conf)
        return LossValue(_scalar(total, normalizer), normalizer, grads)
