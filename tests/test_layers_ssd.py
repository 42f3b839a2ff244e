"""SSD-family layers: configuration errors, the fork rules the golden cases do not reach,
the fork switch, and the real SSD nets of the corpus running forward."""
from __future__ import annotations

import csv
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch import NetError
from caffe2torch.forks import ENV_VAR, current_fork, set_fork, using_fork
from caffe2torch.layers.ssd_bbox import jaccard, match, nms_fast
from caffe2torch.proto import caffe_pb2
from conftest import shared_dir
from prototxt import inputs, layer


def make_net(tmp_path, body: str, phase=caffe.TEST) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text('name: "t"\nforce_backward: true\n' + body)
    return caffe.Net(str(path), phase)


def expect_error(tmp_path, body: str, *fragments: str) -> None:
    with pytest.raises(NetError) as info:
        make_net(tmp_path, body)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def forward(net: caffe.Net, backward: bool = False, **values: np.ndarray) -> caffe.Net:
    for name, value in values.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    if backward:
        net.backward()
    return net


PRIOR_PARAM = "prior_box_param { min_size: 4 aspect_ratio: 2 variance: 0.1 variance: 0.1 " \
              "variance: 0.2 variance: 0.2 clip: false }"


# -- configuration errors ------------------------------------------------------------------
@pytest.mark.parametrize("param, fragment", [
    ("prior_box_param { }", "must provide min_size"),
    ("prior_box_param { min_size: 4 max_size: 3 }", "max_size must be greater than min_size"),
    ("prior_box_param { min_size: 4 min_size: 8 max_size: 9 }", "one max_size per min_size"),
    ("prior_box_param { min_size: 4 variance: 0.1 variance: 0.2 }", "1 or 4 variances"),
    ("prior_box_param { min_size: 4 img_size: 8 img_h: 8 img_w: 8 }", "not both"),
    ("prior_box_param { min_size: 4 step_h: 2 }", "must be larger than 0"),
])
def test_error_prior_box(tmp_path, param, fragment):
    body = inputs(f=(1, 2, 3, 3), im=(1, 3, 12, 12)) + layer("PriorBox", ["f", "im"], ["p"], param)
    expect_error(tmp_path, body, "(PriorBox)", fragment)


@pytest.mark.parametrize("param, fragment", [
    ("detection_output_param { }", "must specify num_classes"),
    ("detection_output_param { num_classes: 2 background_label_id: -1 }",
     "background_label_id -1 with share_location"),
    ("detection_output_param { num_classes: 3 }",
     "number of priors must match number of confidence"),
    ("detection_output_param { num_classes: 2 nms_param { eta: 0 } }", "eta must be in (0, 1]"),
])
def test_error_detection_output(tmp_path, param, fragment):
    body = inputs(loc=(1, 16), conf=(1, 8), prior=(1, 2, 16)) + \
        layer("DetectionOutput", ["loc", "conf", "prior"], ["det"], param)
    expect_error(tmp_path, body, "(DetectionOutput)", fragment)


def test_error_detection_output_prior_without_variances(tmp_path):
    """OpenCV's nets feed proposals (no variance channel) as priors; the fork would read
    past the blob."""
    body = inputs(loc=(1, 16), conf=(1, 8), prior=(1, 1, 16)) + \
        layer("DetectionOutput", ["loc", "conf", "prior"], ["det"],
              "detection_output_param { num_classes: 2 }")
    expect_error(tmp_path, body, "must hold boxes and variances")


@pytest.mark.parametrize("order, fragment", [("order: 0 order: 0", "duplicate axis 0"),
                                             ("order: 4", "out of range")])
def test_error_permute(tmp_path, order, fragment):
    body = inputs(x=(1, 2, 3, 4)) + layer("Permute", ["x"], ["y"], f"permute_param {{ {order} }}")
    expect_error(tmp_path, body, "(Permute)", fragment)


def test_error_normalize_needs_two_axes(tmp_path):
    expect_error(tmp_path, inputs(x=(5,)) + layer("Normalize", ["x"], ["y"]), "2 to 4 axes")


