"""Losses, Accuracy and the recurrent layers: configuration errors and the Caffe rules the
golden cases do not reach (each rule's Caffe source is named in its test's docstring)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch import FormatError, NetError
from prototxt import inputs, layer

FLT_MIN = np.finfo(np.float32).tiny


def make_net(tmp_path, body: str, phase=caffe.TRAIN) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text('name: "t"\nforce_backward: true\n' + body)
    return caffe.Net(str(path), phase)


def run(net: caffe.Net, backward: bool = True, **values: np.ndarray) -> caffe.Net:
    for name, value in values.items():
        net.blobs[name].data[...] = value
    net.forward()
    if backward:
        net.backward()
    return net


def expect_error(tmp_path, body: str, *fragments: str) -> None:
    """Building the net fails with a NetError naming layer 'L' and every fragment."""
    with pytest.raises(NetError) as info:
        make_net(tmp_path, body)
    message = str(info.value)
    assert "layer 'L'" in message, message
    for fragment in fragments:
        assert fragment in message, message


# -- losses: rules -------------------------------------------------------------------------
def test_softmax_loss_gradient_ignores_the_flt_min_clip(tmp_path):
    """softmax_loss_layer.cpp: the loss clips p at FLT_MIN but Backward_cpu still writes
    ``(p - onehot) * loss_weight / normalizer`` (not the derivative of the clipped log)."""
    net = make_net(tmp_path, inputs(data=(1, 3), label=(1,))
                   + layer("SoftmaxWithLoss", ["data", "label"], ["loss"]))
    run(net, data=np.array([[0.0, 200.0, 0.0]], np.float32), label=np.array([0.0], np.float32))
    assert float(net.blobs["loss"].data) == pytest.approx(-np.log(FLT_MIN), rel=1e-6)
    np.testing.assert_allclose(net.blobs["data"].diff, [[-1.0, 1.0, 0.0]], atol=1e-6)


def test_softmax_loss_prob_top_is_not_backpropagated(tmp_path):
    """softmax_loss_layer.cpp: top[1] shares prob_'s data and Backward_cpu never reads its
    diff; the fork fix for BVLC#2968 lets the second top default to loss_weight 0."""
    net = make_net(tmp_path, inputs(data=(2, 4), label=(2,))
                   + layer("SoftmaxWithLoss", ["data", "label"], ["loss", "prob"]))
    x = np.random.RandomState(0).randn(2, 4).astype(np.float32)
    net.blobs["prob"].diff[...] = 5.0
    run(net, data=x, label=np.array([1.0, 3.0], np.float32))
    e = np.exp(x - x.max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(net.blobs["prob"].data, prob, rtol=1e-6)
    onehot = np.eye(4, dtype=np.float32)[[1, 3]]
    np.testing.assert_allclose(net.blobs["data"].diff, (prob - onehot) / 2, rtol=1e-5, atol=1e-7)


def test_sigmoid_ce_legacy_normalize_true_means_valid(tmp_path):
    """sigmoid_cross_entropy_loss_layer.cpp LayerSetUp: with `normalization` unset,
    `normalize: true` selects VALID (the count of targets != ignore_label)."""
    net = make_net(tmp_path, inputs(data=(2, 3), label=(2, 3)) + layer(
        "SigmoidCrossEntropyLoss", ["data", "label"], ["loss"],
        "loss_param { normalize: true ignore_label: -1 }"))
    x = np.array([[0.5, -2.0, 3.0], [-0.1, 1.0, 0.0]], np.float32)
    t = np.array([[1, 0, -1], [0, -1, 1]], np.float32)
    run(net, data=x, label=t)
    valid = t != -1
    per = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    assert float(net.blobs["loss"].data) == pytest.approx(per[valid].sum() / valid.sum(), rel=1e-5)
    grad = np.where(valid, 1 / (1 + np.exp(-x)) - t, 0) / valid.sum()
    np.testing.assert_allclose(net.blobs["data"].diff, grad, rtol=1e-5, atol=1e-7)


def test_pre_fixed_normalization_divides_by_the_given_constant(tmp_path):
    """R-FCN fork softmax_loss_layer.cpp get_normalizer: PRE_FIXED divides by
    loss_param.pre_fixed_normalizer (still clamped to at least 1)."""
    net = make_net(tmp_path, inputs(data=(3, 2), label=(3,)) + layer(
        "SoftmaxWithLoss", ["data", "label"], ["loss"],
        "loss_param { normalization: PRE_FIXED pre_fixed_normalizer: 4 }"))
    x = np.zeros((3, 2), np.float32)
    run(net, data=x, label=np.zeros(3, np.float32))
    assert float(net.blobs["loss"].data) == pytest.approx(3 * np.log(2) / 4, rel=1e-6)
    np.testing.assert_allclose(net.blobs["data"].diff[:, 0], -0.5 / 4, rtol=1e-6)


@pytest.mark.parametrize("type_, bottoms, extra", [
    ("SoftmaxWithLoss", {"data": (3, 4), "label": (3,)}, ""),
    ("SigmoidCrossEntropyLoss", {"data": (3, 4), "label": (3, 4)}, ""),
    ("HingeLoss", {"data": (3, 4), "label": (3,)}, ""),
    ("MultinomialLogisticLoss", {"data": (3, 4), "label": (3,)}, ""),
    ("InfogainLoss", {"data": (3, 4), "label": (3,), "H": (4, 4)}, ""),
    ("ContrastiveLoss", {"data": (3, 4), "x2": (3, 4), "label": (3,)}, ""),
    ("Accuracy", {"data": (3, 4), "label": (3,)}, ""),
])
def test_labels_never_get_a_gradient(tmp_path, type_, bottoms, extra):
    """loss_layer.hpp AllowForceBackward: even with force_backward the label bottom (and
    InfogainLoss's H) get no diff; Accuracy has no backward at all."""
    net = make_net(tmp_path, inputs(**bottoms) + layer(type_, list(bottoms), ["out"], extra))
    rng = np.random.RandomState(1)
    values = {name: rng.rand(*shape).astype(np.float32) for name, shape in bottoms.items()}
    values["label"] = rng.randint(0, 2, bottoms["label"]).astype(np.float32)
    net.blobs["label"].diff[...] = 7.0
    run(net, **values)
    assert np.all(net.blobs["label"].diff == 7.0)
    if "H" in bottoms:
        assert np.all(net.blobs["H"].diff == 0)
    if type_ == "Accuracy":
        assert np.all(net.blobs["data"].diff == 0)


def test_accuracy_with_every_label_ignored_is_zero(tmp_path):
    """accuracy_layer.cpp Forward_cpu: count == 0 gives 0, and per-class accuracy is 0 for
    classes without samples (no division by zero)."""
    net = make_net(tmp_path, inputs(data=(3, 2), label=(3,)) + layer(
        "Accuracy", ["data", "label"], ["acc", "per_class"], "accuracy_param { ignore_label: 1 }"))
    run(net, backward=False, data=np.ones((3, 2), np.float32), label=np.ones(3, np.float32))
    assert net.blobs["acc"].data.tolist() == 0.0
    assert net.blobs["per_class"].data.tolist() == [0.0, 0.0]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_loss_layers_compile_to_modules_that_trace(tmp_path):
    """The compiled module (caffe2torch.load) runs under torch.jit.trace with Caffe's loss."""
    path = tmp_path / "net.prototxt"
    path.write_text(inputs(data=(4, 3), label=(4,))
                    + layer("SoftmaxWithLoss", ["data", "label"], ["loss"]))
    module = caffe.load(str(path))
    x, label = torch.randn(4, 3), torch.tensor([0.0, 2.0, 1.0, 1.0])
    traced = torch.jit.trace(module, (x, label), check_trace=False)
    expected = torch.nn.functional.cross_entropy(x, label.long())
    torch.testing.assert_close(traced(x, label), expected)


# -- recurrent: rules ----------------------------------------------------------------------
def _lstm_net(tmp_path, name: str, steps: int) -> caffe.Net:
    folder = tmp_path / name
    folder.mkdir()
    return make_net(folder, inputs(x=(steps, 2, 3), cont=(steps, 2)) + layer(
        "LSTM", ["x", "cont"], ["h"],
        'recurrent_param { num_output: 4 weight_filler { type: "uniform" min: -0.5 max: 0.5 } '
        'bias_filler { type: "uniform" min: -0.5 max: 0.5 } }'))


def test_lstm_state_carries_over_between_forward_calls(tmp_path):
    """recurrent_layer.cpp Forward_cpu: without expose_hidden, h_0/c_0 are copied from the
    previous forward's h_T/c_T, so two T=2 batches with cont=1 equal one T=4 sequence."""
    short, long = _lstm_net(tmp_path, "a", 2), _lstm_net(tmp_path, "b", 4)
    for mine, theirs in zip(short.params["L"], long.params["L"]):
        mine.data[...] = theirs.data
    x = np.random.RandomState(2).randn(4, 2, 3).astype(np.float32)
    cont = np.ones((4, 2), np.float32)
    cont[0] = 0
    run(long, backward=False, x=x, cont=cont)
    run(short, backward=False, x=x[:2], cont=cont[:2])
    run(short, backward=False, x=x[2:], cont=cont[2:])
    np.testing.assert_allclose(short.blobs["h"].data, long.blobs["h"].data[2:], rtol=1e-5,
                               atol=1e-6)


def test_lstm_unit_backward_keeps_caffe_forget_gate_formula(tmp_path):
    """lstm_unit_layer.cpp Backward_cpu: f = cont * sigmoid(x_f) and f_diff = c_term * c_prev
    * f * (1 - f), which differs from the true derivative when cont is not 0 or 1."""
    net = make_net(tmp_path, inputs(c_prev=(1, 2, 1), gates=(1, 2, 4), cont=(1, 2))
                   + layer("LSTMUnit", ["c_prev", "gates", "cont"], ["c", "h"]))
    c_prev = np.array([[[0.7], [-0.3]]], np.float32)
    gates = np.array([[[0.1, 0.4, -0.2, 0.3], [-0.5, 1.2, 0.6, -0.8]]], np.float32)
    cont = np.array([[0.5, 1.0]], np.float32)
    net.blobs["c"].diff[...] = 0.25
    net.blobs["h"].diff[...] = 1.0
    run(net, c_prev=c_prev, gates=gates, cont=cont)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    i, o, g = sig(gates[..., 0:1]), sig(gates[..., 2:3]), np.tanh(gates[..., 3:4])
    f = cont[..., None] * sig(gates[..., 1:2])
    c = f * c_prev + i * g
    np.testing.assert_allclose(net.blobs["c"].data, c, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["h"].data, o * np.tanh(c), rtol=1e-6)
    c_term = 0.25 + o * (1 - np.tanh(c) ** 2)
    want = np.concatenate([c_term * g * i * (1 - i), c_term * c_prev * f * (1 - f),
                           np.tanh(c) * o * (1 - o), c_term * i * (1 - g * g)], axis=-1)
    np.testing.assert_allclose(net.blobs["gates"].diff, want, rtol=1e-5)
    np.testing.assert_allclose(net.blobs["c_prev"].diff, c_term * f, rtol=1e-6)
    assert np.all(net.blobs["cont"].diff == 0)


def test_rnn_parameter_blobs_follow_caffe_order_and_fillers(tmp_path):
    """rnn_layer.cpp FillUnrolledNet: blobs W_xh, b_h, W_xh_static, W_hh, W_ho, b_o, with
    weight_filler on weights and bias_filler on biases (x flattened from axis 2)."""
    net = make_net(tmp_path, inputs(x=(2, 3, 2, 2), cont=(2, 3), xs=(3, 5)) + layer(
        "RNN", ["x", "cont", "xs"], ["o"], 'recurrent_param { num_output: 6 weight_filler { '
        'type: "constant" value: 0.5 } bias_filler { type: "constant" value: 2 } }'))
    shapes = [p.data.shape for p in net.params["L"]]
    assert shapes == [(6, 4), (6,), (6, 5), (6, 6), (6, 6), (6,)]
    assert [float(p.data.flat[0]) for p in net.params["L"]] == [0.5, 2.0, 0.5, 0.5, 0.5, 2.0]
    assert net.blobs["o"].shape == (2, 3, 6)


# -- configuration errors --------------------------------------------------------------------
def test_error_label_count(tmp_path):
    expect_error(tmp_path, inputs(data=(2, 4, 3), label=(2, 4))
                 + layer("SoftmaxWithLoss", ["data", "label"], ["loss"]),
                 "number of labels must match", "expected 6 labels, got 8")


def test_error_softmax_axis_out_of_range(tmp_path):
    expect_error(tmp_path, inputs(data=(2, 4), label=(2,)) + layer(
        "SoftmaxWithLoss", ["data", "label"], ["loss"], "softmax_param { axis: 2 }"),
        "softmax_param.axis 2 is out of range", "expected an axis in [-2, 1]")


def test_error_first_dimension(tmp_path):
    expect_error(tmp_path, inputs(a=(2, 3), b=(3, 2))
                 + layer("EuclideanLoss", ["a", "b"], ["loss"]),
                 "same first dimension", "[2, 3] and [3, 2]")


def test_error_euclidean_dimension(tmp_path):
    expect_error(tmp_path, inputs(a=(2, 3), b=(2, 4))
                 + layer("EuclideanLoss", ["a", "b"], ["loss"]),
                 "same dimension", "is 3", "is 4")


def test_error_legacy_accessor_axes(tmp_path):
    expect_error(tmp_path, inputs(a=(2, 1, 1, 1, 3), b=(2, 1, 1, 1, 3))
                 + layer("EuclideanLoss", ["a", "b"], ["loss"]), "at most 4 axes")


def test_error_sigmoid_ce_count(tmp_path):
    expect_error(tmp_path, inputs(data=(2, 3), label=(2, 2))
                 + layer("SigmoidCrossEntropyLoss", ["data", "label"], ["loss"]),
                 "same count", "has 6 values", "has 4")


def test_error_hinge_labels(tmp_path):
    expect_error(tmp_path, inputs(data=(2, 3), label=(2, 3))
                 + layer("HingeLoss", ["data", "label"], ["loss"]),
                 "one label per sample (2)", "[2, 3]")


def test_error_multinomial_label_shape(tmp_path):
    expect_error(tmp_path, inputs(data=(2, 3), label=(2, 3))
                 + layer("MultinomialLogisticLoss", ["data", "label"], ["loss"]),
                 "channels, height and width 1", "[2, 3]")


def test_error_contrastive_shapes(tmp_path):
    expect_error(tmp_path, inputs(a=(2, 3, 2, 1), b=(2, 3, 2, 1), sim=(2,))
                 + layer("ContrastiveLoss", ["a", "b", "sim"], ["loss"]),
                 "(N, C, 1, 1)", "[2, 3, 2, 1]")
    expect_error(tmp_path, inputs(a=(2, 3), b=(2, 3), sim=(2, 2))
                 + layer("ContrastiveLoss", ["a", "b", "sim"], ["loss"]),
                 "one similarity label per pair", "[2, 2]")


def test_error_infogain_configuration(tmp_path):
    body = inputs(data=(2, 3), label=(2,))
    expect_error(tmp_path, body + layer("InfogainLoss", ["data", "label"], ["loss"]),
                 "infogain matrix source must be specified")
    expect_error(tmp_path, body + layer("InfogainLoss", ["data", "label"], ["loss"],
                                        'infogain_loss_param { source: "nowhere.binaryproto" }'),
                 "'nowhere.binaryproto' does not exist")
    expect_error(tmp_path, body + layer("InfogainLoss", ["data", "label"], ["loss"],
                                        "loss_param { normalize: true }"),
                 "normalize is deprecated")
    expect_error(tmp_path, inputs(data=(2, 3), label=(2,), H=(2, 2))
                 + layer("InfogainLoss", ["data", "label", "H"], ["loss"]),
                 "3x3 values", "[2, 2]")


def test_error_infogain_source_contents(tmp_path):
    blob = caffe.caffe_pb2.BlobProto()
    blob.shape.dim.extend([2, 2])
    blob.data.extend([1.0, 0.0, 0.0, 1.0])
    (tmp_path / "H.binaryproto").write_bytes(blob.SerializeToString())
    (tmp_path / "bad.binaryproto").write_bytes(b"\xff\xff\xff")
    body = inputs(data=(2, 3), label=(2,))
    expect_error(tmp_path, body + layer("InfogainLoss", ["data", "label"], ["loss"],
                                        'infogain_loss_param { source: "H.binaryproto" }'),
                 "must be 3x3 (9 values), got 4 values")
    with pytest.raises(FormatError, match="not a binary BlobProto"):
        make_net(tmp_path, body + layer("InfogainLoss", ["data", "label"], ["loss"],
                                        'infogain_loss_param { source: "bad.binaryproto" }'))


def test_error_accuracy_top_k(tmp_path):
    expect_error(tmp_path, inputs(data=(2, 3), label=(2,)) + layer(
        "Accuracy", ["data", "label"], ["acc"], "accuracy_param { top_k: 4 }"),
        "top_k must be less than or equal to the number of classes", "top_k 4")


@pytest.mark.parametrize("bottoms, tops, extra, fragments", [
    (["x", "cont"], ["h"], "num_output: 0", ["num_output must be positive, got 0"]),
    (["x"], ["h"], "num_output: 4", ["expects at least 2 bottom"]),
    (["x", "cont", "xs", "h0"], ["h"], "num_output: 4", ["2 or 3 bottom(s), got 4"]),
    (["x", "cont"], ["h", "hT"], "num_output: 4", ["expects 1 top(s)", "got 2"]),
    (["x", "cont", "h0"], ["h", "hT", "cT"], "num_output: 4 expose_hidden: true",
     ["4 or 5 bottom(s), got 3"]),
    (["x", "cont", "h0", "bad"], ["h", "hT", "cT"], "num_output: 4 expose_hidden: true",
     ["(1, N, num_output) = [1, 2, 4]", "got [1, 2, 3]"]),
    (["x", "cont2"], ["h"], "num_output: 4", ["cont must be (T, N) = [3, 2]", "got [2, 3]"]),
    (["x", "cont", "xs2"], ["h"], "num_output: 4", ["x_static must be (N, ...)", "[3, 5]"]),
    (["x1", "cont"], ["h"], "num_output: 4", ["at least 2 axes", "[3]"]),
])
def test_error_lstm_configuration(tmp_path, bottoms, tops, extra, fragments):
    body = inputs(x=(3, 2, 5), x1=(3,), cont=(3, 2), cont2=(2, 3), xs=(2, 5), xs2=(3, 5),
                  h0=(1, 2, 4), bad=(1, 2, 3))
    expect_error(tmp_path, body + layer("LSTM", bottoms, tops, f"recurrent_param {{ {extra} }}"),
                 *fragments)


def test_error_lstm_unit_shapes(tmp_path):
    expect_error(tmp_path, inputs(c=(1, 2, 3), x=(1, 2, 8), cont=(1, 2))
                 + layer("LSTMUnit", ["c", "x", "cont"], ["c1", "h1"]),
                 "4 * hidden (12)", "[1, 2, 8]")
    expect_error(tmp_path, inputs(c=(1, 2, 3), x=(1, 2, 12), cont=(2, 2))
                 + layer("LSTMUnit", ["c", "x", "cont"], ["c1", "h1"]),
                 "bottom cont must have 2 axes", "got [2, 2]")
