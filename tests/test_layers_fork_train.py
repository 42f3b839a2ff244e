"""Training-side fork layers without golden cases: R-FCN's OHEM layers, SphereFace's
MarginInnerProduct, HED's ImageLabelmapData and FaceBoxes' PriorBox.

Each test writes the fork's definition out (its source file is named in the docstring) and
compares forward values on seeded random inputs, and backward against autograd or the
fork's hand-written gradient; the corpus nets that use these layers fail only for the
files the corpus does not ship.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch import CaffeError, NetError
from caffe2torch.forks import using_fork
from conftest import shared_dir
from prototxt import inputs, layer

FLT_MIN = np.finfo(np.float32).tiny
CORPUS = "corpus/repos"


def make_net(tmp_path: Path, body: str, phase=caffe.TRAIN) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text('name: "t"\nforce_backward: true\n' + body)
    return caffe.Net(str(path), phase)


def run(net: caffe.Net, backward: bool = True, **values: np.ndarray) -> caffe.Net:
    for name, value in values.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.reshape()
    net.forward()
    if backward:
        net.backward()
    return net


def expect_error(tmp_path: Path, body: str, *fragments: str, phase=caffe.TRAIN) -> None:
    """Building the net fails with a NetError naming layer 'L' and every fragment."""
    with pytest.raises(NetError) as info:
        make_net(tmp_path, body, phase)
    message = str(info.value)
    assert "layer 'L'" in message, message
    for fragment in fragments:
        assert fragment in message, message


def corpus_net(path: str, phase=caffe.TRAIN) -> caffe.Net:
    return caffe.Net(str(shared_dir() / CORPUS / path), phase)


# == R-FCN OHEM ============================================================================
OHEM_NET = "soeaver__caffe-model/det/rfcn/models/pascal_voc/resnet18/" \
           "rfcn_voc_resnet18-priv-merge-ohem.prototxt"
MODES = {"VALID": "", "FULL": "normalization: FULL", "BATCH_SIZE": "normalization: BATCH_SIZE",
         "NONE": "normalization: NONE",
         "PRE_FIXED": "normalization: PRE_FIXED pre_fixed_normalizer: 4"}


def softmax_ohem_reference(x: np.ndarray, label: np.ndarray, ignore: int, mode: str):
    """softmax_loss_ohem_layer.cu: per-RoI ``-log(max(p[label], FLT_MIN))`` (0 where the label
    is ignored), loss = their sum / normalizer, gradient ``(p - onehot) * valid / normalizer``."""
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    valid = label != ignore
    index = np.where(valid, label, 0).astype(int)
    picked = p[np.arange(len(x)), index]
    per_roi = np.where(valid, -np.log(np.maximum(picked, FLT_MIN)), 0)
    normalizer = {"VALID": valid.sum(), "FULL": len(x), "BATCH_SIZE": len(x), "NONE": 1,
                  "PRE_FIXED": 4}[mode]
    normalizer = max(1.0, normalizer)
    grad = p.copy()
    grad[np.arange(len(x)), index] -= 1
    grad *= valid[:, None] / normalizer
    return per_roi.sum() / normalizer, p, per_roi, grad


@pytest.mark.parametrize("mode", sorted(MODES))
def test_softmax_loss_ohem_tops_and_gradient(mode: str, tmp_path: Path) -> None:
    """Three tops (loss, probabilities, per-RoI loss shaped like the labels) and
    SoftmaxWithLoss's gradient, for every normalization mode (R-FCN's PRE_FIXED too)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9, 5)) * 3
    label = rng.integers(-1, 5, 9).astype(np.float64)
    body = inputs(x=(9, 5), label=(9,)) + layer(
        "SoftmaxWithLossOHEM", ["x", "label"], ["loss", "prob", "per_roi"],
        f"loss_param {{ ignore_label: -1 {MODES[mode]} }}")
    net = run(make_net(tmp_path, body), x=x, label=label)
    loss, prob, per_roi, grad = softmax_ohem_reference(x, label, -1, mode)
    np.testing.assert_allclose(net.blobs["loss"].data, loss, rtol=1e-5)
    np.testing.assert_allclose(net.blobs["prob"].data, prob, rtol=1e-5, atol=1e-7)
    assert net.blobs["per_roi"].data.shape == (9,)
    np.testing.assert_allclose(net.blobs["per_roi"].data, per_roi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["x"].diff, grad, rtol=1e-5, atol=1e-7)


def test_softmax_loss_ohem_gradcheck(tmp_path: Path) -> None:
    """Its backward is the derivative of its loss (autograd's gradcheck, float64)."""
    body = inputs(x=(6, 4), label=(6,)) + layer(
        "SoftmaxWithLossOHEM", ["x", "label"], ["loss", "prob", "per_roi"],
        "loss_param { ignore_label: 3 }")
    module = make_net(tmp_path, body).module.layers["L"].double()
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2),
                    requires_grad=True)
    label = torch.tensor([0., 1, 2, 3, 1, 0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: module(v, label)[0], (x,))


def smooth_l1_ohem_reference(pred, target, weight, normalizer):
    """smooth_L1_loss_ohem_layer.cu: ``d = w (b0 - b1)``, ``f = 0.5 d^2`` (|d| < 1) else
    ``|d| - 0.5``; loss ``sum f / normalizer``; per-RoI loss: f summed over channels, (N, 1,
    H, W); gradient of b0 ``f'(d) / normalizer`` with no factor ``w``."""
    d = pred - target if weight is None else weight * (pred - target)
    f = np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5)
    slope = np.where(np.abs(d) < 1, d, np.sign(d))
    return f.sum() / normalizer, f.sum(1, keepdims=True), slope / normalizer