@pytest.mark.parametrize("param, fragment", [
    ("num_classes: 2 do_neg_mining: false", "contradicts mining_type MAX_NEGATIVE"),
    ("num_classes: 2 share_location: false", "negative mining needs share_location"),
    ("num_classes: 2 background_label_id: 2 mining_type: NONE", "0 <= background_label_id"),
    ("num_classes: 3", "number of priors must match number of confidence"),
    ("", "must provide num_classes"),
])
def test_error_multibox_loss(tmp_path, param, fragment):
    body = inputs(loc=(1, 16), conf=(1, 8), prior=(1, 2, 16), gt=(1, 1, 1, 8)) + \
        layer("MultiBoxLoss", ["loc", "conf", "prior", "gt"], ["loss"],
              f"multibox_loss_param {{ {param} }}")
    expect_error(tmp_path, body, "(MultiBoxLoss)", fragment)


def test_error_smooth_l1_shapes_and_sigma(tmp_path):
    expect_error(tmp_path, inputs(a=(2, 3), b=(2, 4)) + layer("SmoothL1Loss", ["a", "b"], ["l"]),
                 "must match bottom 0")
    expect_error(tmp_path, inputs(a=(2, 3), b=(2, 3)) +
                 layer("SmoothL1Loss", ["a", "b"], ["l"], "smooth_l1_loss_param { sigma: 0 }"),
                 "sigma must be positive")


def test_multibox_loss_rejects_background_in_ground_truth(tmp_path):
    body = inputs(loc=(1, 16), conf=(1, 8), prior=(1, 2, 16), gt=(1, 1, 1, 8)) + \
        layer("MultiBoxLoss", ["loc", "conf", "prior", "gt"], ["loss"],
              "multibox_loss_param { num_classes: 2 }")
    net = make_net(tmp_path, body)
    prior = np.concatenate([np.tile([0.1, 0.1, 0.5, 0.5], 4), np.full(16, 0.1)])
    with pytest.raises(NetError, match="background label 0"):
        forward(net, loc=np.zeros((1, 16), np.float32), conf=np.zeros((1, 8), np.float32),
                prior=prior.reshape(1, 2, 16).astype(np.float32),
                gt=np.array([[[[0, 0, 0, .1, .1, .5, .5, 0]]]], np.float32))


# -- rules the golden cases do not reach ------------------------------------------------------
def test_prior_box_unset_clip_clips_as_the_recorded_fork(tmp_path):
    body = inputs(f=(1, 2, 2, 2), im=(1, 3, 8, 8)) + \
        layer("PriorBox", ["f", "im"], ["p"], "prior_box_param { min_size: 8 }")
    prior = forward(make_net(tmp_path, body)).blobs["p"].data
    assert prior[0, 0].min() == 0 and prior[0, 0].max() == 1
    np.testing.assert_allclose(prior[0, 0, :4], [0, 0, 0.75, 0.75])   # [-0.25, 0.75] clipped
    np.testing.assert_allclose(prior[0, 1], 0.1)


def test_permute_backward_is_the_inverse_permutation(tmp_path):
    body = inputs(x=(2, 3, 4, 5)) + layer("Permute", ["x"], ["y"],
                                          "permute_param { order: 0 order: 2 order: 3 order: 1 }")
    net = make_net(tmp_path, body)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    forward(net, x=x)
    np.testing.assert_array_equal(net.blobs["y"].data, x.transpose(0, 2, 3, 1))
    dy = np.random.default_rng(1).standard_normal((2, 4, 5, 3)).astype(np.float32)
    net.blobs["y"].diff[...] = dy
    net.backward()
    np.testing.assert_array_equal(net.blobs["x"].diff, dy.transpose(0, 3, 1, 2))


