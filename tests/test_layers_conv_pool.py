"""Convolution, pooling and inner-product layers: configuration errors and the Caffe rules
that the golden cases do not reach (pooling pads beyond kernel/2, STOCHASTIC pooling,
several bottoms, 0-D convolution, index truncation, tracing)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import caffe2torch as caffe

FLT_MAX = np.finfo(np.float32).max


def _input(name: str, shape: tuple[int, ...]) -> str:
    dims = " ".join(f"dim: {d}" for d in shape)
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {dims} }} }} }}\n')


def make_net(tmp_path: Path, layers: str, inputs: dict[str, tuple[int, ...]],
             phase: int = caffe.TEST) -> caffe.Net:
    """A net of Input layers plus ``layers`` (prototxt text), with force_backward."""
    text = "force_backward: true\n" + "".join(_input(n, s) for n, s in inputs.items()) + layers
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    return caffe.Net(str(path), phase)


def run(net: caffe.Net, feeds: dict[str, np.ndarray],
        topdiffs: dict[str, np.ndarray] | None = None) -> None:
    """Forward with ``feeds``; backward from ``topdiffs`` when given."""
    for name, value in feeds.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.reshape()
    net.forward()
    if topdiffs is not None:
        for name, value in topdiffs.items():
            net.blobs[name].diff[...] = value
        for params in net.params.values():
            for p in params:
                p.diff[...] = 0
        net.backward()


def pool_layer(params: str, tops: str = 'top: "pool"') -> str:
    return (f'layer {{ name: "pool" type: "Pooling" bottom: "data" {tops} '
            f'pooling_param {{ {params} }} }}\n')


# --- a direct port of Caffe's CPU pooling loops, the judge for what golden data lacks -----

def caffe_pool_reference(x: np.ndarray, method: str, kernel: tuple[int, int],
                         stride: tuple[int, int], pad: tuple[int, int], ceil: bool,
                         top_diff: np.ndarray | None = None):
    """PoolingLayer::Reshape / Forward_cpu / Backward_cpu (BVLC pooling_layer.cpp), in numpy.

    Output size: ceil (or floor) of (H + 2*pad - k) / stride, plus one, minus one more when
    any pad is non-zero and the last window starts at or past H + pad. MAX scans its window
    clipped to the input from -FLT_MAX with a strict '>' (the first maximum wins, empty
    windows keep -FLT_MAX and index -1); AVE sums the clipped window and divides by the
    window clipped only to H + pad. Returns (top, mask, bottom_diff).
    """
    n, c, height, width = x.shape
    rnd = math.ceil if ceil else math.floor
    out = [int(rnd((size + 2 * p - k) / s)) + 1
           for size, k, s, p in zip((height, width), kernel, stride, pad)]
    if pad != (0, 0):
        for i, size in enumerate((height, width)):
            if (out[i] - 1) * stride[i] >= size + pad[i]:
                out[i] -= 1
    top = np.zeros((n, c, *out), np.float32)
    mask = np.full((n, c, *out), -1.0, np.float32)
    bottom_diff = np.zeros_like(x)
    for ph in range(out[0]):
        for pw in range(out[1]):
            hs, ws = ph * stride[0] - pad[0], pw * stride[1] - pad[1]
            if method == "MAX":
                he, we = min(hs + kernel[0], height), min(ws + kernel[1], width)
                hs, ws = max(hs, 0), max(ws, 0)
                if he <= hs or we <= ws:
                    top[:, :, ph, pw] = -FLT_MAX
                    continue
                window = x[:, :, hs:he, ws:we].reshape(n, c, -1)
                arg = window.argmax(axis=2)
                h, w = hs + arg // (we - ws), ws + arg % (we - ws)
                top[:, :, ph, pw] = window.max(axis=2)
                mask[:, :, ph, pw] = h * width + w
                if top_diff is not None:
                    for i in range(n):
                        for j in range(c):
                            bottom_diff[i, j, h[i, j], w[i, j]] += top_diff[i, j, ph, pw]
            else:
                he = min(hs + kernel[0], height + pad[0])
                we = min(ws + kernel[1], width + pad[1])
                size = (he - hs) * (we - ws)
                hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
                top[:, :, ph, pw] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / np.float32(size)
                if top_diff is not None:
                    bottom_diff[:, :, hs:he, ws:we] += (top_diff[:, :, ph, pw] / np.float32(size)
                                                        )[:, :, None, None]
    return top, mask, bottom_diff


POOL_CASES = [
    # (method, kernel, stride, pad, ceil, shape): all beyond what torch's pooling accepts
    # directly or where its output size differs from Caffe's.
    ("MAX", (3, 3), (2, 2), (2, 2), True, (2, 3, 7, 8)),      # pad > kernel / 2
    ("AVE", (3, 3), (2, 2), (2, 2), True, (2, 3, 7, 8)),
    ("AVE", (4, 3), (3, 2), (3, 2), True, (2, 2, 9, 7)),      # rectangular, pad = kernel - 1
    ("MAX", (4, 3), (3, 2), (3, 1), False, (2, 2, 9, 7)),     # FLOOR with a large pad
    ("AVE", (3, 3), (2, 2), (2, 2), False, (1, 2, 8, 8)),
    ("MAX", (2, 2), (3, 3), (0, 0), True, (2, 2, 6, 7)),      # empty last row (no pad)
    ("AVE", (2, 2), (3, 3), (0, 1), True, (2, 2, 7, 7)),      # pad_w only: clip applies to H too
]


def _pool_params(method: str, kernel, stride, pad, ceil: bool) -> str:
    text = (f"pool: {method} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} "
            f"stride_w: {stride[1]} pad_h: {pad[0]} pad_w: {pad[1]}")
    return text + ("" if ceil else " round_mode: FLOOR")


@pytest.mark.parametrize("method,kernel,stride,pad,ceil,shape", POOL_CASES)
def test_pooling_matches_caffe_loops(tmp_path, method, kernel, stride, pad, ceil, shape):
    """Forward, mask and backward equal the port of Caffe's loops, ties included."""
    rng = np.random.RandomState(7)
    x = np.round(rng.randn(*shape) * 2).astype(np.float32)  # quantised: many ties
    tops = 'top: "pool" top: "mask"' if method == "MAX" else 'top: "pool"'
    net = make_net(tmp_path, pool_layer(_pool_params(method, kernel, stride, pad, ceil), tops),
                   {"data": shape})
    run(net, {"data": x})
    top, mask, _ = caffe_pool_reference(x, method, kernel, stride, pad, ceil)
    np.testing.assert_allclose(net.blobs["pool"].data, top, rtol=1e-6, atol=1e-6)
    if method == "MAX":
        np.testing.assert_array_equal(net.blobs["mask"].data, mask)
    empty = (mask == -1).any() if method == "MAX" else not np.isfinite(top).all()
    if empty:  # Caffe's backward writes out of bounds for empty windows: nothing to compare
        return
    top_diff = rng.randn(*top.shape).astype(np.float32)
    run(net, {"data": x}, {"pool": top_diff})
    _, _, bottom_diff = caffe_pool_reference(x, method, kernel, stride, pad, ceil, top_diff)
    np.testing.assert_allclose(net.blobs["data"].diff, bottom_diff, rtol=1e-5, atol=1e-6)


