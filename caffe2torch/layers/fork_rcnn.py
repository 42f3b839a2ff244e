"""Region layers of the detection forks: ROIPooling (py-faster-rcnn), PSROIPooling (R-FCN)
and the C++ Proposal layer of the golden data's fork; and SegNet's DenseImageData.

ROI coordinates are rounded as the C++ does (``round``: halves away from zero) and
bin edges computed in float32, so the windows are Caffe's. The pooling layers loop over
the ROIs in Python and vectorise each ROI's bins; their gradients are autograd's of a
gather (ROIPooling: to each bin's argmax, as the fork's GPU backward) or of a masked
mean (PSROIPooling), which are the forks' backward passes.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import torch

from ..data import DataError, seeded_rng
from ..data.transform import DataTransformer
from ..formats.datum import hwc_to_chw
from .base import CaffeLayer, LayerSpec, Shape
from .data import _PREFETCH, Batch, _PrefetchingLayer
from .registry import register


def _round(values: np.ndarray) -> np.ndarray:
    """C's ``round``: halves away from zero (exact for float32 input)."""
    v = values.astype(np.float64)
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _rois(layer: CaffeLayer, rois: torch.Tensor, batch: int) -> np.ndarray:
    """The (R, 5) rows ``[batch_index, x1, y1, x2, y2]`` as float32, batch indices checked."""
    if rois.dim() < 2 or rois.shape[1] != 5 or any(d != 1 for d in rois.shape[2:]):
        raise layer.error(f"ROIs (bottom 1) must be (R, 5) rows [batch_index, x1, y1, x2, y2], "
                          f"got shape {list(rois.shape)}")
    rows = rois.detach().to("cpu", torch.float32).reshape(-1, 5).numpy()
    index = rows[:, 0].astype(np.int64)
    bad = (index < 0) | (index >= batch)
    if bad.any():
        raise layer.error(f"ROI batch index out of range: expected 0 <= index < {batch}, got "
                          f"{int(index[bad][0])}")
    return rows


def _bin_masks(start: np.ndarray, end: np.ndarray, lo: int, hi: int) -> torch.Tensor:
    """(bins, hi - lo) membership of positions ``lo..hi-1`` in ``[start, end)`` per bin."""
    pos = np.arange(lo, hi)
    return torch.from_numpy((pos >= start[:, None]) & (pos < end[:, None]))


