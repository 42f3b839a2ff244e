"""Real-weight nets give the same outputs as OpenCV's dnn module, an independent reader.

OpenCV (opencv-python-headless<5) implements Caffe's layers separately from Caffe and
from us, so agreement within 1e-4 checks both our import of the weights and our layers.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import caffe2torch as caffe
from conftest import shared_dir

# Every golden net with real (stored) weights that OpenCV can read; pvanet_caffe_materials is
# not listed because OpenCV's importer rejects its prototxt (a layer reads a "label" blob no
# layer produces in the deploy form).
REAL = ["cifar10_full", "cifar10_quick", "lenet", "mtcnn_det1_pnet", "mtcnn_det2_rnet",
        "mtcnn_det3_onet", "mtcnn_det4_lnet", "open_nsfw_resnet50_1by2", "squeezenet_v1_0",
        "squeezenet_v1_1", "vanilla_cnn"]


@pytest.mark.parametrize("case", REAL)
def test_matches_opencv(case: str) -> None:
    case_dir = shared_dir() / "golden" / "nets" / case
    spec = json.loads((case_dir / "case.json").read_text())
    model, weights = str(case_dir / spec["model"]), str(case_dir / spec["weights"])
    net = caffe.Net(model, caffe.TEST, weights=weights)
    rng = np.random.default_rng(7)
    inputs = {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32)
              for name in net.inputs}
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    ours = net.forward()

    cv_net = cv2.dnn.readNetFromCaffe(model, weights)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    producers = {top: step.name for step in net.module.steps for top in step.tops}
    names = [producers[o] for o in net.outputs]
    theirs = cv_net.forward(names)
    for output, value in zip(net.outputs, theirs):
        np.testing.assert_allclose(ours[output], value.reshape(ours[output].shape),
                                   rtol=1e-4, atol=1e-4, err_msg=f"{case}: {output}")


# -- MTCNN on real images ------------------------------------------------------------------
MTCNN = "corpus/repos/kpzhang93__MTCNN_face_detection_alignment/code/codes"
MTCNN_NETS = {"pnet": "MTCNNv1/model/det1", "rnet": "MTCNNv1/model/det2",
              "onet": "MTCNNv1/model/det3", "lnet": "MTCNNv2/model/det4"}
MTCNN_IMAGES = [f"{MTCNN}/MTCNNv1/test1.jpg", f"{MTCNN}/MTCNNv1/test2.jpg",
                "corpus/repos/Linzaer__Ultra-Light-Fast-Generic-Face-Detector-1MB/MNN/imgs/1.jpg"]


class Runner:
    """One MTCNN net, run by caffe2torch or by OpenCV's dnn: ``runner(batch)`` gives the
    net's output blobs by name."""

    def __init__(self, stage: str, engine: str):
        base = shared_dir() / MTCNN / MTCNN_NETS[stage]
        model, weights = f"{base}.prototxt", f"{base}.caffemodel"
        self.net = caffe.Net(model, caffe.TEST, weights=weights)
        producers = {top: step.name for step in self.net.module.steps for top in step.tops}
        self.layers = [producers[o] for o in self.net.outputs]
        self.cv_net = None
        if engine == "opencv":
            self.cv_net = cv2.dnn.readNetFromCaffe(model, weights)
            self.cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)

    def __call__(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.cv_net is not None:
            self.cv_net.setInput(batch)
            outs = self.cv_net.forward(self.layers)
            return {name: np.asarray(value).reshape(len(batch), -1, *value.shape[2:])
                    for name, value in zip(self.net.outputs, outs)}
        self.net.blobs["data"].reshape(*batch.shape)
        self.net.reshape()
        self.net.blobs["data"].data[...] = batch
        out = self.net.forward()
        return {name: np.array(value) for name, value in out.items()}


def mtcnn_input(patch: np.ndarray) -> np.ndarray:
    """kpzhang93's MATLAB preprocessing: RGB, ``(pixel - 127.5) / 128``, and transposed (the
    nets were trained on MATLAB's column-major images): a BGR HxWx3 patch -> 3xWxH."""
    rgb = patch[..., ::-1].astype(np.float32)
    return ((rgb - 127.5) * 0.0078125).transpose(2, 1, 0)


def mtcnn_crops(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Patches of integer boxes ``[x1, y1, x2, y2]`` (inclusive, zero-padded where they leave
    the image) resized to ``size`` x ``size``, as network inputs."""
    height, width = image.shape[:2]
    out = []
    for x1, y1, x2, y2 in boxes.astype(int):
        patch = np.zeros((y2 - y1 + 1, x2 - x1 + 1, 3), np.uint8)
        sx, sy, ex, ey = max(x1, 0), max(y1, 0), min(x2, width - 1), min(y2, height - 1)
        if sx <= ex and sy <= ey:
            patch[sy - y1:ey - y1 + 1, sx - x1:ex - x1 + 1] = image[sy:ey + 1, sx:ex + 1]
        out.append(mtcnn_input(cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)))
    return np.stack(out)


def test_mtcnn_nets_match_opencv_on_images() -> None:
    """The corpus MTCNN nets with their real weights, fed the corpus face images (P-Net the
    whole image at two scales, R-, O- and L-Net seeded crops), match cv2.dnn within 1e-4."""
    rng = np.random.default_rng(13)
    runners = {stage: (Runner(stage, "caffe2torch"), Runner(stage, "opencv"))
               for stage in MTCNN_NETS}
    for path in MTCNN_IMAGES:
        image = cv2.imread(str(shared_dir() / path))
        height, width = image.shape[:2]
        batches = {"pnet": [mtcnn_input(cv2.resize(image, None, fx=s, fy=s))[None]
                            for s in (0.5, 0.21)]}
        corners = rng.integers(0, [width - 40, height - 40], (15, 2))
        sides = rng.integers(24, 120, (15, 1))
        boxes = np.hstack([corners, corners + sides])
        batches["rnet"] = [mtcnn_crops(image, boxes, 24)]
        batches["onet"] = [mtcnn_crops(image, boxes, 48)]
        batches["lnet"] = [mtcnn_crops(image, boxes[i::3][:5] // 2, 24).reshape(1, 15, 24, 24)
                           for i in range(3)]
        for stage, inputs in batches.items():
            ours, theirs = runners[stage]
            for batch in inputs:
                mine, cv_out = ours(batch), theirs(batch)
                for name in mine:
                    np.testing.assert_allclose(mine[name], cv_out[name], rtol=1e-4, atol=1e-4,
                                               err_msg=f"{path}: {stage} {name}")


def nms(boxes: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression on ``[x1, y1, x2, y2, score]`` rows (MTCNN's nms.m:
    areas with +1, overlap by union or by the smaller box)."""
    x1, y1, x2, y2, score = boxes[:, :5].T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = list(np.argsort(score, kind="stable")), []
    while order:
        best = order.pop()
        keep.append(best)
        rest = np.array(order, dtype=int)
        w = np.maximum(0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        h = np.maximum(0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = w * h
        union = np.minimum(area[best], area[rest]) if mode == "min" else \
            area[best] + area[rest] - inter
        order = [i for i, o in zip(order, inter / union) if o <= threshold]
    return np.array(keep, dtype=int)


def regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """bbreg.m: shift the corners by ``reg`` times the box's width and height."""
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    out = boxes.copy()
    out[:, :4] = boxes[:, :4] + reg * np.stack([w, h, w, h], axis=1)
    return out


def square(boxes: np.ndarray) -> np.ndarray:
    """rerec.m: the square of the longer side around each box's centre, whole pixels."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out = boxes.copy()
    out[:, 0] = np.fix(boxes[:, 0] + w * 0.5 - side * 0.5)
    out[:, 1] = np.fix(boxes[:, 1] + h * 0.5 - side * 0.5)
    out[:, 2:4] = out[:, 0:2] + side[:, None]
    return out


def mtcnn_detect(image: np.ndarray, nets: dict[str, Runner]) -> dict[str, np.ndarray]:
    """The MTCNN cascade (Zhang et al. 2016; kpzhang93's detect_face.m): P-Net on an image
    pyramid (min face 20, factor 0.709) -> boxes scoring >= 0.6, NMS 0.5 per scale and 0.7
    over all, regressed and squared; R-Net on 24x24 crops (> 0.7, NMS 0.7); O-Net on 48x48
    crops (> 0.7, regressed, NMS 0.7 by the smaller box) with five landmarks."""
    height, width = image.shape[:2]
    stages: dict[str, np.ndarray] = {}
    scale, found = 12 / 20, []
    while min(height, width) * scale >= 12:
        size = (int(np.ceil(width * scale)), int(np.ceil(height * scale)))
        out = nets["pnet"](mtcnn_input(cv2.resize(image, size, interpolation=cv2.INTER_AREA))[None])
        prob, reg = out["prob1"][0, 1].T, out["conv4-2"][0].transpose(0, 2, 1)
        rows, cols = np.nonzero(prob >= 0.6)
        boxes = np.column_stack([np.fix((2 * cols + 1) / scale), np.fix((2 * rows + 1) / scale),
                                 np.fix((2 * cols + 12) / scale), np.fix((2 * rows + 12) / scale),
                                 prob[rows, cols], reg[:, rows, cols].T])
        if len(boxes):
            found.append(boxes[nms(boxes, 0.5)])
        scale *= 0.709
    boxes = np.vstack(found) if found else np.zeros((0, 9))
    boxes = boxes[nms(boxes, 0.7)] if len(boxes) else boxes
    boxes = square(regress(boxes[:, :5], boxes[:, 5:9]))
    stages["pnet"] = boxes
    for stage, size, (score_blob, reg_blob) in (("rnet", 24, ("prob1", "conv5-2")),
                                                ("onet", 48, ("prob1", "conv6-2"))):
        if not len(boxes):
            break
        out = nets[stage](mtcnn_crops(image, np.fix(boxes[:, :4]), size))
        score = out[score_blob][:, 1].reshape(-1)
        keep = score > 0.7
        boxes = np.column_stack([boxes[keep, :4], score[keep]])
        reg = out[reg_blob].reshape(len(score), 4)[keep]
        if stage == "rnet":
            picked = nms(boxes, 0.7)
            boxes = square(regress(boxes[picked], reg[picked]))
        else:
            points = out["conv6-3"].reshape(len(score), 10)[keep]
            w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
            marks = np.hstack([w[:, None] * points[:, :5] + boxes[:, :1] - 1,
                               h[:, None] * points[:, 5:] + boxes[:, 1:2] - 1])
            boxes = regress(boxes, reg)
            picked = nms(boxes, 0.7, "min")
            boxes = np.hstack([boxes[picked], marks[picked]])
        stages[stage] = boxes
    return stages


@pytest.mark.parametrize("path", MTCNN_IMAGES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_mtcnn_cascade_finds_the_same_faces_with_opencv(path: str) -> None:
    """The cascade gives the same boxes (and O-Net landmarks) at every stage whether each
    net runs in caffe2torch or in cv2.dnn (in either order: P-Net scores near 1 tie within
    float rounding, so NMS may list equal-scoring survivors differently)."""
    image = cv2.imread(str(shared_dir() / path))
    ours = mtcnn_detect(image, {s: Runner(s, "caffe2torch") for s in MTCNN_NETS})
    theirs = mtcnn_detect(image, {s: Runner(s, "opencv") for s in MTCNN_NETS})
    assert list(ours) == ["pnet", "rnet", "onet"]
    assert len(ours["onet"]) > 0, "no face found: the cascade itself is broken"
    for stage, boxes in ours.items():
        assert boxes.shape == theirs[stage].shape, stage
        np.testing.assert_allclose(by_position(boxes), by_position(theirs[stage]), rtol=1e-4,
                                   atol=1e-2, err_msg=stage)


def by_position(boxes: np.ndarray) -> np.ndarray:
    """Rows sorted by their corners (to 0.1 pixel), then score."""
    keys = np.round(boxes[:, :4], 1)
    return boxes[np.lexsort((boxes[:, 4], *keys.T[::-1]))]