def test_normalize_shared_scale_is_a_0_axis_blob_that_round_trips(tmp_path):
    """NormalizeLayer: ``channel_shared`` makes ``Blob(vector<int>(0))``; the caffemodel
    holds it with an empty shape, and loading it back must accept that shape."""
    body = inputs(x=(1, 3, 2, 2)) + layer(
        "Normalize", ["x"], ["y"],
        'norm_param { scale_filler { type: "constant" value: 20 } }', name="norm")
    net = make_net(tmp_path, body)
    assert net.layer_dict["norm"].module.blobs[0].shape == ()
    net.save(str(tmp_path / "w.caffemodel"))
    other = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST,
                      weights=str(tmp_path / "w.caffemodel"))
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 2)).astype(np.float32)
    y = forward(other, x=x).blobs["y"].data
    np.testing.assert_allclose(y, 20 * x / np.sqrt((x * x).sum() + 1e-10), rtol=1e-5)


def test_smooth_l1_sigma_and_faster_rcnn_weights(tmp_path):
    """py-faster-rcnn: ``w_out * smooth_l1(w_in * d; sigma)``, gradient scaled by both weights."""
    body = inputs(a=(2, 3), b=(2, 3), win=(2, 3), wout=(2, 3)) + layer(
        "SmoothL1Loss", ["a", "b", "win", "wout"], ["l"], "smooth_l1_loss_param { sigma: 2 }")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 3)).astype(np.float32), np.zeros((2, 3), np.float32)
    win, wout = (rng.uniform(0, 2, (2, 3)).astype(np.float32) for _ in range(2))
    net = forward(make_net(tmp_path, body), True, a=a, b=b, win=win, wout=wout)
    d = win * a
    small = np.abs(d) < 0.25
    loss = np.where(small, 0.5 * 4 * d * d, np.abs(d) - 0.125) * wout
    np.testing.assert_allclose(net.blobs["l"].data, loss.sum() / 2, rtol=1e-5)
    grad = np.where(small, 4 * d, np.sign(d)) * win * wout / 2
    np.testing.assert_allclose(net.blobs["a"].diff, grad, rtol=1e-5)
    np.testing.assert_allclose(net.blobs["b"].diff, -grad, rtol=1e-5)


def test_smooth_l1_ssd_weights_do_not_scale_the_gradient(tmp_path):
    """SSD's 3-bottom form: ``d = w * (a - b)`` and the gradient is ``smooth_l1'(d)``."""
    body = inputs(a=(1, 4), b=(1, 4), w=(1, 4)) + layer("SmoothL1Loss", ["a", "b", "w"], ["l"])
    a = np.array([[0.2, -3, 0.5, 2]], np.float32)
    w = np.array([[2, 1, 0, 0.25]], np.float32)
    net = forward(make_net(tmp_path, body), True, a=a, b=np.zeros_like(a), w=w)
    d = w * a
    np.testing.assert_allclose(net.blobs["l"].data,
                               np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5).sum())
    np.testing.assert_allclose(net.blobs["a"].diff, np.clip(d, -1, 1))


def test_nms_fast_keeps_score_order_and_ties_by_index():
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0.05, 0, 1, 1], [2, 2, 3, 3]], np.float32)
    scores = np.array([0.5, 0.5, 0.9, 0.5], np.float32)
    assert nms_fast(boxes, scores, 0.0, 0.5, 1.0, -1) == [2, 3]
    assert nms_fast(boxes, scores, 0.0, 1.0, 1.0, -1) == [2, 0, 1, 3]
    assert nms_fast(boxes, scores, 0.0, 1.0, 1.0, 2) == [2, 0]
    assert nms_fast(boxes, scores, 0.6, 1.0, 1.0, -1) == [2]


def test_bipartite_match_takes_the_largest_overlap_first():
    gt = np.array([[0, 0, 1, 1], [0, 0, 0.5, 1]], np.float32)
    priors = np.array([[0, 0, 0.9, 1], [0, 0, 0.55, 1], [0, 0, 0.6, 1]], np.float32)
    ious = jaccard(priors, gt)
    idx, overlaps = match(gt, priors, caffe_pb2.MultiBoxLossParameter.BIPARTITE, 0.5, False)
    assert idx.tolist() == [0, 1, -1]
    np.testing.assert_array_equal(overlaps[:2], [ious[0, 0], ious[1, 1]])
    assert overlaps[2] == ious[2].max()
    idx, _ = match(gt, priors, caffe_pb2.MultiBoxLossParameter.PER_PREDICTION, 0.5, False)
    assert idx.tolist() == [0, 1, 1]