@register("ROIPooling")
class ROIPooling(CaffeLayer):
    """Max pooling of each ROI into ``pooled_h x pooled_w`` bins (py-faster-rcnn).

    ROI corners are ``round(coord * spatial_scale)``, its size ``max(end - start + 1, 1)``;
    bin p covers ``[floor(p * size / pooled), ceil((p+1) * size / pooled))`` offset by the
    start and clipped to the map. An empty bin gives 0; ties keep the first position in
    row-major order. The gradient goes to each bin's argmax.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.roi_pooling_param
        self.pooled = (int(p.pooled_h), int(p.pooled_w))
        if min(self.pooled) <= 0:
            raise self.error(f"pooled_h and pooled_w must be positive, got {list(self.pooled)}")
        self.scale = np.float32(p.spatial_scale)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(bottom_shapes[1][0], bottom_shapes[0][1], *self.pooled)]

    def _bins(self, start: int, end: int, pooled: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        size = max(end - start + 1, 1)
        bin_size = np.float32(size) / np.float32(pooled)
        steps = np.arange(pooled + 1, dtype=np.float32) * bin_size
        low = np.floor(steps[:-1]).astype(np.int64) + start
        high = np.ceil(steps[1:]).astype(np.int64) + start
        return np.clip(low, 0, limit), np.clip(high, 0, limit)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise self.error(f"expected a 4-D feature map, got shape {list(x.shape)}")
        n, c, height, width = x.shape
        rows = _rois(self, rois, n)
        corners = _round(rows[:, 1:] * self.scale).astype(np.int64)
        flat = x.reshape(n, c, height * width)
        picks = []
        for (b, *_), (x1, y1, x2, y2) in zip(rows.astype(np.int64), corners):
            hs, he = self._bins(y1, y2, self.pooled[0], height)
            ws, we = self._bins(x1, x2, self.pooled[1], width)
            best = self._argmax(x[b].detach(), hs, he, ws, we)
            picks.append(torch.where(best >= 0, best + b * c * height * width, best))
        if not picks:
            return x.new_zeros((0, c, *self.pooled))
        index = torch.stack(picks)
        values = flat.reshape(-1).take(index.clamp(min=0))
        return torch.where(index >= 0, values, torch.zeros_like(values))

    @staticmethod
    def _argmax(x: torch.Tensor, hs: np.ndarray, he: np.ndarray, ws: np.ndarray,
                we: np.ndarray) -> torch.Tensor:
        """Flat ``c * H * W + h * W + w`` index of each bin's first maximum, -1 when empty."""
        c, height, width = x.shape
        h0, h1 = int(hs.min()), max(int(he.max()), int(hs.min()))
        w0, w1 = int(ws.min()), max(int(we.max()), int(ws.min()))
        if h1 == h0 or w1 == w0:  # the ROI lies outside the map: every bin is empty
            return torch.full((c, len(hs), len(ws)), -1, dtype=torch.long, device=x.device)
        region = x[:, h0:h1, w0:w1]
        wmask = _bin_masks(ws, we, w0, w1).to(x.device)           # (PW, rw)
        hmask = _bin_masks(hs, he, h0, h1).to(x.device)           # (PH, rh)
        lowest = torch.finfo(x.dtype).min
        cols = region[:, :, None, :].masked_fill(~wmask, lowest)  # (C, rh, PW, rw)
        col_max, col_arg = cols.max(dim=-1)                        # first max along w
        rows = col_max[:, None].masked_fill(~hmask[:, :, None], lowest)  # (C, PH, rh, PW)
        _, row_arg = rows.max(dim=2)                               # (C, PH, PW)
        w_arg = col_arg.gather(1, row_arg)                         # (C, PH, PW)
        channel = torch.arange(c, device=x.device)[:, None, None]
        index = channel * height * width + (row_arg + h0) * width + (w_arg + w0)
        empty = ~(hmask.any(1)[:, None] & wmask.any(1)[None, :])
        return index.masked_fill(empty, -1)