def test_fork_ceil_mode_false_is_floor(tmp_path):
    """The fork field ``ceil_mode: false`` selects the same output as ``round_mode: FLOOR``."""
    x = np.random.RandomState(1).randn(2, 3, 8, 10).astype(np.float32)
    net = make_net(tmp_path, pool_layer("pool: MAX kernel_size: 3 stride: 2 ceil_mode: false"),
                   {"data": x.shape})
    run(net, {"data": x})
    top, _, _ = caffe_pool_reference(x, "MAX", (3, 3), (2, 2), (0, 0), False)
    np.testing.assert_array_equal(net.blobs["pool"].data, top)


def test_global_pooling_follows_the_input_size(tmp_path):
    """Caffe resets the global kernel to H x W at every Reshape."""
    net = make_net(tmp_path, pool_layer("pool: AVE global_pooling: true"), {"data": (2, 3, 5, 6)})
    x = np.random.RandomState(2).randn(1, 3, 9, 4).astype(np.float32)
    run(net, {"data": x})
    np.testing.assert_allclose(net.blobs["pool"].data, x.mean(axis=(2, 3), keepdims=True),
                               rtol=1e-5, atol=1e-6)


def test_stochastic_pooling_test_phase_is_self_weighted_average(tmp_path):
    """StoPoolForwardTest (pooling_layer.cu): sum(x^2) / (FLT_MIN + sum(x)) over each window."""
    x = np.random.RandomState(3).rand(2, 2, 5, 5).astype(np.float32)
    net = make_net(tmp_path, pool_layer("pool: STOCHASTIC kernel_size: 2 stride: 2"),
                   {"data": x.shape})
    run(net, {"data": x})
    padded = np.zeros((2, 2, 6, 6), np.float32)
    padded[:, :, :5, :5] = x
    blocks = padded.reshape(2, 2, 3, 2, 3, 2)
    sums = blocks.sum(axis=(3, 5)) + np.finfo(np.float32).tiny
    expected = (blocks ** 2).sum(axis=(3, 5)) / sums
    np.testing.assert_allclose(net.blobs["pool"].data, expected, rtol=1e-5, atol=1e-7)