def _multibox(tmp_path, param: str, loc: np.ndarray, conf: np.ndarray, prior: np.ndarray,
              gt: np.ndarray) -> caffe.Net:
    body = inputs(loc=loc.shape, conf=conf.shape, prior=prior.shape, gt=gt.shape) + layer(
        "MultiBoxLoss", ["loc", "conf", "prior", "gt"], ["loss"],
        f"propagate_down: true propagate_down: true propagate_down: false propagate_down: false "
        f"multibox_loss_param {{ {param} }}")
    return forward(make_net(tmp_path, body), True, loc=loc, conf=conf, prior=prior, gt=gt)


def _priors() -> np.ndarray:
    boxes = [[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9], [0.0, 0.5, 0.3, 0.9], [0.6, 0.0, 0.9, 0.3]]
    return np.concatenate([np.ravel(boxes), np.full(16, 0.1)]).reshape(1, 2, 16).astype(np.float32)


def test_multibox_loss_exact_match_and_mining(tmp_path):
    """A prior equal to its ground truth encodes to 0 (no loc loss); MAX_NEGATIVE mining
    picks the ``neg_pos_ratio`` unmatched priors of highest background loss."""
    conf = np.array([[2, 0, 0, 3, 1, 0, 0, 1]], np.float32)   # P=4, C=2
    gt = np.array([[[[0, 1, 0, 0.1, 0.1, 0.4, 0.4, 0]]]], np.float32)
    net = _multibox(tmp_path, "num_classes: 2 neg_pos_ratio: 2 code_type: CENTER_SIZE",
                    np.zeros((1, 16), np.float32), conf, _priors(), gt)
    rows = conf.reshape(4, 2)
    logp = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
    # positive: prior 0 with label 1; negatives: priors 1 and 3 (highest -log p(bg))
    expected = -(logp[0, 1] + logp[1, 0] + logp[3, 0])
    np.testing.assert_allclose(net.blobs["loss"].data, [expected], rtol=1e-5)
    diff = net.blobs["conf"].diff.reshape(4, 2)
    assert not diff[2].any() and diff[0].any() and diff[1].any() and diff[3].any()
    assert not net.blobs["loc"].diff.any()


@pytest.mark.parametrize("param", [
    "num_classes: 3 conf_loss_type: LOGISTIC mining_type: NONE",
    "num_classes: 3 mining_type: HARD_EXAMPLE sample_size: 3",
    "num_classes: 3 mining_type: HARD_EXAMPLE sample_size: 3 "
    "nms_param { nms_threshold: 0.5 top_k: 4 }",
    "num_classes: 3 use_prior_for_matching: false share_location: true code_type: CORNER",
    "num_classes: 3 share_location: false mining_type: NONE encode_variance_in_target: true",
    "num_classes: 3 bp_inside: true ignore_cross_boundary_bbox: true } loss_param { "
    "normalization: FULL",
])
def test_multibox_loss_variants_give_finite_losses_and_gradients(tmp_path, param):
    loc_classes = 3 if "share_location: false" in param else 1
    rng = np.random.default_rng(0)
    loc = rng.normal(0, 0.1, (2, 16 * loc_classes)).astype(np.float32)
    conf = rng.standard_normal((2, 12)).astype(np.float32)
    gt = np.array([[[[0, 1, 0, 0.1, 0.1, 0.45, 0.4, 0], [1, 2, 0, 0.5, 0.5, 0.9, 0.95, 1],
                     [1, 1, 1, 0.0, 0.45, 0.3, 0.9, 0]]]], np.float32)
    net = _multibox(tmp_path, param, loc, conf, _priors(), gt)
    assert np.isfinite(net.blobs["loss"].data).all() and float(net.blobs["loss"].data) > 0
    assert np.isfinite(net.blobs["conf"].diff).all() and net.blobs["conf"].diff.any()
    assert np.isfinite(net.blobs["loc"].diff).all()


