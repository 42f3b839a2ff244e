"""MobileNet-YOLO's (eric612) YOLO layers: Reorg, YoloDetectionOutput, Yolov3, YoloSeg,
LaneData and AnnotatedData's ``yolo_data_type``.

References are written out here from the definitions (darknet's reorg_cpu, the fork's
Forward_cpu loops) and, where it implements the layer, OpenCV's dnn through its darknet
importer (``[reorg]`` and ``[region]``), an independent implementation.
"""
from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe2torch as caffe
from caffe2torch import NetError
from caffe2torch.proto import caffe_pb2
from conftest import shared_dir
from test_layers_fork import backward, build, forward

RNG = np.random.default_rng(20240917)
YOLO_REPO = shared_dir() / "corpus" / "repos" / "eric612__MobileNet-YOLO" / "models"


def sigmoid(v):
    return 1 / (1 + np.exp(-np.asarray(v, np.float64)))


def darknet_weights(path: Path) -> Path:
    """A darknet .weights file with only its header (no layer has weights)."""
    path.write_bytes(struct.pack("<iiiq", 0, 2, 0, 0))
    return path


def opencv_darknet(tmp_path: Path, cfg: str, x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    (tmp_path / "net.cfg").write_text(f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n{cfg}")
    net = cv2.dnn.readNetFromDarknet(str(tmp_path / "net.cfg"),
                                     str(darknet_weights(tmp_path / "net.weights")))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setInput(x)
    return net.forward()


# -- Reorg -----------------------------------------------------------------------------------

def darknet_reorg(x: np.ndarray, w: int, h: int, c: int, batch: int, stride: int,
                  forward: bool) -> np.ndarray:
    """darknet's reorg_cpu (src/blas.c) on a flat buffer: element (k, j, i) of the
    (c, h, w) view corresponds to (k % c', j * stride + (k / c') / stride,
    i * stride + (k / c') % stride) of the (c' = c / stride^2, h * stride, w * stride)
    view; forward writes through that map, backward reads through it."""
    out = np.zeros_like(x)
    out_c = c // (stride * stride)
    for b in range(batch):
        for k in range(c):
            for j in range(h):
                for i in range(w):
                    in_index = i + w * (j + h * (k + c * b))
                    c2, offset = k % out_c, k // out_c
                    w2, h2 = i * stride + offset % stride, j * stride + offset // stride
                    out_index = w2 + w * stride * (h2 + h * stride * (c2 + out_c * b))
                    if forward:
                        out[out_index] = x[in_index]
                    else:
                        out[in_index] = x[out_index]
    return out


@pytest.mark.parametrize("shape,stride,reverse", [((2, 18, 6, 9), 3, False),
                                                  ((2, 8, 4, 6), 2, False),
                                                  ((2, 8, 3, 5), 2, True)])
def test_reorg_is_darknets_reorg(shape, stride, reverse, tmp_path: Path) -> None:
    """The fork's ReorgLayer calls ``reorg_cpu(bottom, W, H, C, N, stride, reverse, top)``;
    the gradient is the inverse permutation (darknet's backward_reorg_layer passes
    ``!forward``)."""
    flag = "reverse: true" if reverse else ""
    net, _ = build(tmp_path, f'layer {{ name: "y" type: "Reorg" bottom: "x" top: "y" '
                             f'reorg_param {{ stride: {stride} {flag} }} }}\n', {"x": shape})
    n, c, h, w = shape
    s2 = stride * stride
    expected_shape = (n, c // s2, h * stride, w * stride) if reverse else \
        (n, c * s2, h // stride, w // stride)
    x = RNG.standard_normal(shape).astype(np.float32)
    ours = forward(net, {"x": x})
    assert ours.shape == expected_shape
    np.testing.assert_array_equal(
        ours.ravel(), darknet_reorg(x.ravel(), w, h, c, n, stride, forward=reverse))
    g = RNG.standard_normal(expected_shape).astype(np.float32)
    backward(net, g)
    np.testing.assert_array_equal(
        net.blobs["x"].diff.ravel(), darknet_reorg(g.ravel(), w, h, c, n, stride,
                                                   forward=not reverse))


def test_reorg_matches_opencv_darknet_importer(tmp_path: Path) -> None:
    x = RNG.standard_normal((1, 16, 6, 8)).astype(np.float32)
    theirs = opencv_darknet(tmp_path, "[reorg]\nstride=2\n", x)
    (tmp_path / "ours").mkdir()
    net, _ = build(tmp_path / "ours", 'layer { name: "y" type: "Reorg" bottom: "x" top: "y" '
                                      'reorg_param { stride: 2 } }\n', {"x": x.shape})
    np.testing.assert_array_equal(forward(net, {"x": x}), theirs.reshape(1, 64, 3, 4))


def test_reorg_is_not_its_own_reverse() -> None:
    """darknet's order: ``reverse: true`` with the top's shape does not undo the default
    (which is why its backward reuses the bottom's shape instead)."""
    x = np.arange(2 * 8 * 4 * 6, dtype=np.float32)
    y = darknet_reorg(x, 6, 4, 8, 2, 2, forward=False)
    assert not np.array_equal(darknet_reorg(y, 3, 2, 32, 2, 2, forward=True), x)
    np.testing.assert_array_equal(darknet_reorg(y, 6, 4, 8, 2, 2, forward=True), x)


@pytest.mark.parametrize("params,shape,message", [
    ("", (1, 8, 4, 4), "stride must be set"),
    ("stride: 2", (1, 6, 4, 4), "multiple of stride\\^2 = 4"),
    ("stride: 2", (1, 8, 5, 4), "height and width multiples of 2"),
])
def test_reorg_bad_parameters(params, shape, message, tmp_path: Path) -> None:
    with pytest.raises(NetError, match=f"layer 'y' \\(Reorg\\).*{message}"):
        build(tmp_path, f'layer {{ name: "y" type: "Reorg" bottom: "x" top: "y" '
                        f'reorg_param {{ {params} }} }}\n', {"x": shape})


def test_reorg_refuses_in_place(tmp_path: Path) -> None:
    with pytest.raises(NetError, match="in-place"):
        build(tmp_path, 'layer { name: "y" type: "Reorg" bottom: "x" top: "x" '
                        'reorg_param { stride: 2 } }\n', {"x": (1, 8, 4, 4)})


# -- YoloDetectionOutput ---------------------------------------------------------------------

def yolo_v2_candidates(bottoms: list[np.ndarray], classes: int, boxes: int,
                       biases: list[float], threshold: float) -> list[tuple]:
    """The (score, class, (x, y, w, h)) detections of yolo_detection_output_layer.cpp's
    Forward_cpu before sorting and NMS, loop for loop (float64)."""
    found = []
    for x in bottoms:
        num, channels, _, side = x.shape
        length = channels // boxes
        for b in range(num):
            for j in range(side):
                for i in range(side):
                    for n in range(boxes):
                        v = x[b, n * length:(n + 1) * length, j, i].astype(np.float64)
                        box = ((i + sigmoid(v[0])) / side, (j + sigmoid(v[1])) / side,
                               np.exp(v[2]) * biases[2 * n] / side,
                               np.exp(v[3]) * biases[2 * n + 1] / side)
                        e = np.exp(v[5:5 + classes] - v[5:5 + classes].max())
                        p = e / e.sum()
                        score = sigmoid(v[4]) * p.max()
                        if score >= threshold:
                            found.append((score, int(np.argmax(p)), box))
    return found


def center_iou(a, b) -> float:
    """box_iou of (x, y, w, h) boxes."""
    w = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    h = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = 0 if w < 0 or h < 0 else w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def yolo_v2_reference(bottoms: list[np.ndarray], classes: int, boxes: int,
                      biases: list[float], threshold: float, nms: float) -> np.ndarray:
    """yolo_detection_output_layer.cpp Forward_cpu: the candidates sorted by score, then
    ApplyNms (drop a box whose IoU with a kept higher one is >= nms) and the rows."""
    found = sorted(yolo_v2_candidates(bottoms, classes, boxes, biases, threshold),
                   key=lambda f: -f[0])
    iou = center_iou
    dead: set[int] = set()
    for i in range(len(found) - 1):
        if i not in dead:
            dead |= {j for j in range(i + 1, len(found))
                     if j not in dead and iou(found[i][2], found[j][2]) >= nms}
    rows = [[0, c + 1, s, bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2]
            for i, (s, c, (bx, by, bw, bh)) in enumerate(found) if i not in dead]
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(bottoms[0].shape[0])],
                        np.float32).reshape(1, 1, -1, 7)
    return np.array(rows, np.float32).reshape(1, 1, -1, 7)


V2_BIASES = [1.08, 1.19, 3.42, 4.41, 6.63, 11.38, 9.42, 5.11, 16.62, 10.52]


def v2_net(tmp_path: Path, shapes: dict, classes: int, boxes: int, threshold: float,
           nms: float) -> caffe.Net:
    bottoms = " ".join(f'bottom: "{b}"' for b in shapes)
    biases = " ".join(f"biases: {b}" for b in V2_BIASES[:2 * boxes])
    body = (f'layer {{ name: "y" type: "YoloDetectionOutput" {bottoms} top: "y" '
            f'yolo_detection_output_param {{ num_classes: {classes} num_box: {boxes} coords: 4 '
            f'confidence_threshold: {threshold} nms_threshold: {nms} {biases} }} }}\n')
    return build(tmp_path, body, shapes)[0]


@pytest.mark.parametrize("shapes", [{"a": (2, 40, 5, 5)},
                                    {"a": (1, 48, 4, 4), "b": (1, 48, 6, 6)}])
def test_yolo_detection_output_matches_reference(shapes, tmp_path: Path) -> None:
    """Sigmoid x/y/objectness, exp(w/h) * biases in grid cells, softmax classes (best one
    per anchor), score >= threshold, class-agnostic NMS over both bottoms; an anchor may
    have more channels than 5 + classes (48 / 4 anchors = 12 > 8)."""
    boxes = 5 if shapes["a"][1] == 40 else 4
    net = v2_net(tmp_path, shapes, 3, boxes, 0.25, 0.45)
    feed = {n: (RNG.standard_normal(s) * 2).astype(np.float32) for n, s in shapes.items()}
    ours = forward(net, feed)
    expected = yolo_v2_reference(list(feed.values()), 3, boxes, V2_BIASES, 0.25, 0.45)
    assert ours.shape[2] > 4, "the case should keep several detections"
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_yolo_detection_output_matches_opencv_region(tmp_path: Path) -> None:
    """OpenCV's darknet ``[region]`` layer decodes each anchor to (x, y, w, h, objectness,
    objectness * softmax): with no threshold and no suppression here, every anchor is one
    row, matched to OpenCV's rows by box (OpenCV zeroes the class scores its own NMS
    drops, so those are compared where OpenCV kept them)."""
    x = (RNG.standard_normal((1, 5 * 8, 4, 4)) * 1.5).astype(np.float32)
    anchors = ",".join(f"{b}" for b in V2_BIASES)
    theirs = opencv_darknet(tmp_path, f"[region]\nanchors={anchors}\nbias_match=1\nclasses=3\n"
                                      f"coords=4\nnum=5\nsoftmax=1\nthresh=0\n", x)
    (tmp_path / "ours").mkdir()
    ours = forward(v2_net(tmp_path / "ours", {"a": x.shape}, 3, 5, 0.0, 2.0), {"a": x})[0, 0]
    assert ours.shape == (80, 7) and theirs.shape == (80, 8)
    corners = np.concatenate([theirs[:, :2] - theirs[:, 2:4] / 2,
                              theirs[:, :2] + theirs[:, 2:4] / 2], axis=1)
    match = [int(np.argmin(np.abs(corners - row[3:]).max(axis=1))) for row in ours]
    assert sorted(match) == list(range(80))
    np.testing.assert_allclose(ours[:, 3:], corners[match], rtol=1e-5, atol=1e-5)
    scores = theirs[match, 5:]
    ours_class = scores[np.arange(80), ours[:, 1].astype(int) - 1]
    kept = ours_class > 0
    assert kept.sum() > 40
    np.testing.assert_allclose(ours[kept, 2], ours_class[kept], rtol=1e-5)
    assert (scores <= ours[:, 2:3] * (1 + 1e-5)).all()       # ours is the best class
    assert (ours[:, 2] <= theirs[match, 4] * (1 + 1e-5)).all()  # score <= objectness


def test_yolo_detection_output_without_detections(tmp_path: Path) -> None:
    net = v2_net(tmp_path, {"a": (2, 40, 3, 3)}, 3, 5, 0.9, 0.45)
    ours = forward(net, {"a": np.full((2, 40, 3, 3), -4, np.float32)})
    np.testing.assert_array_equal(ours, [[[[0] + [-1] * 6, [1] + [-1] * 6]]])


@pytest.mark.parametrize("params,shape,message", [
    ("num_classes: 3 num_box: 5 biases: 1 biases: 1", (1, 40, 3, 3), "needs 10 biases"),
    ("num_classes: 3 num_box: 1 biases: 1 biases: 1", (1, 7, 3, 3), "L >= 8"),
    ("num_classes: 3 num_box: 2 biases: 1 biases: 1 biases: 1 biases: 1", (1, 17, 3, 3),
     "num_box 2"),
    ("num_classes: 3 num_box: 1 biases: 1 biases: 1", (1, 8, 3, 4), "S, S"),
])
def test_yolo_detection_output_bad_parameters(params, shape, message, tmp_path: Path) -> None:
    with pytest.raises(NetError, match=f"layer 'y' \\(YoloDetectionOutput\\).*{message}"):
        build(tmp_path, f'layer {{ name: "y" type: "YoloDetectionOutput" bottom: "x" top: "y" '
                        f'yolo_detection_output_param {{ {params} }} }}\n', {"x": shape})


def test_darknet19_deploy_detects_in_the_forks_layout() -> None:
    """The corpus YOLOv2 net (Reorg + YoloDetectionOutput) at its declared 416x416 input.

    Unit BatchNorm statistics keep the random net finite (fresh zero variances amplify by
    1 / sqrt(eps) per layer, to inf); biases favouring objectness and class 6 make many
    anchors detect. Checked against the layer's bottom as greedy NMS allows under
    float32 ties (the whole net's sums can reorder near-equal scores): every row is a
    decoded candidate, kept rows overlap below the threshold, and every other candidate
    overlaps a kept row of at least its score."""
    rng = np.random.default_rng(7)
    net = caffe.Net(str(YOLO_REPO / "darknet" / "darknet19_deploy.prototxt"), caffe.TEST)
    assert net.blobs["reorg1"].shape == (1, 256, 13, 13)
    for name, blobs in net.params.items():
        if name.startswith("bn"):
            blobs[0].data[...] = 0
            blobs[1].data[...] = blobs[2].data[...] = 1
    weight, bias = net.params["conv23_indoor"]
    weight.data[...] *= 20
    bias.data[...] = rng.standard_normal(bias.data.shape) * 0.5
    bias.data.reshape(5, 25)[:, 4] = 3
    bias.data.reshape(5, 25)[:, 10] = 4
    net.blobs["data"].data[...] = rng.standard_normal((1, 3, 416, 416))
    with torch.no_grad():
        out = net.forward()["detection_out"]
    assert out.shape[:2] == (1, 1) and out.shape[3] == 7 and out.shape[2] > 50
    rows = out[0, 0]
    assert (rows[:, 0] == 0).all() and set(rows[:, 1]) <= set(range(1, 21))
    assert (np.diff(rows[:, 2]) <= 0).all() and (rows[:, 2] >= 0.3).all()
    assert (rows[:, 5] > rows[:, 3]).all() and (rows[:, 6] > rows[:, 4]).all()
    found = yolo_v2_candidates([net.blobs["conv23_indoor"].data], 20, 5, V2_BIASES, 0.3)
    table = np.array([[s, c + 1, x - w / 2, y - h / 2, x + w / 2, y + h / 2]
                      for s, c, (x, y, w, h) in found])
    kept = [int(np.argmin(np.abs(table[:, 2:] - row[3:]).max(axis=1))) for row in rows]
    np.testing.assert_allclose(table[kept][:, [0, 1, 2, 3, 4, 5]], rows[:, [2, 1, 3, 4, 5, 6]],
                               rtol=1e-5, atol=1e-5)
    boxes = [f[2] for f in found]
    for a in range(len(kept)):
        assert all(center_iou(boxes[kept[a]], boxes[kept[b]]) < 0.45 + 1e-5
                   for b in range(a + 1, len(kept)))
    for k in set(range(len(found))) - set(kept):
        assert any(center_iou(boxes[k], boxes[i]) >= 0.45 - 1e-5
                   and found[i][0] >= found[k][0] - 1e-5 for i in kept)


# -- Yolov3 loss -------------------------------------------------------------------------------

def yolov3_net(tmp_path: Path, params: str, shape: tuple[int, ...]) -> caffe.Net:
    body = (f'layer {{ name: "loss" type: "Yolov3" bottom: "x" bottom: "gt" top: "loss" '
            f'yolov3_param {{ {params} }} }}\n')
    return build(tmp_path, body, {"x": shape, "gt": (shape[0], 1, 300, 5)})[0]


def truth_rows(*rows_per_image: list[list[float]]) -> np.ndarray:
    gt = np.zeros((len(rows_per_image), 1, 300, 5), np.float32)
    for b, rows in enumerate(rows_per_image):
        gt[b, 0, :len(rows)] = rows
    return gt


HAND = ("side: 2 num_class: 1 num: 1 anchors_scale: 16 thresh: 0.6 coord_scale: 1 biases: 16 "
        "biases: 16 mask: 0")


def run_loss(net: caffe.Net, x: np.ndarray, gt: np.ndarray) -> tuple[float, np.ndarray]:
    loss = forward(net, {"x": x, "gt": gt}, top="loss")
    backward(net, np.ones((), np.float32), top="loss")
    return float(loss), net.blobs["x"].diff.copy()


def test_yolov3_loss_hand_computed(tmp_path: Path) -> None:
    """2x2 grid, one 16-pixel anchor (half the 32-pixel image), one class, raw outputs 0
    (every p = 0.5, every box (cx, cy, 0.5, 0.5)), truth (0.3, 0.7, 0.5, 0.5) class 0.

    Objectness IoUs with the truth: cells (0,0) 0.047, (1,0) 0.005, (0,1) 0.681,
    (1,1) 0.047: above thresh 0.6 only (0,1), so three no-object deltas of 0.5. The truth
    lands in cell (0,1) = position 2, targets x 0.6, y 0.4, w = h = log(1) = 0, coordinate
    scale 2 - 0.25 = 1.75: d_x = -1.75 * 0.1, d_y = +1.75 * 0.1, d_obj = -(1 - 0.5),
    d_class = -(1 - 0.5). Loss = 3 * 0.25 + 2 * 0.030625 + 2 * 0.25 = 1.31125.
    """
    net = yolov3_net(tmp_path, HAND, (1, 6, 2, 2))
    loss, grad = run_loss(net, np.zeros((1, 6, 2, 2), np.float32),
                          truth_rows([[0, 0.3, 0.7, 0.5, 0.5]]))
    expected = np.zeros((6, 4), np.float32)
    expected[4] = [0.5, 0.5, -0.5, 0.5]          # objectness per position
    expected[0, 2], expected[1, 2], expected[5, 2] = -0.175, 0.175, -0.5
    assert loss == pytest.approx(1.31125, rel=1e-6)
    np.testing.assert_allclose(grad.reshape(6, 4), expected, rtol=1e-6, atol=1e-7)


def surrogate(x: torch.Tensor, logic: bool, object_scale: float = 1.0) -> torch.Tensor:
    """The objective whose gradient the fork back-propagates in the hand case: binary
    cross-entropy (or, with use_logic_gradient, scale/2 * (p - t)^2) on the sigmoid fields,
    scale/2 * (t - x)^2 on w and h."""
    p = torch.sigmoid(x.reshape(6, 4))

    def term(v, target, scale):
        if logic:
            return scale / 2 * (v - target) ** 2
        return scale * torch.nn.functional.binary_cross_entropy(
            v, torch.tensor(target, dtype=v.dtype), reduction="sum")
    raw = x.reshape(6, 4)
    total = sum(term(p[4, k], 0.0, 1.0) for k in (0, 1, 3))
    total = total + term(p[4, 2], 1.0, object_scale if logic else 1.0)
    total = total + term(p[5, 2], 1.0, 1.0)
    total = total + term(p[0, 2], 0.6, 1.75) + term(p[1, 2], 0.4, 1.75)
    return total + 1.75 / 2 * (raw[2, 2] ** 2 + raw[3, 2] ** 2)


@pytest.mark.parametrize("logic", [False, True])
def test_yolov3_gradient_is_the_forks_objective(logic: bool, tmp_path: Path) -> None:
    """The gradient is that of the fork's cross-entropy objective (autograd here, and a
    finite-difference check of it), not of the reported sum of squared deltas;
    ``use_logic_gradient`` turns it into the squared error through the sigmoid, objectness
    scaled by object_scale."""
    params = HAND + (" use_logic_gradient: true object_scale: 5" if logic else "")
    x = (RNG.standard_normal((1, 6, 2, 2)) * 0.05).astype(np.float32)
    loss, grad = run_loss(yolov3_net(tmp_path, params, x.shape), x,
                          truth_rows([[0, 0.3, 0.7, 0.5, 0.5]]))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    surrogate(xt, logic, 5.0).backward()
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-5, atol=1e-7)
    eps = 1e-6
    for index in [(0, 0, 1, 0), (0, 2, 1, 0), (0, 4, 0, 0), (0, 4, 1, 0)]:
        up, down = x.astype(np.float64), x.astype(np.float64)
        up[index] += eps
        down[index] -= eps
        fd = (surrogate(torch.tensor(up), logic, 5.0) - surrogate(torch.tensor(down), logic,
                                                                  5.0)) / (2 * eps)
        assert float(fd) == pytest.approx(float(grad[index]), rel=1e-4, abs=1e-8)
    assert loss > 0


def yolov3_reference(x: np.ndarray, gt: np.ndarray, num_class: int, num: int,
                     biases: list[float], mask: list[int], anchors_scale: int, thresh: float,
                     coord_scale: float, class_scale: float) -> tuple[float, np.ndarray]:
    """yolov3_layer.cpp Forward_cpu (MSE, no logic gradient), loop for loop, float64:
    the loss and the delta blob (the gradient before the 1 / N)."""
    n, c, h, w = x.shape
    length, stride = 5 + num_class, h * w
    flat = x.reshape(n, -1).astype(np.float64)
    swap = sigmoid(flat)
    for k in range(c):
        if k % length in (2, 3):
            swap[:, k * stride:(k + 1) * stride] = flat[:, k * stride:(k + 1) * stride]
    diff = np.zeros_like(swap)
    labels = gt.reshape(n, 300, 5).astype(np.float64)

    def iou(a, b):
        ow = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
        oh = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
        inter = 0 if ow < 0 or oh < 0 else ow * oh
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    for b in range(n):
        d, s_ = diff[b], swap[b]
        for s in range(stride):
            for a in range(num):
                index = a * length * stride + s
                pred = ((s % w + s_[index]) / w, (s // w + s_[index + stride]) / h,
                        np.exp(s_[index + 2 * stride]) * biases[2 * mask[a]] / (w * anchors_scale),
                        np.exp(s_[index + 3 * stride]) * biases[2 * mask[a] + 1]
                        / (h * anchors_scale))
                best = 0.0
                for t in range(300):
                    if labels[b, t, 1] == 0:
                        break
                    best = max(best, iou(pred, labels[b, t, 1:]))
                d[index + 4 * stride] = 0 if best > thresh else s_[index + 4 * stride]
        for t in range(300):
            klass, tx, ty, tw, th = labels[b, t]
            if tw == 0:
                break
            ious = [iou((0, 0, biases[2 * k] / (w * anchors_scale),
                         biases[2 * k + 1] / (h * anchors_scale)), (0, 0, tw, th))
                    for k in range(len(biases) // 2)]
            best_n = int(np.argmax(ious))
            if best_n not in mask[:num]:
                continue
            a = mask[:num].index(best_n)
            i, j = int(tx * w), int(ty * h)
            index = a * length * stride + j * w + i
            scale = coord_scale * (2 - tw * th)
            targets = (tx * w - i, ty * h - j,
                       np.log(tw * w * anchors_scale / biases[2 * best_n]),
                       np.log(th * h * anchors_scale / biases[2 * best_n + 1]))
            for k, target in enumerate(targets):
                d[index + k * stride] = -scale * (target - s_[index + k * stride])
            d[index + 4 * stride] = -(1 - s_[index + 4 * stride])
            first = index + 5 * stride
            if d[first]:
                d[first + int(klass) * stride] = -(1 - s_[first + int(klass) * stride])
            else:
                for k in range(num_class):
                    d[first + k * stride] = -class_scale * ((k == klass) - s_[first + k * stride])
    return float((diff ** 2).sum() / n), diff.reshape(x.shape)


def test_yolov3_loss_matches_reference(tmp_path: Path) -> None:
    """Two images on a 4x5 grid (rectangular, as the newer fork allows), three of six
    anchors, four classes; image 0 has two truths of one shape in one cell (the second
    only sets its class delta), one truth whose best anchor is not masked here, and an
    x == 0 row that ends the objectness truths but not the assignment loop."""
    biases = [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319]
    params = ("num_class: 4 num: 3 anchors_scale: 16 thresh: 0.3 coord_scale: 1.5 "
              "class_scale: 0.7 " + " ".join(f"biases: {b}" for b in biases) +
              " mask: 0 mask: 1 mask: 2")
    x = (np.random.default_rng(11).standard_normal((2, 27, 4, 5)) * 1.5).astype(np.float32)
    gt = truth_rows([[2, 0.31, 0.42, 0.3, 0.33], [1, 0.33, 0.40, 0.3, 0.33],
                     [3, 0.8, 0.7, 1.0, 0.9], [0, 0.52, 0.83, 0.1, 0.12]],
                    [[1, 0.6, 0.3, 0.4, 0.2], [0, 0.0, 0.5, 0.2, 0.2], [3, 0.7, 0.9, 0.05, 0.1]])
    loss, grad = run_loss(yolov3_net(tmp_path, params, x.shape), x, gt)
    expected_loss, delta = yolov3_reference(x, gt, 4, 3, biases, [0, 1, 2], 16, 0.3, 1.5, 0.7)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    np.testing.assert_allclose(grad, delta / 2, rtol=1e-5, atol=1e-6)
    assert (delta[:, 4::9] == 0).sum() >= 1, "some anchor should pass the ignore threshold"


@pytest.mark.parametrize("params,shape,message", [
    ("num_class: 2 num: 3 mask: 0 mask: 1 biases: 1 biases: 1 biases: 1 biases: 1",
     (1, 21, 2, 2), "needs num = 3 mask entries"),
    ("num_class: 2 num: 1 mask: 2 biases: 1 biases: 1", (1, 7, 2, 2), "needs biases\\[5\\]"),
    ("num_class: 2 num: 1 mask: 0 biases: 1 biases: 1", (1, 8, 2, 2), "= 7, H, W"),
])
def test_yolov3_bad_parameters(params, shape, message, tmp_path: Path) -> None:
    with pytest.raises(NetError, match=f"layer 'loss' \\(Yolov3\\).*{message}"):
        yolov3_net(tmp_path, params, shape)


def test_yolov3_needs_300_truth_rows(tmp_path: Path) -> None:
    body = ('layer { name: "loss" type: "Yolov3" bottom: "x" bottom: "gt" top: "loss" '
            'yolov3_param { num_class: 1 num: 1 mask: 0 biases: 1 biases: 1 } }\n')
    with pytest.raises(NetError, match="300 rows"):
        build(tmp_path, body, {"x": (1, 6, 2, 2), "gt": (1, 1, 10, 5)})


# -- YoloSeg -----------------------------------------------------------------------------------

def test_yolo_seg_loss_and_gradient(tmp_path: Path) -> None:
    """``d = object_scale * (sigmoid(x) - label)``, loss ``sum(d^2) / N``, gradient
    ``d * loss_weight / N`` = the gradient of object_scale * cross-entropy / N; the third
    bottom is read by neither of the fork's paths."""
    shapes = {"x": (2, 1, 4, 6), "seg": (2, 1, 4, 6), "w": (2, 1)}
    net, _ = build(tmp_path, 'layer { name: "loss" type: "YoloSeg" bottom: "x" bottom: "seg" '
                             'bottom: "w" top: "loss" loss_weight: 3 '
                             'yolo_seg_param { object_scale: 0.5 } }\n', shapes)
    x = RNG.standard_normal(shapes["x"]).astype(np.float32)
    seg = (RNG.random(shapes["seg"]) > 0.7).astype(np.float32)
    loss = forward(net, {"x": x, "seg": seg, "w": np.ones((2, 1), np.float32)}, top="loss")
    d = 0.5 * (sigmoid(x) - seg)
    assert float(loss) == pytest.approx((d ** 2).sum() / 2, rel=1e-5)
    net.backward()
    np.testing.assert_allclose(net.blobs["x"].diff, d * 3 / 2, rtol=1e-5, atol=1e-7)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    (3 * 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(
        xt, torch.tensor(seg, dtype=torch.float64), reduction="sum") / 2).backward()
    np.testing.assert_allclose(net.blobs["x"].diff, xt.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_yolo_seg_label_size_must_match(tmp_path: Path) -> None:
    with pytest.raises(NetError, match="layer 'loss' \\(YoloSeg\\).*as many values"):
        build(tmp_path, 'layer { name: "loss" type: "YoloSeg" bottom: "x" bottom: "seg" '
                        'top: "loss" }\n', {"x": (2, 1, 4, 6), "seg": (2, 1, 2, 3)})


# -- the corpus train nets ---------------------------------------------------------------------

TRAIN_NETS = {"yolo_lite": YOLO_REPO / "mobilenetv2_voc" / "yolo_lite" / "train.prototxt",
              "tusimple": YOLO_REPO / "tusimple" / "mobilenet_yolov3_lite_train.prototxt"}


@pytest.mark.parametrize("name,source", [("yolo_lite", "VOC0712_trainval_lmdb"),
                                         ("tusimple", "tusimple_train_lmdb")])
def test_train_nets_stop_at_their_missing_lmdb(name: str, source: str) -> None:
    with pytest.raises(NetError, match=f"layer 'data'.*{source}' does not exist"):
        caffe.Net(str(TRAIN_NETS[name]), caffe.TRAIN)


def with_inputs(path: Path, inputs: dict[str, tuple[int, ...]], out: Path) -> Path:
    """The net with its data layer replaced by Input layers of these shapes."""
    net = caffe_pb2.NetParameter()
    text_format.Merge(path.read_text(), net)
    layers = [layer for layer in net.layer if layer.type not in ("AnnotatedData", "LaneData")]
    del net.layer[:]
    for name, shape in inputs.items():
        layer = net.layer.add(name=name, type="Input", top=[name])
        layer.input_param.shape.add().dim.extend(shape)
    net.layer.extend(layers)
    out.write_text(text_format.MessageToString(net))
    return out


def test_yolo_lite_train_net_runs_its_yolov3_losses(tmp_path: Path) -> None:
    """The rest of the yolo_lite train net, fed labels in AnnotatedData's yolo layout:
    both Yolov3 losses (its 32- and 16-pixel heads, 7x7 and 14x14 at 224 pixels) give a
    loss and gradients down to the first convolution."""
    path = with_inputs(TRAIN_NETS["yolo_lite"], {"data": (1, 3, 224, 224),
                                                 "label": (1, 1, 300, 5)}, tmp_path / "n.prototxt")
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["data"].data[...] = RNG.standard_normal((1, 3, 224, 224))
    net.blobs["label"].data[...] = truth_rows([[3, 0.4, 0.5, 0.3, 0.6], [7, 0.7, 0.2, 0.1, 0.1]])
    out = net.forward()
    assert set(out) == {"det_loss1", "det_loss2"} and all(v > 0 for v in out.values())
    net.backward()
    assert np.abs(net.params["conv1"][0].diff).max() > 0


def test_tusimple_train_net_runs_its_seg_loss(tmp_path: Path) -> None:
    """The rest of the lane train net, fed LaneData's three tops: YoloSeg on the 1/4-scale
    head, with the Reduction of the seg label as its (unread) third bottom."""
    inputs = {"data": (1, 3, 128, 128), "label": (1, 5, 64, 3), "seg_label": (1, 1, 32, 32)}
    path = with_inputs(TRAIN_NETS["tusimple"], inputs, tmp_path / "n.prototxt")
    net = caffe.Net(str(path), caffe.TRAIN)
    assert net.blobs["conv16"].shape == (1, 1, 32, 32)
    net.blobs["data"].data[...] = RNG.standard_normal((1, 3, 128, 128))
    net.blobs["seg_label"].data[...] = RNG.random((1, 1, 32, 32)) > 0.9
    out = net.forward()
    assert set(out) == {"Seg_loss"} and out["Seg_loss"] > 0
    net.backward()
    assert np.abs(net.params["conv16"][0].diff).max() > 0


def test_lane_data_bad_parameters(tmp_path: Path) -> None:
    body = ('layer { name: "data" type: "LaneData" top: "data" top: "label" top: "seg" '
            'data_param { source: "db" batch_size: 2 } '
            'annotated_data_param { yolo_data_type: 1 } }\n')
    with pytest.raises(NetError, match="layer 'data' \\(LaneData\\).*needs transform_param"):
        build(tmp_path, body, {})
    (tmp_path / "db").mkdir()
    body = body.replace("yolo_data_type: 1", "yolo_data_type: 0")
    with pytest.raises(NetError, match="reading LaneData records is not supported"):
        build(tmp_path, body, {})


# -- AnnotatedData yolo_data_type --------------------------------------------------------------

def annotated_db(path: Path, count: int, size: tuple[int, int] = (24, 32)) -> None:
    """PNG-encoded AnnotatedDatum records with a box of group 1 and a difficult one of
    group 3."""
    import lmdb
    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i in range(count):
            record = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
            image = RNG.integers(0, 256, (*size, 3), dtype=np.uint8)
            record.datum.data = cv2.imencode(".png", image)[1].tobytes()
            record.datum.encoded = True
            for group, box, difficult in ((1, (0.1, 0.2, 0.5, 0.6), False),
                                          (3, (0.5, 0.25, 0.75, 0.75), True)):
                a = record.annotation_group.add(group_label=group).annotation.add(instance_id=i)
                a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax = box
                a.bbox.difficult = difficult
            txn.put(f"{i:08d}".encode(), record.SerializeToString())
    env.close()


def yolo_data_net(tmp_path: Path, yolo: str, phase=caffe.TEST) -> caffe.Net:
    path = tmp_path / "data.prototxt"
    path.write_text('layer { name: "data" type: "AnnotatedData" top: "data" top: "label" '
                    'transform_param { resize_param { height: 16 width: 16 } } '
                    'data_param { source: "db" batch_size: 2 backend: LMDB } '
                    f'annotated_data_param {{ {yolo} }} }}\n')
    return caffe.Net(str(path), phase)


@pytest.mark.parametrize("difficult", [False, True])
def test_annotated_data_yolo_rows(difficult: bool, tmp_path: Path) -> None:
    """yolo_data_type 1: (N, 1, 300, 5) rows [group_label - 1, cx, cy, w, h], zeros after;
    difficult boxes only with train_diffcult. Jitter 0 crops nothing."""
    annotated_db(tmp_path / "db", 2)
    extra = "train_diffcult: true" if difficult else ""
    net = yolo_data_net(tmp_path, f"yolo_data_type: 1 yolo_data_jitter: 0 {extra}")
    assert net.blobs["label"].shape == (2, 1, 300, 5)
    net.forward()
    label = net.blobs["label"].data
    expected = [[0, 0.3, 0.4, 0.4, 0.4]] + ([[2, 0.625, 0.5, 0.25, 0.5]] if difficult else [])
    for item in range(2):
        np.testing.assert_allclose(label[item, 0, :len(expected)], expected, rtol=1e-6)
        assert not label[item, 0, len(expected):].any()


def test_annotated_data_yolo_jitter_crops_and_keeps_boxes_valid(tmp_path: Path) -> None:
    annotated_db(tmp_path / "db", 4)
    runs = []
    for _ in range(2):
        caffe.set_random_seed(3)
        net = yolo_data_net(tmp_path, "yolo_data_type: 1 yolo_data_jitter: 0.6", caffe.TRAIN)
        labels = []
        for _ in range(4):
            net.forward()
            rows = net.blobs["label"].data[:, 0, 0]
            assert ((rows[:, 1:3] - rows[:, 3:5] / 2 >= -1e-6)
                    & (rows[:, 1:3] + rows[:, 3:5] / 2 <= 1 + 1e-6)).all()
            assert (rows[:, 3:5] > 0).all() and (rows[:, 0] == 0).all()
            labels.append(rows.copy())
        runs.append(np.stack(labels))
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], [0, 0.3, 0.4, 0.4, 0.4]), "some image should be cropped"


@pytest.mark.parametrize("yolo,message", [("yolo_data_type: 2", "must be 0"),
                                          ("yolo_data_jitter: 1.5", "in \\[0, 1\\)"),
                                          ("seg_scales: 4", "seg_scales .*not supported")])
def test_annotated_data_yolo_bad_parameters(yolo: str, message: str, tmp_path: Path) -> None:
    annotated_db(tmp_path / "db", 1)
    with pytest.raises(NetError, match=f"layer 'data' \\(AnnotatedData\\).*{message}"):
        yolo_data_net(tmp_path, yolo)