def test_stochastic_pooling_train_samples_by_value(tmp_path):
    """StoPoolForwardTrain/StoPoolBackward: an element is picked with probability value / sum,
    and only it receives the window's gradient."""
    torch.manual_seed(0)
    count = 4000
    x = np.tile(np.array([[1.0, 3.0]], np.float32), (count, 1, 1, 1))  # one 1x2 window per item
    net = make_net(tmp_path, pool_layer("pool: STOCHASTIC kernel_h: 1 kernel_w: 2 stride: 2"),
                   {"data": x.shape}, phase=caffe.TRAIN)
    run(net, {"data": x}, {"pool": np.ones((count, 1, 1, 1), np.float32)})
    picked = net.blobs["pool"].data.ravel()
    assert set(np.unique(picked)) <= {1.0, 3.0}
    assert abs((picked == 3.0).mean() - 0.75) < 0.03
    diff = net.blobs["data"].diff.reshape(count, 2)
    np.testing.assert_array_equal(diff[:, 1], (picked == 3.0).astype(np.float32))
    np.testing.assert_array_equal(diff.sum(axis=1), np.ones(count, np.float32))


def test_spp_average_with_large_pad_matches_pooling_rule(tmp_path):
    """SPPLayer::GetPoolingParam: bins 2^i, kernel = stride = ceil(H/bins),
    pad = (kernel*bins - H + 1)/2, pooled by Caffe's rules, flattened and concatenated."""
    x = np.random.RandomState(4).randn(2, 2, 9, 6).astype(np.float32)
    net = make_net(tmp_path, 'layer { name: "spp" type: "SPP" bottom: "data" top: "spp" '
                   'spp_param { pyramid_height: 3 pool: AVE } }\n', {"data": x.shape})
    run(net, {"data": x})
    parts = []
    for level in range(3):
        bins = 2 ** level
        kernel = tuple(-(-s // bins) for s in (9, 6))
        pad = tuple((k * bins - s + 1) // 2 for k, s in zip(kernel, (9, 6)))
        top, _, _ = caffe_pool_reference(x, "AVE", kernel, kernel, pad, True)
        parts.append(top.reshape(2, -1))
    np.testing.assert_allclose(net.blobs["spp"].data, np.concatenate(parts, axis=1),
                               rtol=1e-5, atol=1e-6)


# --- convolution --------------------------------------------------------------------------

def test_convolution_with_two_bottoms_shares_weights(tmp_path):
    """ConvolutionLayer: each bottom of the same shape gets its own top from one set of weights."""
    layer = ('layer { name: "conv" type: "Convolution" bottom: "a" bottom: "b" top: "ca" top: "cb" '
             'convolution_param { num_output: 2 kernel_size: 3 pad: 1 '
             'weight_filler { type: "gaussian" std: 1 } '
             'bias_filler { type: "constant" value: 0.5 } } }\n')
    net = make_net(tmp_path, layer, {"a": (1, 3, 5, 5), "b": (1, 3, 5, 5)})
    rng = np.random.RandomState(5)
    a, b = rng.randn(1, 3, 5, 5).astype(np.float32), rng.randn(1, 3, 5, 5).astype(np.float32)
    run(net, {"a": a, "b": b})
    w, bias = (torch.from_numpy(p.data) for p in net.params["conv"])
    for name, value in (("ca", a), ("cb", b)):
        expected = torch.nn.functional.conv2d(torch.from_numpy(value), w, bias, padding=1)
        np.testing.assert_allclose(net.blobs[name].data, expected.numpy(), rtol=1e-5, atol=1e-6)


def test_convolution_without_spatial_axes_is_grouped_matrix_product(tmp_path):
    """With the channel axis last there are 0 spatial axes: weight (num_output, C/group),
    ``top[n, g*O/G + o] = sum_c w[g*O/G + o, c] * x[n, g*C/G + c] + b``."""
    layer = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
             'convolution_param { num_output: 4 group: 2 axis: -1 '
             'weight_filler { type: "gaussian" std: 1 } '
             'bias_filler { type: "gaussian" std: 1 } } }\n')
    net = make_net(tmp_path, layer, {"data": (3, 6)})
    x = np.random.RandomState(6).randn(3, 6).astype(np.float32)
    run(net, {"data": x})
    w, b = (p.data for p in net.params["conv"])
    assert w.shape == (4, 3)
    expected = np.concatenate([x[:, :3] @ w[:2].T, x[:, 3:] @ w[2:].T], axis=1) + b
    np.testing.assert_allclose(net.blobs["conv"].data, expected, rtol=1e-5, atol=1e-5)


def test_convolution_weights_without_filler_start_at_zero(tmp_path):
    """An unset FillerParameter is ``constant 0`` (filler.hpp), not torch's default init."""
    layer = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
             'convolution_param { num_output: 2 kernel_size: 1 } }\n'
             'layer { name: "deconv" type: "Deconvolution" bottom: "conv" top: "deconv" '
             'convolution_param { num_output: 3 kernel_size: 2 stride: 2 } }\n')
    net = make_net(tmp_path, layer, {"data": (1, 3, 4, 4)})
    for params in net.params.values():
        for p in params:
            assert not p.data.any()
    assert net.params["deconv"][0].data.shape == (2, 3, 2, 2)
    assert net.blobs["deconv"].data.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("exact,bound", [(True, 1e-6), (False, 1e-5)])
def test_convolution_weight_gradient_precision(tmp_path, exact, bound):
    """With set_exact_weight_grads(True) one image's gradient is added at a time, as in
    BaseConvolutionLayer::weight_cpu_gemm (within 1e-6 of the float64 gradient, relative to
    its largest element); oneDNN's default reduction stays within the float32 tolerance of
    the golden cases (1e-5)."""
    from caffe2torch.layers.conv import set_exact_weight_grads

    layer = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
             'convolution_param { num_output: 16 kernel_size: 3 pad: 1 '
             'weight_filler { type: "gaussian" std: 0.1 } } }\n')
    net = make_net(tmp_path, layer, {"data": (8, 16, 20, 20)})
    rng = np.random.RandomState(8)
    x = rng.randn(8, 16, 20, 20).astype(np.float32)
    top_diff = rng.randn(8, 16, 20, 20).astype(np.float32)
    set_exact_weight_grads(exact)
    try:
        run(net, {"data": x}, {"conv": top_diff})
    finally:
        set_exact_weight_grads(False)
    weight = torch.from_numpy(net.params["conv"][0].data).double().requires_grad_(True)
    out = torch.nn.functional.conv2d(torch.from_numpy(x).double(), weight, padding=1)
    out.backward(torch.from_numpy(top_diff).double())
    exact_grad = weight.grad.numpy()
    error = np.abs(net.params["conv"][0].diff - exact_grad).max() / np.abs(exact_grad).max()
    assert error < bound