@pytest.mark.parametrize("mode,shape,weighted", [
    ("VALID", (7, 8), True), ("BATCH_SIZE", (3, 4, 2, 5), False), ("NONE", (7, 8), False),
    ("PRE_FIXED", (3, 4, 2, 5), True), ("FULL", (3, 4, 2, 5), True)])
def test_smooth_l1_loss_ohem(mode: str, shape, weighted: bool, tmp_path: Path) -> None:
    """Normalizers (VALID and FULL: N*H*W, BATCH_SIZE: N, PRE_FIXED, NONE), the per-RoI top
    and the fork's gradient (no chain factor of the weights; targets get the negative)."""
    rng = np.random.default_rng(3)
    pred, target = rng.standard_normal(shape) * 2, rng.standard_normal(shape)
    weight = (rng.random(shape) > 0.4).astype(np.float64) * 3 if weighted else None
    feed = {"p": pred, "t": target} | ({"w": weight} if weighted else {})
    body = inputs(**{k: v.shape for k, v in feed.items()}) + layer(
        "SmoothL1LossOHEM", list(feed), ["loss", "per_roi"],
        f"loss_param {{ {MODES[mode]} }} propagate_down: true propagate_down: true"
        + (" propagate_down: false" if weighted else ""))
    net = run(make_net(tmp_path, body), **feed)
    num = shape[0]
    spatial = math.prod(shape[2:])
    normalizer = {"VALID": num * spatial, "FULL": num * spatial, "BATCH_SIZE": num, "NONE": 1,
                  "PRE_FIXED": 4}[mode]
    expanded = (num, shape[1], *shape[2:]) if len(shape) > 2 else (num, shape[1], 1, 1)
    loss, per_roi, grad = smooth_l1_ohem_reference(
        pred.reshape(expanded), target.reshape(expanded),
        None if weight is None else weight.reshape(expanded), normalizer)
    np.testing.assert_allclose(net.blobs["loss"].data, loss, rtol=1e-5)
    assert net.blobs["per_roi"].data.shape == (num, 1, *expanded[2:])
    np.testing.assert_allclose(net.blobs["per_roi"].data, per_roi, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["p"].diff, grad.reshape(shape), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(net.blobs["t"].diff, -grad.reshape(shape), rtol=1e-5, atol=1e-7)


def test_smooth_l1_loss_ohem_unweighted_gradcheck(tmp_path: Path) -> None:
    """Without weights the fork's backward is the derivative of its loss (float64)."""
    body = inputs(p=(5, 4), t=(5, 4)) + layer("SmoothL1LossOHEM", ["p", "t"], ["loss"])
    module = make_net(tmp_path, body).module.layers["L"].double()
    gen = torch.Generator().manual_seed(4)
    pred = (torch.randn(5, 4, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    target = torch.randn(5, 4, dtype=torch.float64, generator=gen).requires_grad_()
    assert torch.autograd.gradcheck(module, (pred, target))


def annotate_reference(rois, loss, labels, weights, roi_per_img, ignore):
    """box_annotator_ohem_layer.cu: visit RoIs by descending loss; each image keeps its first
    ``roi_per_img``, whose label and bbox weights pass; the others get ``ignore`` and 0."""
    out_labels = np.full_like(labels, ignore)
    out_weights = np.zeros_like(weights)
    left = {}
    for i in sorted(range(len(loss)), key=lambda k: -loss[k]):
        image = int(rois[i, 0])
        left.setdefault(image, roi_per_img)
        if left[image] > 0:
            left[image] -= 1
            out_labels[i] = labels[i]
            out_weights[i] = weights[i]
    return out_labels, out_weights


def test_box_annotator_ohem_keeps_the_hardest_rois_per_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    count = 40
    rois = np.column_stack([rng.integers(0, 3, count), rng.random((count, 4)) * 100])
    loss = rng.random(count)
    labels = rng.integers(0, 4, count).astype(np.float64)
    weights = rng.random((count, 8))
    body = inputs(rois=(count, 5), loss=(count,), labels=(count,), w=(count, 8)) + layer(
        "BoxAnnotatorOHEM", ["rois", "loss", "labels", "w"], ["labels_ohem", "w_ohem"],
        "box_annotator_ohem_param { roi_per_img: 6 ignore_label: -3 }")
    net = run(make_net(tmp_path, body), backward=False, rois=rois, loss=loss, labels=labels,
              w=weights)
    want_labels, want_weights = annotate_reference(rois, loss, labels, weights, 6, -3)
    assert net.blobs["labels_ohem"].data.shape == (count, 1, 1, 1)
    assert net.blobs["w_ohem"].data.shape == (count, 8, 1, 1)
    np.testing.assert_array_equal(net.blobs["labels_ohem"].data.ravel(), want_labels)
    np.testing.assert_allclose(net.blobs["w_ohem"].data.reshape(count, 8), want_weights,
                               rtol=1e-6)
    per_image = [(want_labels[rois[:, 0] == n] != -3).sum() for n in range(3)]
    assert per_image == [min(6, (rois[:, 0] == n).sum()) for n in range(3)]


def test_box_annotator_ohem_ties_keep_index_order(tmp_path: Path) -> None:
    """Equal losses (std::sort leaves their order unspecified) are visited by index."""
    rois = np.zeros((5, 5))
    body = inputs(rois=(5, 5), loss=(5,), labels=(5,), w=(5, 4)) + layer(
        "BoxAnnotatorOHEM", ["rois", "loss", "labels", "w"], ["l", "w2"],
        "box_annotator_ohem_param { roi_per_img: 2 }")
    net = run(make_net(tmp_path, body), backward=False, rois=rois, loss=np.ones(5),
              labels=np.arange(1.0, 6.0), w=np.ones((5, 4)))
    np.testing.assert_array_equal(net.blobs["l"].data.ravel(), [1, 2, -1, -1, -1])


OHEM_ERRORS = [
    (inputs(r=(4, 5), l=(4,), c=(4,), w=(4, 8)), "", "roi_per_img is required"),
    (inputs(r=(4, 5), l=(4,), c=(4,), w=(4, 8)), "box_annotator_ohem_param { roi_per_img: 0 }",
     "roi_per_img must be positive"),
    (inputs(r=(4, 4), l=(4,), c=(4,), w=(4, 8)), "box_annotator_ohem_param { roi_per_img: 2 }",
     "must have 5 channels"),
    (inputs(r=(4, 5), l=(3,), c=(4,), w=(4, 8)), "box_annotator_ohem_param { roi_per_img: 2 }",
     "per-RoI loss (bottom 1) must be 4 x 1 x 1 x 1"),
]


@pytest.mark.parametrize("shapes,param,fragment", OHEM_ERRORS)
def test_error_box_annotator_ohem(shapes, param, fragment, tmp_path: Path) -> None:
    body = shapes + layer("BoxAnnotatorOHEM", ["r", "l", "c", "w"], ["a", "b"], param)
    expect_error(tmp_path, body, "(BoxAnnotatorOHEM)", fragment)


def test_error_ohem_losses(tmp_path: Path) -> None:
    expect_error(tmp_path, inputs(p=(4, 8), t=(4, 6)) + layer(
        "SmoothL1LossOHEM", ["p", "t"], ["loss"]), "bottom 1 must match bottom 0")
    expect_error(tmp_path, inputs(x=(4, 3), l=(4,)) + layer(
        "SoftmaxWithLossOHEM", ["x", "l"], ["a", "b", "c", "d"]), "expects 0 to 3 top")
    expect_error(tmp_path, inputs(p=(4, 8), t=(4, 8), w=(4, 8), v=(4, 8)) + layer(
        "SmoothL1LossOHEM", ["p", "t", "w", "v"], ["loss"]), "expects 2 to 3 bottom")


def test_rfcn_ohem_corpus_net_needs_its_python_layers() -> None:
    with pytest.raises(CaffeError, match="python_param module|No module named"):
        corpus_net(OHEM_NET)


def test_rfcn_ohem_head_of_the_corpus_net_runs(tmp_path: Path) -> None:
    """The corpus net's OHEM head, its layers copied as they are, behind Input layers that
    stand in for the Python data layers: the kept RoIs are the 128 hardest of each image and
    both losses see only them."""
    text = (shared_dir() / CORPUS / OHEM_NET).read_text()
    head = text[text.index("################  online hard example mining"):]
    count, rng = 300, np.random.default_rng(6)
    feed = {"cls_score": rng.standard_normal((count, 21, 1, 1)) * 2,
            "bbox_pred": rng.standard_normal((count, 8, 1, 1)),
            "labels": rng.integers(0, 21, (count, 1, 1, 1)).astype(np.float64),
            "bbox_targets": rng.standard_normal((count, 8)),
            "bbox_inside_weights": (rng.random((count, 8)) > 0.5).astype(np.float64),
            "bbox_outside_weights": np.ones((count, 8)),
            "rois": np.column_stack([rng.integers(0, 2, count), rng.random((count, 4)) * 500])}
    net = run(make_net(tmp_path, inputs(**{k: v.shape for k, v in feed.items()}) + head),
              **feed)
    per_roi = net.blobs["per_roi_loss"].data.ravel()
    _, _, cls_loss, _ = softmax_ohem_reference(feed["cls_score"][:, :, 0, 0],
                                               feed["labels"].ravel(), -1, "VALID")
    per_roi_bbox = smooth_l1_ohem_reference(
        feed["bbox_pred"][:, :, 0, 0], feed["bbox_targets"], feed["bbox_inside_weights"], 1)[1]
    np.testing.assert_allclose(per_roi, cls_loss + per_roi_bbox.ravel(), rtol=1e-5)
    keep = net.blobs["labels_ohem"].data.ravel() != -1
    for image in (0, 1):
        mine = feed["rois"][:, 0] == image
        assert keep[mine].sum() == 128
        assert per_roi[mine & keep].min() >= per_roi[mine & ~keep].max()
    want = softmax_ohem_reference(feed["cls_score"][:, :, 0, 0],
                                  np.where(keep, feed["labels"].ravel(), -1), -1, "VALID")
    np.testing.assert_allclose(net.blobs["loss_cls"].data, want[0], rtol=1e-5)
    np.testing.assert_allclose(net.blobs["cls_score"].diff[:, :, 0, 0], want[3], rtol=1e-4,
                               atol=1e-7)
    weights = feed["bbox_inside_weights"] * keep[:, None]
    bbox = smooth_l1_ohem_reference(feed["bbox_pred"][:, :, 0, 0], feed["bbox_targets"],
                                    weights, 128)
    np.testing.assert_allclose(net.blobs["loss_bbox"].data, bbox[0], rtol=1e-5)
    np.testing.assert_allclose(net.blobs["bbox_pred"].diff[:, :, 0, 0], bbox[2], rtol=1e-5,
                               atol=1e-8)


# == SphereFace MarginInnerProduct =========================================================
SPHEREFACE_NET = "wy1iu__sphereface/train/code/sphereface_model.prototxt"
MARGINS = {"SINGLE": 1, "DOUBLE": 2, "TRIPLE": 3, "QUADRUPLE": 4}


def psi(cos: np.ndarray, m: int) -> np.ndarray:
    """The A-Softmax paper's ``psi(theta) = (-1)^k cos(m theta) - 2k``, ``k = floor(m theta /
    pi)``, from the angle itself (the fork computes it with sign-switched polynomials)."""
    theta = np.arccos(np.clip(cos, -1, 1))
    k = np.floor(m * theta / np.pi)
    return (-1) ** k * np.cos(m * theta) - 2 * k


def fork_coefficients(cos: np.ndarray, x_norm: np.ndarray, m: int):
    """margin_inner_product_layer.cu, Margin_bottom_*_backward_gpu: the weights of ``w_y``
    and of ``x`` in the label column's gradient, before the fork scales them to unit length."""
    s0 = np.sign(cos)
    if m == 2:
        return 4 * s0 * cos, -(2 * s0 * cos ** 2 + 1) / x_norm
    if m == 3:
        s1 = np.sign(np.abs(cos) - 0.5)
        s2 = s0 * (1 + s1) - 2
        return s1 * (12 * cos ** 2 - 3), -(8 * s1 * cos ** 3 - s2) / x_norm
    s3 = s0 * np.sign(2 * cos ** 2 - 1)
    s4 = 2 * s0 + s3 - 3
    return s3 * (32 * cos ** 3 - 16 * cos), \
        -(s3 * (24 * cos ** 4 - 8 * cos ** 2 - 1) - s4) / x_norm


def margin_reference(x, w, label, m, lam, top_diff):
    """The fork's MarginInnerProduct on unit-row ``w``: logits, bottom and weight gradients."""
    rows = np.arange(len(x))
    x_norm = np.linalg.norm(x, axis=1)
    logits = x @ w.T
    cos = logits[rows, label] / x_norm
    grad_x = top_diff @ w
    if m > 1:
        logits[rows, label] = (lam * logits[rows, label] + x_norm * psi(cos, m)) / (1 + lam)
        cw, cx = fork_coefficients(cos, x_norm, m)
        length = np.sqrt(cw ** 2 + cx ** 2)
        diff = top_diff[rows, label]
        grad_x += (diff * (lam / (1 + lam) - 1))[:, None] * w[label]
        grad_x += (diff / (1 + lam) / length)[:, None] * (cw[:, None] * w[label] + cx[:, None] * x)
    return logits, grad_x, top_diff.T @ x


def margin_net(tmp_path: Path, kind: str, m_shape=(6, 5), classes=4, extra="",
               tops=("y", "lambda")) -> caffe.Net:
    body = inputs(x=m_shape, label=(m_shape[0],)) + layer(
        "MarginInnerProduct", ["x", "label"], list(tops),
        f"margin_inner_product_param {{ num_output: {classes} type: {kind} {extra} "
        f"weight_filler {{ type: 'gaussian' std: 1 }} }}")
    return make_net(tmp_path, body)


@pytest.mark.parametrize("kind", sorted(MARGINS))
def test_margin_inner_product_forward_and_backward(kind: str, tmp_path: Path) -> None:
    """Logits with the label's replaced by ``(lambda x.w_y + |x| psi) / (1 + lambda)`` on
    the weight rows rescaled in place to unit length; the fork's backward."""
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((4, 5)) * 3
    label = rng.integers(0, 4, 6)
    net = margin_net(tmp_path, kind, extra="base: 2 gamma: 0.5 power: 1.5 iteration: 3")
    net.params["L"][0].data[...] = w
    run(net, backward=False, x=x, label=label.astype(np.float64))
    lam = float(np.float32(2) * np.float32(1 + 0.5 * 4) ** np.float32(-1.5))
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(net.params["L"][0].data, unit, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["lambda"].data, [lam], rtol=1e-6)
    top_diff = rng.standard_normal((6, 4))
    net.backward(y=top_diff)
    logits, grad_x, grad_w = margin_reference(x, unit, label, MARGINS[kind], lam, top_diff)
    np.testing.assert_allclose(net.blobs["y"].data, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net.blobs["x"].diff, grad_x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.params["L"][0].diff, grad_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["DOUBLE", "TRIPLE", "QUADRUPLE"])
def test_margin_gradient_points_along_the_true_derivative(kind: str, tmp_path: Path) -> None:
    """With lambda 0 the label column's gradient is d(|x| psi(theta))/dx (autograd on the
    paper's psi, float64) scaled by one positive number per sample: the fork's unit-length
    rescaling of its two coefficients."""
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((6, 5)), rng.standard_normal((4, 5))
    label = rng.integers(0, 4, 6)
    net = margin_net(tmp_path, kind, extra="base: 0")
    net.params["L"][0].data[...] = w
    run(net, backward=False, x=x, label=label.astype(np.float64))
    assert float(net.blobs["lambda"].data[0]) == 0
    top_diff = np.zeros((6, 4))
    top_diff[np.arange(6), label] = 1
    net.backward(y=top_diff)
    ours = net.blobs["x"].diff.astype(np.float64)
    xt = torch.tensor(x, requires_grad=True)
    wy = torch.tensor(w / np.linalg.norm(w, axis=1, keepdims=True))[label]
    cos = (xt * wy).sum(1) / xt.norm(dim=1)
    m = MARGINS[kind]
    k = torch.floor(m * torch.acos(cos.detach()) / math.pi)
    value = xt.norm(dim=1) * ((-1) ** k * torch.cos(m * torch.acos(cos)) - 2 * k)
    true = torch.autograd.grad(value.sum(), xt)[0].numpy()
    scale = (true * ours).sum(1) / (ours * ours).sum(1)
    assert (scale > 0).all()
    np.testing.assert_allclose(ours * scale[:, None], true, rtol=1e-4, atol=1e-5)


def test_margin_inner_product_single_gradcheck(tmp_path: Path) -> None:
    """SINGLE is a plain inner product with unit weight rows: its input gradient is the
    derivative (gradcheck, float64)."""
    module = margin_net(tmp_path, "SINGLE", tops=("y",)).module.layers["L"].double()
    x = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(9),
                    requires_grad=True)
    label = torch.tensor([0., 1, 2, 3, 0, 1], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: module(v, label), (x,))


def test_margin_lambda_schedule(tmp_path: Path) -> None:
    """Each forward adds one to the iteration before ``lambda = max(lambda_min, base * (1 +
    gamma * iter)^-power)``, in float (the corpus net's schedule)."""
    net = margin_net(tmp_path, "QUADRUPLE",
                     extra="base: 1000 gamma: 0.12 power: 1 lambda_min: 5 iteration: 1656")
    x, label = np.ones((6, 5)), np.zeros(6)
    seen = []
    for _ in range(3):
        run(net, backward=False, x=x, label=label)
        seen.append(float(net.blobs["lambda"].data[0]))
    f32 = np.float32
    want = [max(f32(5), f32(1000) * (f32(1) + f32(0.12) * f32(t)) ** f32(-1))
            for t in (1657, 1658, 1659)]
    np.testing.assert_allclose(seen, want, rtol=1e-6)
    assert seen[-1] == 5.0 and seen[0] > 5
    assert net.module.layers["L"].iteration == 1659


MARGIN_ERRORS = [
    ("num_output: 0", (6, 5), (6,), "num_output must be positive"),
    ("num_output: 4", (6, 5), (5,), "number of labels must match"),
    ("num_output: 4 axis: 2", (6, 5), (6,), "axis 2 is out of range"),
]


@pytest.mark.parametrize("param,x_shape,label_shape,fragment", MARGIN_ERRORS)
def test_error_margin_inner_product(param, x_shape, label_shape, fragment, tmp_path: Path):
    body = inputs(x=x_shape, label=label_shape) + layer(
        "MarginInnerProduct", ["x", "label"], ["y"], f"margin_inner_product_param {{ {param} }}")
    expect_error(tmp_path, body, "(MarginInnerProduct)", fragment)


def test_error_margin_label_out_of_range(tmp_path: Path) -> None:
    net = margin_net(tmp_path, "DOUBLE")
    with pytest.raises(NetError, match=r"layer 'L'.*label 4 out of range"):
        run(net, backward=False, x=np.ones((6, 5)), label=np.array([0, 1, 2, 3, 4, 0.]))


def test_sphereface_corpus_net_needs_its_image_list() -> None:
    for phase in (caffe.TRAIN, caffe.TEST):
        with pytest.raises(CaffeError, match="CASIA-WebFace-112X96.txt' does not exist"):
            corpus_net(SPHEREFACE_NET, phase)


def test_sphereface_corpus_net_trains_behind_an_input_layer(tmp_path: Path) -> None:
    """The corpus SphereFace-20 with its ImageData replaced by Input layers (and 7 classes
    instead of CASIA's 10572): forward and backward run; lambda follows the net's schedule
    and fc6's weight rows have unit length after the forward."""
    text = (shared_dir() / CORPUS / SPHEREFACE_NET).read_text()
    body = text[text.index("############## CNN Architecture"):]
    body = body.replace("num_output: 10572", "num_output: 7")
    net = make_net(tmp_path, inputs(data=(2, 3, 112, 96), label=(2,)) + body)
    rng = np.random.default_rng(10)
    run(net, data=rng.standard_normal((2, 3, 112, 96)), label=np.array([3.0, 6.0]))
    assert np.isfinite(net.blobs["softmax_loss"].data).all()
    assert net.blobs["lambda"].data[0] == pytest.approx(1000 / 1.12, rel=1e-6)
    np.testing.assert_allclose(np.linalg.norm(net.params["fc6"][0].data, axis=1), 1, rtol=1e-5)
    assert np.abs(net.params["conv1_1"][0].diff).sum() > 0


# == HED ImageLabelmapData =================================================================
HED_NET = "s9xie__hed/examples/hed/train_val.prototxt"
HED_MEAN = np.array([104.00699, 116.66877, 122.67892], np.float32)


def labelmap_list(tmp_path: Path, count: int, size=(6, 8), gt_size=None) -> list[tuple]:
    """``count`` colour images and gray edge maps written with cv2.imwrite, and their list."""
    rng = np.random.default_rng(11)
    pairs, lines = [], []
    for i in range(count):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        gt = rng.integers(0, 256, gt_size or size, dtype=np.uint8)
        gt.flat[:4] = [0, 127, 128, 255]
        cv2.imwrite(str(tmp_path / f"img{i}.png"), image)
        cv2.imwrite(str(tmp_path / f"gt{i}.png"), gt)
        pairs.append((image, gt))
        lines.append(f"img{i}.png gt{i}.png")
    (tmp_path / "pairs.lst").write_text("\n".join(lines) + "\n")
    return pairs


def labelmap_net(tmp_path: Path, params: str = "", transform: str = "",
                 phase=caffe.TEST) -> caffe.Net:
    mean = " ".join(f"mean_value: {v}" for v in HED_MEAN)
    body = layer("ImageLabelmapData", [], ["data", "label"],
                 f'transform_param {{ {mean} {transform} }} image_data_param {{ root_folder: '
                 f'"{tmp_path}/" source: "pairs.lst" {params} }}')
    return make_net(tmp_path, body, phase)


def hed_image(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """LocTransform without crop or mirror: ``(pixel - mean) * scale`` per BGR channel."""
    return (image.transpose(2, 0, 1).astype(np.float32) - HED_MEAN[:, None, None]) * \
        np.float32(scale)


def hed_label(gt: np.ndarray) -> np.ndarray:
    """image_labelmap_data_layer.cpp: ``cv_gt / 255`` on uchar rounds, so >= 128 gives 1."""
    return (gt >= 128).astype(np.float32)[None]


def test_image_labelmap_data_reads_pairs(tmp_path: Path) -> None:
    """Images minus the mean (times scale) and 0/1 edge maps, in list order, wrapping."""
    pairs = labelmap_list(tmp_path, 3)
    net = labelmap_net(tmp_path, "batch_size: 2", "scale: 0.5")
    assert net.blobs["data"].data.shape == (2, 3, 6, 8)
    assert net.blobs["label"].data.shape == (2, 1, 6, 8)
    for order in ([0, 1], [2, 0]):
        net.forward()
        for slot, i in enumerate(order):
            np.testing.assert_allclose(net.blobs["data"].data[slot],
                                       hed_image(pairs[i][0], 0.5), rtol=1e-6)
            np.testing.assert_array_equal(net.blobs["label"].data[slot], hed_label(pairs[i][1]))
    assert net.blobs["label"].data[1, 0, 0, :4].tolist() == [0, 0, 1, 1]


def test_image_labelmap_data_resizes_both_linearly(tmp_path: Path) -> None:
    """new_height/new_width: image and raw map resized with INTER_LINEAR, then the map / 255."""
    pairs = labelmap_list(tmp_path, 1, size=(9, 7))
    net = labelmap_net(tmp_path, "new_height: 5 new_width: 4")
    net.forward()
    image, gt = pairs[0]
    np.testing.assert_allclose(net.blobs["data"].data[0],
                               hed_image(cv2.resize(image, (4, 5))), rtol=1e-6)
    resized = cv2.resize(gt, (4, 5), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(net.blobs["label"].data[0], hed_label(resized))


@pytest.mark.parametrize("phase", [caffe.TRAIN, caffe.TEST])
def test_image_labelmap_data_crops_and_mirrors_image_and_map_alike(phase, tmp_path) -> None:
    """One random crop (random also at TEST, LocTransform ignores the phase) and one random
    mirror, applied to the image and its map alike."""
    pairs = labelmap_list(tmp_path, 1, size=(7, 9))
    image, gt = pairs[0]
    full = hed_image(image)
    net = labelmap_net(tmp_path, "", "crop_size: 4 mirror: true", phase)
    seen = set()
    for _ in range(25):
        net.forward()
        data, label = net.blobs["data"].data[0], net.blobs["label"].data[0]
        found = [(top, left, flip) for top in range(4) for left in range(6) for flip in (0, 1)
                 if np.allclose(data, (full[:, top:top + 4, left:left + 4])[..., ::-1 if flip
                                                                          else 1])]
        assert len(found) == 1
        top, left, flip = found[0]
        want = hed_label(gt)[:, top:top + 4, left:left + 4]
        np.testing.assert_array_equal(label, want[..., ::-1] if flip else want)
        seen.add(found[0])
    assert len({s[:2] for s in seen}) > 1 and len({s[2] for s in seen}) == 2


def test_image_labelmap_data_errors(tmp_path: Path) -> None:
    labelmap_list(tmp_path, 1, size=(6, 8), gt_size=(6, 7))
    body = layer("ImageLabelmapData", [], ["data", "label"],
                 f'image_data_param {{ root_folder: "{tmp_path}/" source: "pairs.lst" }}')
    expect_error(tmp_path, body, "(ImageLabelmapData)", "ground truth size must equal")
    expect_error(tmp_path, body.replace("pairs.lst", "none.lst"),
                 "image_data_param.source 'none.lst' does not exist")
    expect_error(tmp_path, body.replace("source:", "new_height: 4 source:"),
                 "new_height and new_width must be set together")
    expect_error(tmp_path, body.replace("image_data_param", "transform_param { crop_size: 2 "
                                        "mean_file: 'm.binaryproto' } image_data_param"),
                 "mean_file with a crop is not supported")


def test_hed_corpus_net_needs_its_image_list() -> None:
    for phase in (caffe.TRAIN, caffe.TEST):
        with pytest.raises(CaffeError, match="train_pair.lst' does not exist"):
            corpus_net(HED_NET, phase)


# == FaceBoxes PriorBox ====================================================================
FACEBOXES_NET = "sfzhang15__FaceBoxes/models/faceboxes/deploy.prototxt"
FB_VARIANCE = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"


def faceboxes_priors(feat_hw, img_hw, min_sizes, step, max_sizes=(), ratios=()) -> np.ndarray:
    """sfzhang15/FaceBoxes prior_box_layer.cpp, Forward_cpu, loop by loop with its float
    (``center_x``, box sizes) and double (``(box_width - 1) / 2.``) arithmetic; channel 0."""
    f32 = np.float32
    out = []
    for h in range(feat_hw[0]):
        for w in range(feat_hw[1]):
            cx, cy = (f32(w) + f32(0.5)) * f32(step), (f32(h) + f32(0.5)) * f32(step)
            for s, size in enumerate(min_sizes):
                side, gap = {32: (4, 8), 64: (2, 16)}.get(int(size), (1, 0))
                half = (float(f32(int(size))) - 1) / 2.
                for i in range(-(side // 2), side - side // 2):
                    for j in range(-(side // 2), side - side // 2):
                        x, y = float(cx + f32(j * gap)), float(cy + f32(i * gap))
                        out += [(x - half) / img_hw[1], (y - half) / img_hw[0],
                                (x + half) / img_hw[1], (y + half) / img_hw[0]]
                extra = []
                if max_sizes:
                    extra.append((float(f32(math.sqrt(int(size) * int(max_sizes[s])))),) * 2)
                for ar in ratios:
                    root = np.sqrt(f32(ar))
                    extra.append((float(f32(int(size)) * root), float(f32(int(size)) / root)))
                for bw, bh in extra:
                    out += [(float(cx) - bw / 2.) / img_hw[1], (float(cy) - bh / 2.) / img_hw[0],
                            (float(cx) + bw / 2.) / img_hw[1], (float(cy) + bh / 2.) / img_hw[0]]
    return np.array(out, np.float32)


def prior_net(tmp_path: Path, param: str, feat_hw=(2, 3), img_hw=(64, 96)) -> caffe.Net:
    body = inputs(f=(1, 4, *feat_hw), im=(1, 3, *img_hw)) + layer(
        "PriorBox", ["f", "im"], ["p"], f"prior_box_param {{ {param} }}")
    return make_net(tmp_path, body, caffe.TEST)


@pytest.mark.parametrize("param,sizes", [
    ("min_size: 32 min_size: 64 min_size: 128 step: 32", dict(min_sizes=(32, 64, 128), step=32)),
    ("min_size: 256 step: 64", dict(min_sizes=(256,), step=64)),
    ("min_size: 100 max_size: 150 aspect_ratio: 2 flip: false step: 16",
     dict(min_sizes=(100,), step=16, max_sizes=(150,), ratios=(2,))),
])
def test_faceboxes_prior_box(param: str, sizes: dict, tmp_path: Path) -> None:
    """FaceBoxes' densified anchors (21 per location for its 3-size layer) and
    ``(size - 1) / 2`` half extents, under ``using_fork("faceboxes")``."""
    with using_fork("faceboxes"):
        net = prior_net(tmp_path, f"{param} clip: false offset: 0.5 {FB_VARIANCE}")
    net.forward()
    want = faceboxes_priors((2, 3), (64, 96), **sizes)
    top = net.blobs["p"].data
    assert top.shape == (1, 2, want.size)
    np.testing.assert_array_equal(top[0, 0], want)
    np.testing.assert_array_equal(top[0, 1], np.resize(np.float32([0.1, 0.1, 0.2, 0.2]),
                                                        want.size))
    if "128" in param:
        assert want.size == 2 * 3 * 21 * 4


def test_prior_box_stays_ssd_without_the_fork(tmp_path: Path, caplog) -> None:
    """The same fields without the switch: SSD's three ``size / 2`` boxes per location, and
    a warning that names the switch."""
    net = prior_net(tmp_path, "min_size: 32 min_size: 64 min_size: 128 step: 32 clip: false")
    net.forward()
    assert "using_fork('faceboxes')" in caplog.text
    f32 = np.float32
    boxes = []
    for h in range(2):
        for w in range(3):
            cx, cy = (f32(w) + f32(0.5)) * f32(32), (f32(h) + f32(0.5)) * f32(32)
            for size in (32, 64, 128):
                boxes += [(cx - size / 2) / 96, (cy - size / 2) / 64,
                          (cx + size / 2) / 96, (cy + size / 2) / 64]
    np.testing.assert_array_equal(net.blobs["p"].data[0, 0], np.float32(boxes))


@pytest.mark.parametrize("sizes,declared,count", [("min_size: 32 min_size: 64", 2, 20),
                                                  ("min_size: 16 min_size: 24 min_size: 48",
                                                   21, 3)])
def test_error_faceboxes_prior_count(sizes: str, declared: int, count: int, tmp_path) -> None:
    """The fork reserves 21 priors for 3 sizes (else SSD's count) whatever the sizes are;
    sizes that fill another number are an error (the fork writes past or short of it)."""
    with using_fork("faceboxes"):
        expect_error(tmp_path, inputs(f=(1, 4, 2, 3), im=(1, 3, 64, 96)) + layer(
            "PriorBox", ["f", "im"], ["p"], f"prior_box_param {{ {sizes} }}"),
            "(PriorBox)", f"reserves {declared} priors", f"give {count} boxes", phase=caffe.TEST)


def test_prior_box_matches_opencv_which_has_no_faceboxes_rule(tmp_path: Path) -> None:
    """OpenCV's dnn implements SSD's PriorBox (3 priors for FaceBoxes' 3-size layer) and
    matches ours built without the switch; FaceBoxes' one-box layers are OpenCV's boxes with
    half a pixel less on every side."""
    param = f"min_size: 32 min_size: 64 min_size: 128 step: 32 clip: false {FB_VARIANCE}"
    body = inputs(f=(1, 4, 3, 4), im=(1, 3, 96, 128)) + \
        layer("PriorBox", ["f", "im"], ["p"], f"prior_box_param {{ {param} }}") + \
        layer("PriorBox", ["f", "im"], ["q"], f"prior_box_param {{ min_size: 128 step: 32 "
              f"clip: false {FB_VARIANCE} }}", name="Q")
    ssd = make_net(tmp_path, body, caffe.TEST)
    ssd.forward()
    with using_fork("faceboxes"):
        fb = make_net(tmp_path, body, caffe.TEST)
    fb.forward()
    cv_net = cv2.dnn.readNetFromCaffe(str(tmp_path / "net.prototxt"))
    cv_net.setInput(np.zeros((1, 4, 3, 4), np.float32), "f")
    cv_net.setInput(np.zeros((1, 3, 96, 128), np.float32), "im")
    theirs = dict(zip("pq", cv_net.forward(["L", "Q"])))
    for top in "pq":
        np.testing.assert_allclose(ssd.blobs[top].data, theirs[top].reshape(1, 2, -1),
                                   rtol=1e-6, atol=1e-7)
    assert theirs["p"].size == 2 * 12 * 3 * 4
    shrink = np.float32([0.5 / 128, 0.5 / 96, -0.5 / 128, -0.5 / 96])
    np.testing.assert_allclose(fb.blobs["q"].data[0, 0].reshape(-1, 4),
                               theirs["q"].reshape(2, -1, 4)[0] + shrink, atol=1e-6)


def test_faceboxes_corpus_net_runs_with_the_fork() -> None:
    """deploy.prototxt unchanged: without the switch it fails as in OpenCV (priors do not
    match the 21*4 location outputs of its first head); with it the detector runs."""
    with pytest.raises(NetError, match="number of priors must match number of location"):
        corpus_net(FACEBOXES_NET, caffe.TEST)
    with using_fork("faceboxes"):
        net = corpus_net(FACEBOXES_NET, caffe.TEST)
    net.blobs["data"].reshape(1, 3, 128, 128)
    net.reshape()
    net.blobs["data"].data[...] = np.random.default_rng(12).standard_normal((1, 3, 128, 128))
    with torch.no_grad():
        net.forward()
    priors = net.blobs["mbox_priorbox"].data.shape[2] // 4
    assert priors == 4 * 4 * 21 + 2 * 2 + 1 * 1
    assert net.blobs["mbox_loc"].data.shape[1] == 4 * priors
    detections = net.blobs["detection_out"].data
    assert detections.shape[:2] == (1, 1) and detections.shape[3] == 7