def test_detection_output_without_nms_param_keeps_every_box(tmp_path):
    body = inputs(loc=(1, 16), conf=(1, 8), prior=(1, 2, 16)) + layer(
        "DetectionOutput", ["loc", "conf", "prior"], ["det"],
        "detection_output_param { num_classes: 2 confidence_threshold: 0.9 code_type: CORNER }")
    conf = np.array([[0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]], np.float32)
    det = forward(make_net(tmp_path, body), loc=np.zeros((1, 16), np.float32), conf=conf,
                  prior=_priors()).blobs["det"].data
    np.testing.assert_allclose(det[0, 0, :, 2], [0.4, 0.3, 0.2, 0.1])
    np.testing.assert_allclose(det[0, 0, 0, 3:], _priors()[0, 0, 12:16])


def test_detection_evaluate_scales_to_image_sizes(tmp_path):
    """With name_size_file, boxes are clipped and scaled to pixels and overlaps use +1."""
    (tmp_path / "sizes.txt").write_text("img0 10 10\n")
    body = inputs(det=(1, 1, 1, 7), gt=(1, 1, 1, 8)) + layer(
        "DetectionEvaluate", ["det", "gt"], ["out"],
        'detection_evaluate_param { num_classes: 2 overlap_threshold: 0.65 '
        'name_size_file: "sizes.txt" }')
    det = np.array([[[[0, 1, 0.9, 0.0, 0.0, 0.4, 0.4]]]], np.float32)
    gt = np.array([[[[0, 1, 0, 0.0, 0.0, 0.5, 0.5, 0]]]], np.float32)
    out = forward(make_net(tmp_path, body), det=det, gt=gt).blobs["out"].data
    # in pixels the overlap is 5*5 / 6*6 = 0.69 (a true positive); normalised only 0.64
    np.testing.assert_allclose(out[0, 0], [[-1, 1, 1, -1, -1], [0, 1, 0.9, 1, 0]])


# -- the fork switch --------------------------------------------------------------------------
def test_fork_switch_selects_ssd_accuracy_ties(tmp_path, monkeypatch):
    """SSD's AccuracyLayer partial_sorts (score, class) pairs: on ties the higher class wins;
    BVLC counts every class scoring >= the true one against it."""
    body = inputs(s=(1, 3), l=(1,)) + layer("Accuracy", ["s", "l"], ["a"],
                                            "accuracy_param { top_k: 1 }")
    values = dict(s=np.array([[1, 1, 0]], np.float32), l=np.array([1], np.float32))
    assert forward(make_net(tmp_path, body), **values).blobs["a"].data.item() == 0
    with using_fork("ssd"):
        net = make_net(tmp_path, body)
    assert current_fork() is None
    assert forward(net, **values).blobs["a"].data.item() == 1
    monkeypatch.setenv(ENV_VAR, "ssd")
    assert current_fork() == "ssd"
    with using_fork(None):        # an explicit choice wins over the environment
        assert current_fork() is None
    assert current_fork() == "ssd"
    with pytest.raises(ValueError, match="unknown Caffe fork"):
        set_fork("yolo")


# -- real SSD nets of the corpus -------------------------------------------------------------
SSD_TYPES = {"PriorBox", "DetectionOutput", "Normalize", "Permute"}
# Nets written for other programs' variants of these layers, not the SSD fork's.
NOT_SSD_FORK = {
    "repos/sfzhang15__FaceBoxes/models/faceboxes/deploy.prototxt":
        "FaceBoxes' own fork densifies the 32/64-pixel priors (16 and 4 per cell)",
    "repos/opencv__opencv_extra/testdata/dnn/faster_rcnn_zf.prototxt":
        "OpenCV's DetectionOutput extension (proposals as priors, normalized_bbox: false)",
}