@pytest.mark.parametrize("geometry,num_output", [
    ("kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 2", 48),  # 2x4 outputs: 16 rows
    ("kernel_size: 1", 96),  # 6x7 outputs: 84 rows, the patches are the bottom itself
])
def test_convolution_patch_gemm_weight_gradient(tmp_path, monkeypatch, cpu_mode, geometry,
                                                num_output):
    """A channels-last convolution whose patch matrix has no more rows than it has filters
    gets its weight and bias gradients from one GEMM (_patch_gemm), stride, padding and
    dilation included; all three gradients match the float64 ones within 1e-5."""
    from caffe2torch.layers import conv

    calls = []

    def counted(*args):
        calls.append(tuple(args[1].shape))
        return gemm(*args)

    gemm = conv._patch_gemm
    monkeypatch.setattr(conv, "_patch_gemm", counted)
    layer = (f'layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv" '
             f'convolution_param {{ num_output: {num_output} {geometry} '
             f'weight_filler {{ type: "gaussian" std: 0.1 }} '
             f'bias_filler {{ type: "gaussian" std: 0.1 }} }} }}\n')
    net = make_net(tmp_path, layer, {"data": (2, 5, 6, 7)})
    net.module.use_channels_last(True)  # the default, unless CAFFE2TORCH_CHANNELS_LAST=0
    rng = np.random.RandomState(12)
    x = rng.randn(2, 5, 6, 7).astype(np.float32)
    top_diff = rng.randn(*net.blobs["conv"].data.shape).astype(np.float32)
    run(net, {"data": x}, {"conv": top_diff})
    assert calls == [(2, 5, 6, 7)]
    weight, bias = (torch.from_numpy(p.data).double().requires_grad_(True)
                    for p in net.params["conv"])
    data = torch.from_numpy(x).double().requires_grad_(True)
    layer_module = net.module.layers["conv"]
    stride, pad, dilation = layer_module.conf[:3]
    out = torch.nn.functional.conv2d(data, weight, bias, stride, pad, dilation)
    out.backward(torch.from_numpy(top_diff).double())
    for got, expected in ((net.params["conv"][0].diff, weight.grad),
                          (net.params["conv"][1].diff, bias.grad),
                          (net.blobs["data"].diff, data.grad)):
        expected = expected.numpy()
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_im2col_one_dimensional_with_dilation(tmp_path):
    """im2col_nd_cpu: row c*k + j, column o holds x[c, o*stride + j*dilation - pad] (0 outside)."""
    layer = ('layer { name: "cols" type: "Im2col" bottom: "data" top: "cols" '
             'convolution_param { kernel_size: 3 stride: 2 pad: 2 dilation: 2 } }\n')
    net = make_net(tmp_path, layer, {"data": (2, 3, 9)})
    x = np.random.RandomState(9).randn(2, 3, 9).astype(np.float32)
    run(net, {"data": x})
    out = (9 + 4 - 5) // 2 + 1
    expected = np.zeros((2, 9, out), np.float32)
    for c in range(3):
        for j in range(3):
            for o in range(out):
                i = o * 2 + j * 2 - 2
                if 0 <= i < 9:
                    expected[:, c * 3 + j, o] = x[:, c, i]
    np.testing.assert_array_equal(net.blobs["cols"].data, expected)