@register("PSROIPooling")
class PSROIPooling(CaffeLayer):
    """R-FCN's position-sensitive ROI pooling into ``group_size x group_size`` bins.

    Corners ``round(coord) * spatial_scale`` (the end one ``(round(coord) + 1) * scale``),
    ROI size at least 0.1, bin p covering ``[floor(start + p*bin), ceil(start + (p+1)*bin))``
    clipped to the map; output channel k's bin (i, j) averages input channel
    ``(k * group_size + i) * group_size + j``; an empty bin gives 0.
    """

    min_bottoms = max_bottoms = 2
    min_tops = max_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.psroi_pooling_param
        missing = [f for f in ("spatial_scale", "output_dim", "group_size") if not p.HasField(f)]
        if missing:
            raise self.error(f"psroi_pooling_param needs {', '.join(missing)}")
        self.scale = np.float32(p.spatial_scale)
        self.output_dim, self.group = int(p.output_dim), int(p.group_size)
        if self.output_dim <= 0 or self.group <= 0:
            raise self.error(f"output_dim and group_size must be positive, got {self.output_dim} "
                             f"and {self.group}")
        channels = spec.bottom_shapes[0][1] if len(spec.bottom_shapes[0]) > 1 else None
        if channels != self.output_dim * self.group ** 2:
            raise self.error(f"input channels must be output_dim * group_size^2 = "
                             f"{self.output_dim * self.group ** 2}, got {channels}")

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(bottom_shapes[1][0], self.output_dim, self.group, self.group)]

    def _bins(self, start: np.float32, end: np.float32,
              limit: int) -> tuple[np.ndarray, np.ndarray]:
        size = np.float32(max(np.float64(end - start), 0.1))
        bin_size = size / np.float32(self.group)
        steps = np.arange(self.group + 1, dtype=np.float32) * bin_size + start
        low = np.floor(steps[:-1]).astype(np.int64)
        high = np.ceil(steps[1:]).astype(np.int64)
        return np.clip(low, 0, limit), np.clip(high, 0, limit)

    def forward(self, x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise self.error(f"expected a 4-D feature map, got shape {list(x.shape)}")
        n, _, height, width = x.shape
        rows = _rois(self, rois, n)
        rounded = _round(rows[:, 1:])
        starts = (rounded[:, :2].astype(np.float32) * self.scale)
        ends = ((rounded[:, 2:] + 1).astype(np.float32) * self.scale)
        g = self.group
        outs = []
        for b, (x1, y1), (x2, y2) in zip(rows[:, 0].astype(np.int64), starts, ends):
            hs, he = self._bins(y1, y2, height)
            ws, we = self._bins(x1, x2, width)
            hmask = _bin_masks(hs, he, 0, height).to(x)            # (G, H)
            wmask = _bin_masks(ws, we, 0, width).to(x)             # (G, W)
            area = (he - hs)[:, None] * (we - ws)[None, :]
            planes = x[b].reshape(self.output_dim, g, g, height, width)
            sums = torch.einsum("kijhw,ih,jw->kij", planes, hmask, wmask)
            divisor = torch.from_numpy(np.maximum(area, 1).astype(np.float32)).to(x)
            outs.append(torch.where(torch.from_numpy(area > 0).to(x.device), sums / divisor,
                                    torch.zeros_like(sums)))
        if not outs:
            return x.new_zeros((0, self.output_dim, g, g))
        return torch.stack(outs)


def _anchors(base_size: int, ratios: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """generate_anchors of the fork's proposal_layer.cpp: (ratios x scales, 4) boxes
    centred on ``(base_size - 1) / 2`` with half sizes ``0.5 * ROUND(len * scale / base_size
    - 1)``, ROUND(v) = ``(int)(v + 0.5)``."""
    area = np.float32(base_size * base_size)
    center = np.float32(0.5) * np.float32(base_size - 1)
    widths = np.sqrt(area / ratios).astype(np.float32)
    heights = (widths * ratios).astype(np.float32)

    def half(length: np.ndarray) -> np.ndarray:
        v = (length[:, None] * scales[None, :]).astype(np.float32).astype(np.float64)
        return np.float32(0.5) * np.trunc(v / base_size - 1 + 0.5).astype(np.float32)

    hw, hh = half(widths).reshape(-1), half(heights).reshape(-1)
    return np.stack([center - hw, center - hh, center + hw, center + hh], axis=1)


def _partial_quicksort(scores: np.ndarray, num_top: int) -> np.ndarray:
    """The permutation sort_box leaves: its in-place quicksort (descending, first element
    as pivot) that only recurses to the right while that part starts before ``num_top``.

    Only positions before ``num_top`` matter and they hold the ``num_top`` best scores in
    descending order, so without ties among them (or at the cut) a stable sort gives the
    same; ties are resolved by running the fork's partition steps.
    """
    n = len(scores)
    order = np.argsort(-scores, kind="stable")
    top = order[:num_top + 1]
    if len(np.unique(scores[top])) == len(top):
        return order
    perm = np.arange(n)
    s = scores.copy()
    stack = [(0, n - 1)]
    while stack:
        start, end = stack.pop()
        pivot = s[start]
        seg = np.arange(start + 1, end + 1)
        low = seg[s[seg] < pivot]             # where the left scan stops, ascending
        high = seg[s[seg] > pivot][::-1]      # where the right scan stops, descending
        k = min(len(low), len(high))
        swaps = int(np.count_nonzero(low[:k] < high[:k]))
        a, b = low[:swaps], high[:swaps]
        s[a], s[b] = s[b], s[a].copy()
        perm[a], perm[b] = perm[b], perm[a].copy()
        right = max(high[swaps] if swaps < len(high) else start,
                    low[swaps - 1] if swaps else start)
        if right > start:
            s[[start, right]] = s[[right, start]]
            perm[[start, right]] = perm[[right, start]]
        if right + 1 < num_top and right + 1 < end:
            stack.append((right + 1, end))
        if start < right - 1:
            stack.append((start, right - 1))
    return perm


def _iou_plus_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """nms.cpp's iou: 0 for disjoint boxes, else areas with the +1 pixel convention."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    one = np.float32(1)
    inter = np.maximum(np.float32(0), x2 - x1 + one) * np.maximum(np.float32(0), y2 - y1 + one)
    area_a = (box[2] - box[0] + one) * (box[3] - box[1] + one)
    area_b = (others[:, 2] - others[:, 0] + one) * (others[:, 3] - others[:, 1] + one)
    iou = inter / (area_a + area_b - inter)
    disjoint = (box[0] > others[:, 2]) | (box[1] > others[:, 3]) | \
        (box[2] < others[:, 0]) | (box[3] < others[:, 1])
    return np.where(disjoint, np.float32(0), iou)


@register("Proposal")
class Proposal(CaffeLayer):
    """RPN proposals, as the C++ Proposal layer of the golden data's fork computes them.

    Bottoms: scores (N, 2A, H, W) (the foreground half, channels A..2A-1, is used),
    deltas (N, 4A, H, W), im_info (first row: image height, width; scale entries are
    ignored). For each cell (h, w) and anchor k: shift the anchor by ``stride * (w, h)``,
    apply the deltas (``+1`` box sizes, ``exp`` of the log-size deltas), clip to the image
    and zero the score of boxes smaller than ``min_size``; sort by score (the fork's partial
    quicksort), greedy NMS (IoU > nms_thresh) over the first ``pre_nms_topn``, keep up to
    ``post_nms_topn``. Tops: rois (R, 5) ``[n, x1, y1, x2, y2]`` and optionally scores (R,).
    No gradient.
    """

    min_bottoms = max_bottoms = 3
    min_tops = 1
    max_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.proposal_param
        self.stride, self.min_size = int(p.feat_stride), int(p.min_size)
        self.pre_nms, self.post_nms = int(p.pre_nms_topn), int(p.post_nms_topn)
        self.nms_thresh = np.float32(p.nms_thresh)
        ratios, scales = np.asarray(p.ratio, np.float32), np.asarray(p.scale, np.float32)
        if not len(ratios) or not len(scales):
            raise self.error("proposal_param needs at least one ratio and one scale")
        self.anchors = _anchors(int(p.base_size), ratios, scales)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Reshape's shapes before any proposal exists: post_nms_topn rows per image."""
        self._check(*bottom_shapes)
        rows = bottom_shapes[0][0] * self.post_nms
        return [(rows, 5), (rows,)][:self.num_tops]

    def _check(self, scores: Shape, deltas: Shape, info: Shape) -> None:
        a = len(self.anchors)
        if len(scores) != 4 or scores[1] != 2 * a or len(deltas) != 4 or deltas[1] != 4 * a \
                or tuple(deltas[2:]) != tuple(scores[2:]) or deltas[0] != scores[0] \
                or math.prod(info) < 2:
            raise self.error(f"with {a} anchors expected scores (N, {2 * a}, H, W), deltas "
                             f"(N, {4 * a}, H, W) and im_info with height and width, got "
                             f"shapes {list(scores)}, {list(deltas)}, {list(info)}")

    def _boxes(self, deltas: np.ndarray, img_h: np.float32, img_w: np.float32
               ) -> tuple[np.ndarray, np.ndarray]:
        """All (H*W*A, 4) proposals in (h, w, anchor) order and whether each is big enough."""
        a = len(self.anchors)
        height, width = deltas.shape[1:]
        shift_x = np.arange(width, dtype=np.float32) * np.float32(self.stride)
        shift_y = np.arange(height, dtype=np.float32) * np.float32(self.stride)
        boxes = self.anchors[None, None] + np.stack(np.broadcast_arrays(
            shift_x[None, :, None], shift_y[:, None, None],
            shift_x[None, :, None], shift_y[:, None, None]), axis=-1)  # (H, W, A, 4)
        d = deltas.reshape(a, 4, height, width).transpose(2, 3, 0, 1)  # (H, W, A, 4)
        one, half = np.float32(1), np.float32(0.5)
        w = boxes[..., 2] - boxes[..., 0] + one
        h = boxes[..., 3] - boxes[..., 1] + one
        cx = d[..., 0] * w + (boxes[..., 0] + half * w)
        cy = d[..., 1] * h + (boxes[..., 1] + half * h)
        pw = np.exp(d[..., 2]) * w
        ph = np.exp(d[..., 3]) * h
        out = np.stack([np.clip(cx - half * pw, 0, img_w - one),
                        np.clip(cy - half * ph, 0, img_h - one),
                        np.clip(cx + half * pw, 0, img_w - one),
                        np.clip(cy + half * ph, 0, img_h - one)], axis=-1).astype(np.float32)
        big = (out[..., 2] - out[..., 0] + one >= np.float32(self.min_size)) & \
              (out[..., 3] - out[..., 1] + one >= np.float32(self.min_size))
        return out.reshape(-1, 4), big.reshape(-1)

    def _nms(self, boxes: np.ndarray) -> list[int]:
        """nms_cpu: greedy in order, a box kills later ones with IoU > threshold."""
        keep: list[int] = []
        dead = np.zeros(len(boxes), bool)
        for i in range(len(boxes)):
            if dead[i]:
                continue
            keep.append(i)
            if len(keep) == self.post_nms:
                break
            dead[i + 1:] |= _iou_plus_one(boxes[i], boxes[i + 1:]) > self.nms_thresh
        return keep

    def forward(self, scores: torch.Tensor, deltas: torch.Tensor, info: torch.Tensor):
        self._check(scores.shape, deltas.shape, info.shape)
        a = len(self.anchors)
        fg = scores.detach().to("cpu", torch.float32).numpy()[:, a:]
        dl = deltas.detach().to("cpu", torch.float32).numpy()
        img_h, img_w = info.detach().to("cpu", torch.float32).reshape(-1).numpy()[:2]
        rois, kept_scores = [], []
        for n in range(fg.shape[0]):
            boxes, big = self._boxes(dl[n], img_h, img_w)
            score = np.where(big, fg[n].transpose(1, 2, 0).reshape(-1), np.float32(0))
            order = _partial_quicksort(score, self.pre_nms)[:min(len(score), self.pre_nms)]
            keep = order[self._nms(boxes[order])]
            rois.append(np.column_stack([np.full(len(keep), n, np.float32), boxes[keep]]))
            kept_scores.append(score[keep])
        top = torch.from_numpy(np.concatenate(rois).astype(np.float32)).to(scores.device)
        if self.num_tops == 1:
            return top
        return top, torch.from_numpy(np.concatenate(kept_scores)).to(scores.device)


@register("DenseImageData")
class DenseImageData(_PrefetchingLayer):
    """SegNet/ENet's data layer: ``image label_image`` pairs (whitespace separated) of a list.

    The image is read as ImageData reads it (``new_height``/``new_width``: INTER_LINEAR) and
    goes through ``transform_param`` (mean, scale); the label image is read as gray, resized
    with INTER_NEAREST to ``new_* / label_divide_factor`` and kept as raw pixel values
    (B, 1, h, w). ENet's ``mirror`` and ``crop_height``/``crop_width`` of
    ``dense_image_data_param`` flip (drawn first) and crop both alike; transform_param's
    own crop and mirror would treat them differently and are refused, as SegNet does.
    ``shuffle`` reshuffles after every pass; with ``batch_size`` 1 and neither resize nor
    crop each batch takes its image's size.
    """

    min_tops = max_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.dense_image_data_param
        t = spec.param.transform_param
        self.batch_size = self._positive(p.batch_size, "dense_image_data_param.batch_size")
        for height, width in (("new_height", "new_width"), ("crop_height", "crop_width")):
            if (getattr(p, height) > 0) != (getattr(p, width) > 0):
                raise self.error(f"dense_image_data_param: {height} and {width} must be set "
                                 f"together")
        if t.mirror or t.crop_size or t.crop_h or t.crop_w:
            raise self.error("transform_param's crop and mirror would not be applied to the "
                             "label image alike; use dense_image_data_param's crop_height/"
                             "crop_width and mirror")
        self.divide = self._positive(p.label_divide_factor,
                                     "dense_image_data_param.label_divide_factor")
        self.size = (int(p.new_height), int(p.new_width))
        self.label_size = (self.size[0] // self.divide, self.size[1] // self.divide)
        self.crop = (int(p.crop_height), int(p.crop_width))
        self.mirror, self.is_color, self.shuffle = p.mirror, p.is_color, p.shuffle
        self.source = self.resolve_path(p.source, "dense_image_data_param.source")
        tokens = self.source.read_text().split()
        self.pairs = list(zip(tokens[0::2], tokens[1::2]))
        if not self.pairs:
            raise self.error(f"dense_image_data_param.source '{self.source}' lists no images")
        self.prefix = self._image_prefix(p.root_folder, self.pairs[0][0])
        self.order = np.arange(len(self.pairs))
        needs_rng = self.shuffle or p.rand_skip or self.mirror or self.crop[0]
        self.rng = seeded_rng() if needs_rng else None
        if self.shuffle:
            self.rng.shuffle(self.order)
        self.pos = int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0
        if self.pos >= len(self.pairs):
            raise self.error(f"rand_skip drew {self.pos}, but the list has only "
                             f"{len(self.pairs)} images")
        with self._naming():
            self.transformer = DataTransformer(t, spec.phase, self.resolve_path)
            # the first pair sets the top shapes (a zero draw: no flip, crop at the corner)
            image, label, _ = self._load(self.pairs[self.order[self.pos]], np.zeros(3, np.uint32))
        self.label_shape = label.shape
        self._start(self.transformer.output_shape(image.shape, "the first image"), _PREFETCH)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [self.top_shape, (self.batch_size, *self.label_shape)]

    def _read(self, name: str, color: bool, size: tuple[int, int], nearest: bool) -> np.ndarray:
        path = self.prefix + name
        image = cv2.imread(path, cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE) \
            if Path(path).is_file() else None
        if image is None:
            raise DataError(f"could not open or read image '{path}' (listed in '{self.source}')")
        if min(size) > 0:
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_NEAREST if nearest
                               else cv2.INTER_LINEAR)
        return image

    def _load(self, pair: tuple[str, str], draw: np.ndarray | None
              ) -> tuple[np.ndarray, np.ndarray, str]:
        """(CxHxW image, 1xhxw label, what) after the shared mirror and crop."""
        image = self._read(pair[0], self.is_color, self.size, nearest=False)
        label = self._read(pair[1], False, self.label_size, nearest=True)
        what = f"image '{self.prefix + pair[0]}' with label '{self.prefix + pair[1]}'"
        if self.mirror and draw[0] % 2:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        height, width = image.shape[:2]
        if self.crop[0]:
            if label.shape != (height, width) or height < self.crop[0] or width < self.crop[1]:
                raise DataError(f"{what}: a {self.crop[0]}x{self.crop[1]} crop needs image and "
                                f"label of one size at least that big, got {height}x{width} "
                                f"and {label.shape[0]}x{label.shape[1]}")
            top = int(draw[1] % (height - self.crop[0] + 1))
            left = int(draw[2] % (width - self.crop[1] + 1))
            image = image[top:top + self.crop[0], left:left + self.crop[1]]
            label = label[top:top + self.crop[0], left:left + self.crop[1]]
        elif label.shape != (height // self.divide, width // self.divide):
            raise DataError(f"{what}: the label is {label.shape[0]}x{label.shape[1]}, expected "
                            f"{height // self.divide}x{width // self.divide} (image size / "
                            f"label_divide_factor)")
        return hwc_to_chw(image), label[None].astype(np.float32), what

    def _plan(self) -> tuple[list[tuple[str, str]], np.ndarray | None]:
        pairs = []
        for _ in range(self.batch_size):
            pairs.append(self.pairs[self.order[self.pos]])
            self.pos += 1
            if self.pos == len(self.pairs):
                self.pos = 0
                if self.shuffle:
                    self.rng.shuffle(self.order)
        draws = self.rng.integers(0, 2**32, size=(self.batch_size, 3), dtype=np.uint32) \
            if self.mirror or self.crop[0] else None
        return pairs, draws

    def _build(self, plan: tuple[list[tuple[str, str]], np.ndarray | None]) -> Batch:
        pairs, draws = plan
        items = [self._load(pair, None if draws is None else draws[i])
                 for i, pair in enumerate(pairs)]
        first_image, first_label, first_what = items[0]
        data = self._batches.take((len(items),
                                   *self.transformer.output_shape(first_image.shape, first_what)))
        labels = np.empty((len(items), *first_label.shape), np.float32)
        out = data.numpy()
        for i, (image, label, what) in enumerate(items):
            if label.shape != first_label.shape:
                raise DataError(f"{what}: label is {'x'.join(map(str, label.shape[1:]))}, the "
                                f"batch's first is {'x'.join(map(str, first_label.shape[1:]))}")
            self.transformer(image, out[i], None, what)
            labels[i] = label
        return data, torch.from_numpy(labels)