def _ssd_deploy_nets() -> list[str]:
    with open(shared_dir() / "corpus" / "nets.tsv", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    seen: dict[str, str] = {}
    for row in rows:
        if set(row["types_used"].split(",")) & SSD_TYPES and row["kind"] == "deploy" \
                and not row["input_style"].startswith("data-layer(") and not row["python_layers"] \
                and "/template/" not in row["path"]:   # templates hold placeholders, not nets
            seen.setdefault(row["arch_id"] or row["path"], row["path"])
    return sorted(seen.values())


@pytest.mark.parametrize("path", _ssd_deploy_nets())
def test_corpus_ssd_net_runs_forward(path):
    if path in NOT_SSD_FORK:
        with pytest.raises(NetError):
            net = caffe.Net(str(shared_dir() / "corpus" / path), caffe.TEST)
            net.forward()
        return
    # save_output_param (result files) is ignored with a warning
    with pytest.warns(UserWarning) if "save_output_param" in (shared_dir() / "corpus" / path) \
            .read_text() else nullcontext():
        net = caffe.Net(str(shared_dir() / "corpus" / path), caffe.TEST)
    torch.manual_seed(0)
    for name in net.inputs:
        net.blobs[name].data[...] = (torch.rand(net.blobs[name].shape) * 255).numpy()
    with torch.no_grad():
        out = net.forward()
    if "detection_out" in out:
        det = out["detection_out"]
        assert det.shape[:2] == (1, 1) and det.shape[3] == 7
        assert ((det[0, 0, :, 0] == 0) & (det[0, 0, :, 1] != 0)).all()



# -- AnnotatedData ---------------------------------------------------------------------------
def _annotated_db(path, count: int = 3, size: tuple[int, int] = (20, 30), typed: bool = True,
                  boxes: bool = True) -> list[np.ndarray]:
    """An LMDB of PNG-encoded AnnotatedDatum records, two boxes each (group 2 difficult)."""
    import cv2
    import lmdb
    rng = np.random.default_rng(0)
    images = []
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i in range(count):
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            record = caffe_pb2.AnnotatedDatum()
            if typed:
                record.type = caffe_pb2.AnnotatedDatum.BBOX
            record.datum.data = cv2.imencode(".png", image)[1].tobytes()
            record.datum.encoded = True
            record.datum.label = 7 + i
            for group in (1, 2) if boxes else ():
                g = record.annotation_group.add(group_label=group)
                a = g.annotation.add(instance_id=i)
                box = (0.1 * group, 0.2, 0.3 * group + 0.1, 0.6)
                a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax = box
                a.bbox.difficult = group == 2
            txn.put(f"{i:08d}".encode(), record.SerializeToString())
            images.append(image)
    env.close()
    return images


def _data_net(tmp_path, transform: str, extra: str = "", batch: int = 2,
              phase=caffe.TEST) -> caffe.Net:
    body = (f'layer {{ name: "data" type: "AnnotatedData" top: "data" top: "label" '
            f'transform_param {{ {transform} }} '
            f'data_param {{ source: "db" batch_size: {batch} backend: LMDB }} {extra} }}\n')
    return make_net(tmp_path, body, phase)


def test_annotated_data_test_phase_is_resize_mean_scale(tmp_path):
    import cv2
    images = _annotated_db(tmp_path / "db")
    net = _data_net(tmp_path, "scale: 0.5 mean_value: 10 mean_value: 20 mean_value: 30 "
                              "resize_param { height: 8 width: 12 interp_mode: LINEAR }")
    assert net.blobs["data"].shape == (2, 3, 8, 12) and net.blobs["label"].shape == (1, 1, 2, 8)
    net.forward()
    expected = [(cv2.resize(im, (12, 8), interpolation=cv2.INTER_LINEAR) - np.float32([10, 20, 30]))
                * np.float32(0.5) for im in images[:2]]
    np.testing.assert_array_equal(net.blobs["data"].data, np.stack(expected).transpose(0, 3, 1, 2))
    np.testing.assert_allclose(net.blobs["label"].data[0, 0], [
        [0, 1, 0, 0.1, 0.2, 0.4, 0.6, 0], [0, 2, 0, 0.2, 0.2, 0.7, 0.6, 1],
        [1, 1, 1, 0.1, 0.2, 0.4, 0.6, 0], [1, 2, 1, 0.2, 0.2, 0.7, 0.6, 1]], rtol=1e-6)


def test_annotated_data_without_boxes_or_type(tmp_path):
    _annotated_db(tmp_path / "db", boxes=False)
    net = _data_net(tmp_path, "")
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data, -np.ones((1, 1, 1, 8)))
    (tmp_path / "untyped").mkdir()
    _annotated_db(tmp_path / "untyped" / "db", typed=False)
    net = _data_net(tmp_path / "untyped", "")
    net.forward()
    np.testing.assert_array_equal(net.blobs["label"].data.ravel(), [7, 8])