# --- inner product and embed ---------------------------------------------------------------

def test_inner_product_follows_a_new_batch_size(tmp_path):
    """Reshape keeps K = count(axis) and lets the leading axes change."""
    layer = ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
             'inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }\n')
    net = make_net(tmp_path, layer, {"data": (2, 4, 5)})
    x = np.random.RandomState(10).randn(7, 4, 5).astype(np.float32)
    run(net, {"data": x})
    np.testing.assert_allclose(net.blobs["ip"].data, x.reshape(7, 20) @ net.params["ip"][0].data.T
                               + net.params["ip"][1].data, rtol=1e-5, atol=1e-5)


def test_embed_truncates_indices_toward_zero(tmp_path):
    """EmbedLayer::Forward_cpu uses static_cast<int>: 1.9 -> 1 and -0.5 -> 0."""
    layer = ('layer { name: "embed" type: "Embed" bottom: "data" top: "embed" '
             'embed_param { num_output: 2 input_dim: 4 bias_term: false '
             'weight_filler { type: "gaussian" std: 1 } } }\n')
    net = make_net(tmp_path, layer, {"data": (3,)})
    run(net, {"data": np.array([1.9, -0.5, 3.0], np.float32)})
    table = net.params["embed"][0].data
    np.testing.assert_array_equal(net.blobs["embed"].data, table[[1, 0, 3]])


