"""Family C (blob shaping and routing, softmax, utility layers): configuration errors and
the Caffe rules the golden cases do not pin down, on small prototxts."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch import NetError


def inputs(**shapes: tuple[int, ...]) -> str:
    """Input layers, one per named blob."""
    return "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
        for name, shape in shapes.items())


def layer(name: str, type_: str, bottoms: list[str], tops: list[str], extra: str = "") -> str:
    refs = "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)
    return f'layer {{ name: "{name}" type: "{type_}"{refs} {extra} }}\n'


def build(tmp_path, body: str, backward: bool = True) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text(("force_backward: true\n" if backward else "") + body)
    return caffe.Net(str(path), caffe.TEST)


def forward(net: caffe.Net, **data: np.ndarray) -> caffe.Net:
    for name, value in data.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.forward()
    return net


def backward(net: caffe.Net, **diffs: np.ndarray) -> caffe.Net:
    for name, value in diffs.items():
        net.blobs[name].diff[...] = value
    net.backward()
    return net


def config_error(tmp_path, body: str, *fragments: str) -> str:
    """Building the net fails with a NetError naming layer 'L' and every fragment."""
    with pytest.raises(NetError) as info:
        build(tmp_path, body)
    message = str(info.value)
    for fragment in ("layer 'L'", *fragments):
        assert fragment in message, message
    return message


# -- configuration errors ------------------------------------------------------------------
@pytest.mark.parametrize("extra, fragments", [
    ("eltwise_param { coeff: 1 }", ["one coefficient per bottom", "expected 0 or 2, got 1"]),
    ("eltwise_param { operation: PROD coeff: 1 coeff: 2 }", ["only for operation SUM"]),
])
def test_eltwise_coeff_errors(tmp_path, extra, fragments):
    config_error(tmp_path, inputs(a=(2, 3), b=(2, 3)) + layer("L", "Eltwise", ["a", "b"], ["y"], extra),
                 *fragments)


def test_eltwise_shape_mismatch(tmp_path):
    config_error(tmp_path, inputs(a=(2, 3), b=(2, 4)) + layer("L", "Eltwise", ["a", "b"], ["y"]),
                 "expected bottom 1 of shape [2, 3]", "got [2, 4]")


def test_concat_errors(tmp_path):
    both = inputs(a=(2, 3), b=(2, 4)) + layer("L", "Concat", ["a", "b"], ["y"],
                                              "concat_param { axis: 1 concat_dim: 1 }")
    config_error(tmp_path, both, "either concat_param.axis or the legacy")
    mismatch = inputs(a=(2, 3), b=(3, 4)) + layer("L", "Concat", ["a", "b"], ["y"])
    config_error(tmp_path, mismatch, "except along axis 1", "expected bottom 1 like [2, 3]",
                 "got [3, 4]")
    far = inputs(a=(2, 3)) + layer("L", "Concat", ["a"], ["y"], "concat_param { axis: -3 }")
    config_error(tmp_path, far, "concat_param.axis -3 is out of range", "expected -2 <=")
    legacy = inputs(a=(2, 3)) + layer("L", "Concat", ["a"], ["y"], "concat_param { concat_dim: 2 }")
    config_error(tmp_path, legacy, "concat_param.concat_dim 2 is out of range")


@pytest.mark.parametrize("extra, tops, fragments", [
    ("slice_param { slice_point: 1 }", 3, ["expected 2 point(s) for 3 tops, got 1"]),
    ("slice_param { slice_point: 2 slice_point: 2 }", 3, ["strictly increasing", "got 2"]),
    ("slice_param { slice_point: 7 }", 2, ["does not fit an axis of size 6"]),
    ("", 4, ["divide the sliced axis evenly", "divisible by 4, got 6"]),
])
def test_slice_errors(tmp_path, extra, tops, fragments):
    body = inputs(a=(2, 6)) + layer("L", "Slice", ["a"], [f"s{i}" for i in range(tops)], extra)
    config_error(tmp_path, body, *fragments)


@pytest.mark.parametrize("type_, extra, fragments", [
    ("Reshape", "reshape_param { shape { dim: -1 } }", ["in-place", "top 'a' = bottom"]),
    ("Flatten", "", ["in-place"]),
])
def test_reshape_and_flatten_refuse_in_place(tmp_path, type_, extra, fragments):
    config_error(tmp_path, inputs(a=(2, 3)) + layer("L", type_, ["a"], ["a"], extra), *fragments)


@pytest.mark.parametrize("param, fragments", [
    ("shape { dim: -1 dim: -1 }", ["at most one -1", "got 2"]),
    ("shape { dim: 0 dim: 0 dim: 0 }", ["0 at position 2", "no axis 2 to copy"]),
    ("shape { dim: 4 dim: -1 }", ["divisible by", "(4)"]),
    ("shape { dim: 5 }", ["output count must match", "expected 6", "got 5"]),
    ("axis: 3 shape { dim: 1 }", ["axis 3 is out of range", "-3 <= axis <= 2"]),
    ("axis: 1 num_axes: 2 shape { dim: 1 }", ["axis + num_axes", "expected <= 2", "got 3"]),
])
def test_reshape_errors(tmp_path, param, fragments):
    body = inputs(a=(2, 3)) + layer("L", "Reshape", ["a"], ["y"], f"reshape_param {{ {param} }}")
    config_error(tmp_path, body, *fragments)


def test_flatten_end_before_axis(tmp_path):
    body = inputs(a=(2, 3, 4)) + layer("L", "Flatten", ["a"], ["y"],
                                       "flatten_param { axis: 2 end_axis: 0 }")
    config_error(tmp_path, body, "expected end_axis >= 1, got 0")


@pytest.mark.parametrize("param, fragments", [
    ("offset: 1 offset: 2 offset: 3", ["one value per cropped axis", "expected 2", "got 3"]),
    ("offset: 0 offset: 3", ["crop of axis 3 is out of bounds", "<= 5", "offset 3 + size 3"]),
    ("axis: 4", ["crop_param.axis 4 is out of range"]),
])
def test_crop_errors(tmp_path, param, fragments):
    body = inputs(a=(2, 3, 4, 5), b=(2, 3, 2, 3)) + layer("L", "Crop", ["a", "b"], ["y"],
                                                        f"crop_param {{ {param} }}")
    config_error(tmp_path, body, *fragments)


def test_tile_needs_positive_tiles(tmp_path):
    config_error(tmp_path, inputs(a=(2, 3)) + layer("L", "Tile", ["a"], ["y"]), "tiles is required")
    config_error(tmp_path, inputs(a=(2, 3)) + layer("L", "Tile", ["a"], ["y"],
                                                    "tile_param { tiles: 0 }"),
                 "must be positive, got 0")


def test_argmax_top_k_too_large(tmp_path):
    flat = inputs(a=(2, 3)) + layer("L", "ArgMax", ["a"], ["y"], "argmax_param { top_k: 4 }")
    config_error(tmp_path, flat, "flattened size of one instance", "expected <= 3, got 4")
    axis = inputs(a=(2, 3)) + layer("L", "ArgMax", ["a"], ["y"], "argmax_param { top_k: 3 axis: 0 }")
    config_error(tmp_path, axis, "size of axis 0", "expected <= 2, got 3")


def test_filter_errors(tmp_path):
    tops = inputs(x=(4, 2), s=(4,)) + layer("L", "Filter", ["x", "s"], ["a", "b"])
    config_error(tmp_path, tops, "expected 1 top(s), got 2")
    selector = inputs(x=(4, 2), s=(4, 2)) + layer("L", "Filter", ["x", "s"], ["a"])
    config_error(tmp_path, selector, "selector", "got shape [4, 2]")
    batch = inputs(x=(3, 2), s=(4,)) + layer("L", "Filter", ["x", "s"], ["a"])
    config_error(tmp_path, batch, "expected bottom 0 to start with 4", "got shape [3, 2]")


def test_batch_reindex_errors(tmp_path):
    body = inputs(x=(3, 2), i=(2, 1)) + layer("L", "BatchReindex", ["x", "i"], ["y"])
    config_error(tmp_path, body, "must be 1-D", "got shape [2, 1]")
    net = build(tmp_path, inputs(x=(3, 2), i=(2,)) + layer("L", "BatchReindex", ["x", "i"], ["y"]))
    for bad in (3.0, -0.5):
        with pytest.raises(NetError, match=rf"layer 'L'.*index {bad} out of range: expected 0 <= "
                                           r"index < 3"):
            forward(net, x=np.zeros((3, 2), np.float32), i=np.array([0, bad], np.float32))


@pytest.mark.parametrize("param, tops, fragments", [
    ("shape { dim: 2 } shape { dim: 3 }", 3, ["shape must be given once or once per top (3), got 2"]),
    ("num: 1 channels: 1 height: 1", 1, ["width must be given once", "got 0"]),
    ("num: 1 channels: 1 height: 1 width: 1 shape { dim: 2 }", 1, ["got both"]),
    ('shape { dim: 2 } data_filler { type: "nope" }', 1, ["unknown filler type 'nope'"]),
    ('shape { dim: 2 } data_filler { } data_filler { }', 3, ["0, 1 or 3", "got 2"]),
])
def test_dummy_data_errors(tmp_path, param, tops, fragments):
    body = layer("L", "DummyData", [], [f"d{i}" for i in range(tops)],
                 f"dummy_data_param {{ {param} }}")
    config_error(tmp_path, body, *fragments)


# -- rules the golden cases do not cover ---------------------------------------------------
def test_eltwise_max_ties_follow_caffe(tmp_path):
    """eltwise_layer.cpp Forward_cpu: bottoms 0/1 use ``a > b ? a : b`` (a tie picks bottom 1),
    later bottoms a strict ``>`` (a tie keeps the earlier); the diff goes to that bottom."""
    body = inputs(a=(4,), b=(4,), c=(4,)) + layer("L", "Eltwise", ["a", "b", "c"], ["y"],
                                                  "eltwise_param { operation: MAX coeff: 5 coeff: 5 coeff: 5 }")
    net = forward(build(tmp_path, body),
                  a=np.array([1, 2, 0, 3], np.float32), b=np.array([1, 1, 2, 3], np.float32),
                  c=np.array([0, 2, 2, 3], np.float32))
    np.testing.assert_array_equal(net.blobs["y"].data, [1, 2, 2, 3])  # MAX ignores coeff, as Caffe
    backward(net, y=np.array([10, 20, 30, 40], np.float32))
    np.testing.assert_array_equal(net.blobs["a"].diff, [0, 20, 0, 0])
    np.testing.assert_array_equal(net.blobs["b"].diff, [10, 0, 30, 40])
    np.testing.assert_array_equal(net.blobs["c"].diff, [0, 0, 0, 0])


@pytest.mark.parametrize("stable", [True, False])
def test_eltwise_prod_gradient_at_zero(tmp_path, stable):
    """eltwise_layer.cpp Backward_cpu: the stable PROD gradient multiplies the other bottoms;
    the unstable one divides the top by the bottom, giving nan where the bottom is 0."""
    body = inputs(a=(2,), b=(2,), c=(2,)) + layer(
        "L", "Eltwise", ["a", "b", "c"], ["y"],
        f"eltwise_param {{ operation: PROD stable_prod_grad: {str(stable).lower()} }}")
    net = forward(build(tmp_path, body), a=np.array([0, 2], np.float32),
                  b=np.array([3, 4], np.float32), c=np.array([5, 6], np.float32))
    backward(net, y=np.ones(2, np.float32))
    expected = [15, 24] if stable else [np.nan, 24]
    np.testing.assert_array_equal(net.blobs["a"].diff, expected)
    np.testing.assert_array_equal(net.blobs["b"].diff, [0, 12])


def test_single_bottom_concat_and_single_top_slice_pass_through(tmp_path):
    body = inputs(a=(2, 3)) + layer("C", "Concat", ["a"], ["c"]) + layer("S", "Slice", ["c"], ["s"])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    net = backward(forward(build(tmp_path, body), a=x), s=np.full((2, 3), 2, np.float32))
    np.testing.assert_array_equal(net.blobs["s"].data, x)
    np.testing.assert_array_equal(net.blobs["a"].diff, np.full((2, 3), 2))


def test_slice_point_at_the_end_gives_an_empty_top(tmp_path):
    """slice_layer.cpp Reshape: the last top gets ``size - last point``, which may be 0."""
    body = inputs(a=(2, 3)) + layer("L", "Slice", ["a"], ["s0", "s1"], "slice_param { slice_point: 3 }")
    net = forward(build(tmp_path, body, backward=False), a=np.ones((2, 3), np.float32))
    assert net.blobs["s0"].shape == (2, 3) and net.blobs["s1"].shape == (2, 0)


@pytest.mark.parametrize("param, shape", [
    ("flatten_param { axis: 1 end_axis: 0 }", (2, 1, 3, 4)),  # count(1, 1) = 1: inserts an axis
    ("flatten_param { axis: 0 end_axis: -2 }", (6, 4)),
])
def test_flatten_axis_rules(tmp_path, param, shape):
    body = inputs(a=(2, 3, 4)) + layer("L", "Flatten", ["a"], ["y"], param)
    net = forward(build(tmp_path, body, backward=False), a=np.zeros((2, 3, 4), np.float32))
    assert net.blobs["y"].shape == shape


@pytest.mark.parametrize("param, shape", [
    ("axis: 0 num_axes: 0 shape { dim: 1 }", (1, 2, 3, 4)),
    ("axis: -3 num_axes: 1 shape { dim: 3 dim: 1 }", (2, 3, 1, 4)),
    ("axis: 1 shape { dim: 0 dim: -1 }", (2, 3, 4)),
])
def test_reshape_axis_rules(tmp_path, param, shape):
    """reshape_layer.cpp: a negative axis is ``ndim + axis + 1``; 0 copies the bottom dim at
    ``axis + position``; dims outside [axis, axis + num_axes) are kept."""
    body = inputs(a=(2, 3, 4)) + layer("L", "Reshape", ["a"], ["y"], f"reshape_param {{ {param} }}")
    net = forward(build(tmp_path, body, backward=False), a=np.zeros((2, 3, 4), np.float32))
    assert net.blobs["y"].shape == shape


@pytest.mark.parametrize("param, expected", [
    ("", [[[3.0]], [[2.0]]]),                       # top_k 1 takes the max path
    ("top_k: 2 out_max_val: true", [[[3.0, 0.0], [5.0, 5.0]], [[2.0, 1.0], [7.0, 7.0]]]),
])
def test_argmax_ties_prefer_the_larger_index(tmp_path, param, expected):
    """argmax_layer.cpp: std::partial_sort with std::greater on (value, index) pairs."""
    body = inputs(a=(2, 4)) + layer("L", "ArgMax", ["a"], ["y"], f"argmax_param {{ {param} }}")
    x = np.array([[5, 1, 2, 5], [0, 7, 7, 3]], np.float32)
    net = forward(build(tmp_path, body, backward=False), a=x)
    np.testing.assert_array_equal(net.blobs["y"].data, expected)


def test_argmax_axis_ties_and_no_axis_padding(tmp_path):
    body = (inputs(a=(2, 2, 3)) + layer("A", "ArgMax", ["a"], ["y"], "argmax_param { axis: 1 }")
            + layer("B", "ArgMax", ["a"], ["z"], "argmax_param { out_max_val: true }"))
    x = np.zeros((2, 2, 3), np.float32)
    x[0, 0, 0] = 1
    net = forward(build(tmp_path, body, backward=False), a=x)
    np.testing.assert_array_equal(net.blobs["y"].data, [[[0, 1, 1]], [[1, 1, 1]]])
    assert net.blobs["z"].shape == (2, 2, 1)
    np.testing.assert_array_equal(net.blobs["z"].data[:, :, 0], [[0, 1], [5, 0]])


def test_filter_all_zero_selector(tmp_path):
    body = inputs(s=(3,)) + layer("x", "Parameter", [], ["x"], "parameter_param { shape { dim: 3 dim: 2 } }") \
        + layer("L", "Filter", ["x", "s"], ["f"], "loss_weight: 1 propagate_down: true propagate_down: false")
    net = build(tmp_path, body, backward=False)
    net.params["x"][0].data[...] = 1
    forward(net, s=np.zeros(3, np.float32))
    assert net.blobs["f"].shape == (0, 2)
    net.backward()
    np.testing.assert_array_equal(net.params["x"][0].diff, np.zeros((3, 2)))


def test_batch_reindex_truncates_float_indices(tmp_path):
    """batch_reindex_layer.cpp: ``static_cast<int>(permut[n])`` after a range check on the float."""
    body = inputs(x=(3, 2), i=(3,)) + layer("L", "BatchReindex", ["x", "i"], ["y"])
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    net = forward(build(tmp_path, body, backward=False), x=x, i=np.array([2.9, 0.5, 1.0], np.float32))
    np.testing.assert_array_equal(net.blobs["y"].data, x[[2, 0, 1]])


def test_dummy_data_refills_only_random_tops(tmp_path):
    """dummy_data_layer.cpp: constant fillers fill once at setup, others refill every forward;
    one filler given applies to every top."""
    body = layer("L", "DummyData", [], ["c", "r"], 'dummy_data_param { shape { dim: 50 } '
                 'data_filler { type: "constant" value: 3 } data_filler { type: "uniform" min: 2 max: 4 } }')
    net = build(tmp_path, body, backward=False)
    first = net.forward(blobs=["r"])["r"].copy()
    second = net.forward(blobs=["r"])["r"]
    np.testing.assert_array_equal(net.blobs["c"].data, np.full(50, 3))
    assert (first >= 2).all() and (first <= 4).all() and not np.array_equal(first, second)
    shared = layer("L", "DummyData", [], ["a", "b"], 'dummy_data_param { shape { dim: 2 } shape { dim: 3 } '
                   'data_filler { type: "constant" value: -1 } }')
    net = build(tmp_path, shared, backward=False)
    net.forward()
    np.testing.assert_array_equal(net.blobs["b"].data, [-1, -1, -1])


@pytest.mark.parametrize("param, top, diff", [
    # reduction_layer.cpp Backward_cpu: ASUM uses caffe_cpu_sign, so sign(0) = 0
    ("operation: ASUM axis: 1 coeff: 2", [8.0, 6.0], [[2, 0, -2], [0, 2, 2]]),
    ("operation: MEAN axis: -1", [-2 / 3, 1.0], [[1 / 3] * 3, [1 / 3] * 3]),
])
def test_reduction_gradient_rules(tmp_path, param, top, diff):
    body = inputs(a=(2, 3)) + layer("L", "Reduction", ["a"], ["y"], f"reduction_param {{ {param} }}")
    net = forward(build(tmp_path, body), a=np.array([[1, 0, -3], [0, 1, 2]], np.float32))
    np.testing.assert_allclose(net.blobs["y"].data, top, rtol=1e-6)
    backward(net, y=np.ones(2, np.float32))
    np.testing.assert_allclose(net.blobs["a"].diff, diff, rtol=1e-6)


def test_softmax_negative_axis(tmp_path):
    body = inputs(a=(2, 3, 4)) + layer("L", "Softmax", ["a"], ["y"], "softmax_param { axis: -2 }")
    x = np.random.RandomState(0).randn(2, 3, 4).astype(np.float32)
    net = forward(build(tmp_path, body, backward=False), a=x)
    e = np.exp(x - x.max(1, keepdims=True))
    np.testing.assert_allclose(net.blobs["y"].data, e / e.sum(1, keepdims=True), rtol=1e-6)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_shape_layers_trace(tmp_path):
    """The routing layers trace with torch.jit.trace and replay the same numbers."""
    body = (inputs(a=(2, 6, 4), b=(2, 6, 4))
            + layer("E", "Eltwise", ["a", "b"], ["e"], "eltwise_param { operation: MAX }")
            + layer("S", "Slice", ["e"], ["s0", "s1"], "slice_param { slice_point: 2 }")
            + layer("C", "Concat", ["s1", "s0"], ["c"])
            + layer("R", "Reshape", ["c"], ["r"], "reshape_param { shape { dim: 0 dim: -1 } }")
            + layer("M", "Softmax", ["r"], ["m"]))
    path = tmp_path / "net.prototxt"
    path.write_text(body)
    module = caffe.load(str(path))
    a, b = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    traced = torch.jit.trace(module, (a, b))
    a2, b2 = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    torch.testing.assert_close(traced(a2, b2), module(a2, b2))


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_family_runs_on_device(tmp_path, device):
    """Every layer of the family in one net gives the CPU's numbers and gradients on ``device``."""
    body = (inputs(a=(4, 6, 3, 4), b=(4, 6, 3, 4), sel=(4,), idx=(3,))
            + layer("E1", "Eltwise", ["a", "b"], ["m"], "eltwise_param { operation: MAX }")
            + layer("E2", "Eltwise", ["a", "b", "m"], ["p"], "eltwise_param { operation: PROD }")
            + layer("E3", "Eltwise", ["a", "p"], ["s"], "eltwise_param { coeff: 1 coeff: -0.5 }")
            + layer("SL", "Slice", ["s"], ["s0", "s1"], "slice_param { slice_point: 2 }")
            + layer("C", "Concat", ["s1", "s0"], ["c"])
            + layer("D", "DummyData", [], ["ref"], "dummy_data_param { shape { dim: 4 dim: 6 dim: 2 dim: 3 } }")
            + layer("CR", "Crop", ["c", "ref"], ["cr"], "crop_param { offset: 1 }")
            + layer("T", "Tile", ["cr"], ["t"], "tile_param { axis: -1 tiles: 2 }")
            + layer("R", "Reshape", ["t"], ["r"], "reshape_param { shape { dim: 0 dim: -1 } }")
            + layer("SM", "Softmax", ["r"], ["sm"])
            + layer("F", "Filter", ["sm", "sel"], ["f"])
            + layer("BR", "BatchReindex", ["sm", "idx"], ["br"])
            + layer("RED", "Reduction", ["br"], ["red"], "reduction_param { operation: SUMSQ axis: 1 }")
            + layer("AM", "ArgMax", ["sm"], ["am"], "argmax_param { top_k: 2 out_max_val: true }")
            + layer("FL", "Flatten", ["a"], ["fl"], "flatten_param { axis: 2 }")
            + layer("W", "Parameter", [], ["w"], "parameter_param { shape { dim: 4 dim: 6 dim: 12 } }")
            + layer("E4", "Eltwise", ["fl", "w"], ["fw"]))
    path = tmp_path / "net.prototxt"
    path.write_text(body)
    reference = caffe.load(str(path))
    rng = torch.Generator().manual_seed(0)
    with torch.no_grad():
        reference.layers["W"].blobs[0].normal_(generator=rng)
    feed = {"a": torch.randn(4, 6, 3, 4, generator=rng), "b": torch.randn(4, 6, 3, 4, generator=rng),
            "sel": torch.tensor([1.0, 0.0, 1.0, 1.0]), "idx": torch.tensor([2.0, 0.0, 2.0])}
    weights = {name: torch.randn(shape, generator=rng) for name, shape in
               {"f": (3, 72), "red": (3,), "fw": (4, 6, 12)}.items()}

    def run(module, dev):
        module = module.to(dev)
        ins = {k: v.to(dev, copy=True).requires_grad_(k in ("a", "b")) for k, v in feed.items()}
        outs = module(**ins)
        loss = sum((outs[k] * w.to(dev)).sum() for k, w in weights.items())
        loss.backward()
        grads = [ins["a"].grad, ins["b"].grad, module.layers["W"].blobs[0].grad]
        return [t.detach().cpu() for t in [*outs.values(), *grads]]

    expected = run(copy.deepcopy(reference), "cpu")
    for got, want in zip(run(reference, device), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