def test_annotated_data_training_augmentation_keeps_boxes_valid_and_repeats(tmp_path):
    _annotated_db(tmp_path / "db", count=4, size=(40, 60))
    transform = ("mirror: true mean_value: 127.5 resize_param { height: 32 width: 32 "
                 "interp_mode: LINEAR interp_mode: AREA interp_mode: CUBIC } "
                 "emit_constraint { emit_type: CENTER } expand_param { prob: 0.5 "
                 "max_expand_ratio: 4 } distort_param { brightness_prob: 0.5 brightness_delta: 32 "
                 "contrast_prob: 0.5 contrast_lower: 0.5 contrast_upper: 1.5 hue_prob: 0.5 "
                 "hue_delta: 18 saturation_prob: 0.5 saturation_lower: 0.5 saturation_upper: 1.5 }")
    samplers = ("annotated_data_param { batch_sampler { max_sample: 1 max_trials: 1 } "
                "batch_sampler { sampler { min_scale: 0.3 max_aspect_ratio: 2 "
                "min_aspect_ratio: 0.5 } sample_constraint { min_jaccard_overlap: 0.3 } "
                "max_sample: 1 max_trials: 50 } }")
    runs = []
    for _ in range(2):
        caffe.set_random_seed(5)
        net = _data_net(tmp_path, transform, samplers, batch=4, phase=caffe.TRAIN)
        labels = []
        for _ in range(3):
            net.forward()
            label = net.blobs["label"].data.reshape(-1, 8).copy()
            assert net.blobs["data"].shape == (4, 3, 32, 32)
            if label[0, 0] != -1:
                assert ((label[:, 3:7] >= 0) & (label[:, 3:7] <= 1)).all()
                assert (label[:, 5] > label[:, 3]).all() and (label[:, 6] > label[:, 4]).all()
                assert set(label[:, 0]) <= {0, 1, 2, 3}
            labels.append(label)
        runs.append(labels)
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("transform, extra, fragment", [
    ("noise_param { prob: 0.5 }", "", "noise_param is not supported"),
    ("resize_param { resize_mode: FIT_SMALL_SIZE height: 8 width: 8 }", "", "FIT_SMALL_SIZE"),
    ("", "annotated_data_param { seg_scales: 4 }", "MobileNet-YOLO"),
])
def test_error_annotated_data_unsupported_options(tmp_path, transform, extra, fragment):
    _annotated_db(tmp_path / "db")
    with pytest.raises(NetError, match=fragment):
        _data_net(tmp_path, transform, extra)


def test_mobilenet_ssd_trains_from_annotated_data(tmp_path):
    """The corpus MobileNet-SSD train net end to end: AnnotatedData with SSD's augmentation,
    the backbone, PriorBox and MultiBoxLoss, forward and backward."""
    _annotated_db(tmp_path / "db", count=2, size=(60, 80))
    text = (shared_dir() / "corpus" / "repos" / "chuanqi305__MobileNet-SSD" / "voc" /
            "MobileNetSSD_train.prototxt").read_text()
    (tmp_path / "train.prototxt").write_text(
        text.replace('source: "trainval_lmdb/"', 'source: "db"').replace("batch_size: 24",
                                                                         "batch_size: 1"))
    caffe.set_random_seed(0)
    net = caffe.Net(str(tmp_path / "train.prototxt"), caffe.TRAIN)
    net.forward()
    loss = float(net.blobs["mbox_loss"].data)
    assert np.isfinite(loss) and loss > 0
    net.backward()
    grad = net.params["conv0"][0].diff
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0