def test_embed_rejects_out_of_range_index(tmp_path):
    layer = ('layer { name: "embed" type: "Embed" bottom: "data" top: "embed" '
             'embed_param { num_output: 2 input_dim: 4 } }\n')
    net = make_net(tmp_path, layer, {"data": (2,)})
    with pytest.raises(caffe.NetError, match=r"layer 'embed' \(Embed\).*expected 0 <= index < 4 "
                                              r"\(input_dim\), got 4"):
        run(net, {"data": np.array([0, 4], np.float32)})


def test_inner_product_rejects_a_different_input_size(tmp_path):
    layer = ('layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
             'inner_product_param { num_output: 3 } }\n')
    net = make_net(tmp_path, layer, {"data": (2, 4, 5)})
    with pytest.raises(caffe.NetError, match=r"layer 'ip' \(InnerProduct\).*expected 20 values "
                                              r"from axis 1 on, got 24"):
        run(net, {"data": np.zeros((2, 4, 6), np.float32)})


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_conv_pool_ip_net_traces(tmp_path):
    """The layers run under torch.jit.trace and the traced module gives the same numbers."""
    layers = ('layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
              'convolution_param { num_output: 4 kernel_size: 3 '
              'weight_filler { type: "xavier" } } }\n'
              + pool_layer("pool: MAX kernel_size: 3 stride: 2 pad: 2").replace('"data"', '"conv"')
              + 'layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip" '
              'inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }\n')
    path = tmp_path / "net.prototxt"
    path.write_text(_input("data", (2, 3, 9, 9)) + layers)
    module = caffe.load(str(path))
    x = torch.randn(2, 3, 9, 9)
    traced = torch.jit.trace(module, (x,))
    torch.testing.assert_close(traced(x), module(x))


# --- configuration errors: each names the layer and says what was expected -----------------

CONV = ('layer {{ name: "L" type: "{type}" bottom: "data" top: "out" '
        'convolution_param {{ {p} }} }}\n')
ERRORS = [
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 3 kernel_size: 3 "
                                       "kernel_size: 3"),
     (2, 3, 8, 8), "Convolution", "expected 1 or 2 values, got 3"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 3 kernel_h: 3 kernel_w: 3"),
     (2, 3, 8, 8), "Convolution", "either kernel_size or kernel_h/kernel_w"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_h: 3 kernel_w: 3"),
     (2, 3, 4, 8, 8), "Convolution", "expected 2 spatial axes, got 3"),
    (CONV.format(type="Convolution", p="num_output: 2"), (2, 3, 8, 8), "Convolution",
     "kernel_size is required"),
    (CONV.format(type="Convolution", p="num_output: 4 kernel_size: 3 group: 2"), (2, 3, 8, 8),
     "Convolution", "got 3 channels for group 2"),
    (CONV.format(type="Convolution", p="num_output: 3 kernel_size: 3 group: 2"), (2, 4, 8, 8),
     "Convolution", "got num_output 3 for group 2"),
    (CONV.format(type="Convolution", p="kernel_size: 3"), (2, 3, 8, 8), "Convolution",
     "num_output must be positive, got 0"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 3 stride: 0"), (2, 3, 8, 8),
     "Convolution", "stride must be positive on every spatial axis, got [0, 0]"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 7"), (2, 3, 4, 4),
     "Convolution", "expected at most 4 (size 4 + 2*pad 0), got 7"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 1 axis: 4"), (2, 3, 4, 4),
     "Convolution", "expected -4 <= axis < 4"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 1"), (1, 1, 2, 2, 2, 2),
     "Convolution", "supports 0 to 3 spatial axes"),
    (CONV.format(type="Convolution", p="num_output: 2 kernel_size: 1").replace(
        'top: "out"', 'top: "out" top: "out2"'), (2, 3, 4, 4), "Convolution",
     "expected 1 top(s), got 2"),
    (CONV.format(type="Deconvolution", p="num_output: 2 kernel_size: 1 pad: 1"), (2, 3, 1, 1),
     "Deconvolution", "must be positive, got -1"),
    (CONV.format(type="Im2col", p="kernel_size: 1 axis: -1"), (2, 3), "Im2col",
     "needs at least 1 spatial axis"),
    (pool_layer("pool: MAX kernel_size: 2 pad: 2").replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "expected pad < 2, got 2"),
    (pool_layer("pool: MAX global_pooling: true kernel_size: 2").replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "kernel size cannot be given"),
    (pool_layer("pool: AVE global_pooling: true stride: 2").replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "needs pad 0 and stride 1, got pad [0, 0] and stride [2, 2]"),
    (pool_layer("pool: STOCHASTIC kernel_size: 3 pad: 1").replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "only for MAX and AVE pooling, got pad [1, 1] with STOCHASTIC"),
    (pool_layer("pool: AVE kernel_size: 3", 'top: "a" top: "b"').replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "expected 1 top for AVE, got 2"),
    (pool_layer("pool: MAX kernel_size: 3").replace('"pool" type', '"L" type'),
     (2, 3, 8), "Pooling", "input must have 4 axes"),
    (pool_layer("pool: MAX kernel_h: 3").replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "give kernel_size or both kernel_h and kernel_w, got kernel_h"),
    (pool_layer("pool: MAX").replace('"pool" type', '"L" type'),
     (2, 3, 8, 8), "Pooling", "the kernel size is required"),
    (pool_layer("pool: MAX kernel_size: 2 round_mode: FLOOR ceil_mode: true").replace(
        '"pool" type', '"L" type'), (2, 3, 8, 8), "Pooling", "contradicts"),
    (pool_layer("pool: MAX kernel_size: 5 round_mode: FLOOR").replace('"pool" type', '"L" type'),
     (2, 3, 2, 2), "Pooling", "expected a positive output size, got [-2, -2]"),
    ('layer { name: "L" type: "SPP" bottom: "data" top: "out" spp_param { pyramid_height: 0 } }\n',
     (2, 3, 8, 8), "SPP", "pyramid_height must be positive, got 0"),
    ('layer { name: "L" type: "SPP" bottom: "data" top: "out" spp_param { pyramid_height: 3 } }\n',
     (2, 3, 5, 5), "SPP", "expected pad < 2, got 2 (pyramid level 2, 4 bins"),
    ('layer { name: "L" type: "InnerProduct" bottom: "data" top: "out" inner_product_param { } }\n',
     (2, 3), "InnerProduct", "num_output must be positive, got 0"),
    ('layer { name: "L" type: "InnerProduct" bottom: "data" top: "out" '
     'inner_product_param { num_output: 2 axis: -3 } }\n', (2, 3), "InnerProduct",
     "expected -2 <= axis < 2, got -3"),
    ('layer { name: "L" type: "Embed" bottom: "data" top: "out" embed_param { num_output: 2 } }\n',
     (2, 3), "Embed", "input_dim must be positive, got 0"),
]


@pytest.mark.parametrize("layer,shape,type_,message", ERRORS)
def test_configuration_errors_name_layer_and_expectation(tmp_path, layer, shape, type_, message):
    with pytest.raises(caffe.NetError) as info:
        make_net(tmp_path, layer, {"data": shape})
    text = str(info.value)
    assert f"layer 'L' ({type_})" in text
    assert message in text

