"""FlowNet2's layers (caffe2torch/layers/fork_flownet.py): Correlation, Correlation1D,
FlowWarp, Resample, Accum and DataAugmentation.

OpenCV's dnn (an independent implementation) is the reference for OpenCV's nine FlowNet2
test nets of the corpus and wherever it computes what the fork computes. Where it does
not (the fork's LINEAR/CUBIC Resample kernels, non-integer NEAREST, ``size_divisible_by``,
the running mean, SUBTRACT correlation, the NaN fill), the fork's kernel is written out
here loop by loop in numpy. Values are compared with ``rtol=1e-5`` and ``atol=1e-5`` on
unit-scale data: the absolute part only matters for outputs that cancel to about 0, whose
float32 summation order differs between the implementations.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe2torch as caffe
from caffe2torch import NetError
from caffe2torch.layers import LayerSpec, get_layer_class
from caffe2torch.proto import caffe_pb2
from conftest import shared_dir
from prototxt import forward, inputs, layer

RNG = np.random.default_rng(20240917)
TOL = dict(rtol=1e-5, atol=1e-5)
F32 = np.float32

CORPUS = ["accum", "accum_ref", "correlation", "data_augmentation", "data_augmentation_2x1",
          "data_augmentation_8x6", "flow_warp", "nearest", "nearest_2inps"]


def corpus_path(name: str) -> Path:
    return (shared_dir() / "corpus" / "repos" / "opencv__opencv_extra" / "testdata" / "dnn"
            / "layers" / f"{name}.prototxt")


def build(tmp_path: Path, type_: str, shapes: dict[str, tuple[int, ...]], params: str = "",
          phase=caffe.TEST) -> tuple[caffe.Net, Path]:
    path = tmp_path / "net.prototxt"
    path.write_text('name: "t"\n' + inputs(**shapes) + layer(type_, list(shapes), ["y"], params,
                                                              name="y"))
    return caffe.Net(str(path), phase), path


def opencv(model: Path, feed: dict[str, np.ndarray], weights: Path | None = None) -> np.ndarray:
    net = cv2.dnn.readNetFromCaffe(str(model), str(weights) if weights else "")
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in feed.items():
        net.setInput(value, name)
    return net.forward()


def both(tmp_path: Path, type_: str, feed: dict[str, np.ndarray], params: str = ""):
    net, model = build(tmp_path, type_, {n: v.shape for n, v in feed.items()}, params)
    return forward(net, feed), opencv(model, feed)


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(F32)


# -- the corpus nets ----------------------------------------------------------------------

@pytest.mark.parametrize("name", CORPUS)
def test_corpus_net_matches_opencv(name: str, tmp_path: Path) -> None:
    """OpenCV's FlowNet2 test nets, unchanged, give OpenCV's outputs on random inputs."""
    path = corpus_path(name)
    net = caffe.Net(str(path), caffe.TEST)
    feed = {n: normal(*net.blobs[n].shape) for n in net.inputs}
    if name == "flow_warp":  # displacements of a few pixels, some leaving the image
        feed["input_1"] *= 4
    weights = None
    if any(len(blobs) for blobs in net.params.values()):
        # OpenCV's DataAugmentation needs the fork's three blobs (iteration, mean,
        # per-channel mean); a fresh net's are zeros, which is what the fork starts from.
        weights = tmp_path / "net.caffemodel"
        net.save(str(weights))
    ours = forward(net, feed, net.outputs[0])
    theirs = opencv(path, feed, weights)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, **TOL)


# -- Correlation --------------------------------------------------------------------------

def patch_correlation(a, b, kernel, subtract, shape, corner, offset):
    """The fork's kernels one output value at a time: for output channel ``ch`` at (y, x),
    the mean of f over the patch of ``a`` at ``corner(y, x)`` and the patch of ``b``
    ``offset(ch)`` = (dy, dx) from it."""
    n, c = a.shape[:2]
    out = np.zeros((n, *shape), F32)
    for ch in range(shape[0]):
        dy, dx = offset(ch)
        for y in range(shape[1]):
            for x in range(shape[2]):
                y1, x1 = corner(y, x)
                p1 = a[:, :, y1:y1 + kernel, x1:x1 + kernel].astype(np.float64)
                p2 = b[:, :, y1 + dy:y1 + dy + kernel, x1 + dx:x1 + dx + kernel]
                value = np.abs(p1 - p2) if subtract else p1 * p2
                out[:, ch, y, x] = value.sum((1, 2, 3)) / (kernel * kernel * c)
    return out


def correlation_reference(a, b, pad, kernel, max_disp, stride1, stride2, subtract=False):
    """correlation_layer.cu."""
    a = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    b = np.pad(b, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    hp, wp = a.shape[2:]
    border = max_disp + (kernel - 1) // 2
    out_h = math.ceil((hp - 2 * border) / stride1)
    out_w = math.ceil((wp - 2 * border) / stride1)
    radius = max_disp // stride2
    grid = 2 * radius + 1
    return patch_correlation(
        a, b, kernel, subtract, (grid * grid, out_h, out_w),
        lambda y, x: (y * stride1 + max_disp, x * stride1 + max_disp),
        lambda ch: ((ch // grid - radius) * stride2, (ch % grid - radius) * stride2))


CORRELATIONS = {  # correlation_param, bottom shape
    "md4_stride2_2": (dict(pad=4, kernel_size=1, max_displacement=4, stride_1=1, stride_2=2),
                      (2, 5, 9, 11)),
    "kernel3_stride1_2": (dict(pad=3, kernel_size=3, max_displacement=2, stride_1=2, stride_2=1),
                          (1, 3, 10, 12)),
    "no_pad_md3": (dict(pad=0, kernel_size=1, max_displacement=3, stride_1=1, stride_2=3),
                   (1, 4, 8, 9)),
}


@pytest.mark.parametrize("case", sorted(CORRELATIONS))
def test_correlation_matches_opencv(case: str, tmp_path: Path) -> None:
    params, shape = CORRELATIONS[case]
    feed = {"a": normal(*shape), "b": normal(*shape)}
    text = " ".join(f"{k}: {v}" for k, v in params.items())
    ours, theirs = both(tmp_path, "Correlation", feed, f"correlation_param {{ {text} }}")
    expected = correlation_reference(feed["a"], feed["b"], params["pad"], params["kernel_size"],
                                     params["max_displacement"], params["stride_1"],
                                     params["stride_2"])
    np.testing.assert_allclose(ours, theirs, **TOL)
    np.testing.assert_allclose(ours, expected, **TOL)


def test_correlation_subtract(tmp_path: Path) -> None:
    """SUBTRACT (not in OpenCV): the mean absolute difference of the patches."""
    shape = (2, 3, 8, 10)
    feed = {"a": normal(*shape), "b": normal(*shape)}
    net, _ = build(tmp_path, "Correlation", {n: shape for n in feed},
                   "correlation_param { pad: 2 kernel_size: 3 max_displacement: 2 stride_1: 1 "
                   "stride_2: 2 correlation_type: SUBTRACT }")
    expected = correlation_reference(feed["a"], feed["b"], 2, 3, 2, 1, 2, subtract=True)
    np.testing.assert_allclose(forward(net, feed), expected, **TOL)


def make_layer(text: str, bottom_shapes: list[tuple[int, ...]]):
    param = text_format.Parse(text, caffe_pb2.LayerParameter())
    return get_layer_class(param.type)(LayerSpec(param, bottom_shapes))


@pytest.mark.parametrize("kind", ["MULTIPLY", "SUBTRACT"])
def test_correlation_gradcheck(kind: str) -> None:
    shape = (1, 2, 5, 6)
    corr = make_layer('name: "y" type: "Correlation" bottom: "a" bottom: "b" top: "y" '
                      'correlation_param { pad: 2 kernel_size: 3 max_displacement: 2 stride_1: 2 '
                      f'stride_2: 2 correlation_type: {kind} }}', [shape, shape])
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(corr, (a, b))


def correlation_1d_reference(a, b, pad, kernel, max_disp, stride1, stride2, direction=0,
                             subtract=False):
    """correlation_layer1d.cu (CorrelateData / CorrelateDataSubtract); reads left of the
    padded row (``direction`` -1 at the left edge) are 0."""
    extra = stride2
    a = np.pad(a, ((0, 0), (0, 0), (0, 0), (pad + extra, pad)))
    b = np.pad(b, ((0, 0), (0, 0), (0, 0), (pad + extra, pad)))
    h, wp = a.shape[2:]
    radius, k_radius = max_disp // stride2, (kernel - 1) // 2
    out_h = math.ceil((h - 2 * k_radius) / stride1)
    out_w = math.ceil((wp - extra - 2 * (max_disp + k_radius)) / stride1)
    width = radius + 1 if direction else 2 * radius + 1
    shift = {0: -radius, 1: 0, -1: -width}[direction]
    return patch_correlation(
        a, b, kernel, subtract, (width, out_h, out_w),
        lambda y, x: (y * stride1, x * stride1 + max_disp + extra),
        lambda ch: (0, (ch + shift) * stride2))


CORRELATIONS_1D = {  # correlation_param, bottom shape
    "dispnet_like": (dict(pad=4, kernel_size=1, max_displacement=4, stride_1=1, stride_2=1),
                     (2, 5, 3, 11)),
    "kernel3_strides_right": (dict(pad=2, kernel_size=3, max_displacement=4, stride_1=2,
                                   stride_2=2, single_direction=1), (1, 3, 7, 12)),
    "left": (dict(pad=3, kernel_size=1, max_displacement=3, stride_1=1, stride_2=1,
                  single_direction=-1), (1, 4, 4, 9)),
    "left_stride2_subtract": (dict(pad=0, kernel_size=3, max_displacement=4, stride_1=1,
                                   stride_2=2, single_direction=-1,
                                   correlation_type="SUBTRACT"), (2, 2, 5, 13)),
}


@pytest.mark.parametrize("case", sorted(CORRELATIONS_1D))
def test_correlation_1d_matches_the_fork_kernel(case: str, tmp_path: Path) -> None:
    """Correlation1D (not in OpenCV): horizontal displacements only, no vertical padding."""
    params, shape = CORRELATIONS_1D[case]
    feed = {"a": normal(*shape), "b": normal(*shape)}
    text = " ".join(f"{k}: {v}" for k, v in params.items())
    net, _ = build(tmp_path, "Correlation1D", {n: shape for n in feed},
                   f"correlation_param {{ {text} }}")
    expected = correlation_1d_reference(
        feed["a"], feed["b"], params["pad"], params["kernel_size"], params["max_displacement"],
        params["stride_1"], params["stride_2"], params.get("single_direction", 0),
        params.get("correlation_type") == "SUBTRACT")
    ours = forward(net, feed)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, **TOL)


@pytest.mark.parametrize("kind", ["MULTIPLY", "SUBTRACT"])
def test_correlation_1d_gradcheck(kind: str) -> None:
    shape = (1, 2, 4, 9)
    corr = make_layer('name: "y" type: "Correlation1D" bottom: "a" bottom: "b" top: "y" '
                      'correlation_param { pad: 1 kernel_size: 3 max_displacement: 2 stride_1: 2 '
                      f'stride_2: 1 single_direction: -1 correlation_type: {kind} }}',
                      [shape, shape])
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(corr, (a, b))


# -- FlowWarp -----------------------------------------------------------------------------

def flow_warp_reference(image: np.ndarray, flow: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """flow_warp_layer.cu: bilinear where 0 <= x + u < W and 0 <= y + v < H, else ``fill``."""
    n, c, h, w = image.shape
    out = np.full(image.shape, fill, F32)
    for i in range(n):
        for y in range(h):
            for x in range(w):
                x2, y2 = F32(x) + flow[i, 0, y, x], F32(y) + flow[i, 1, y, x]
                if not (x2 >= 0 and y2 >= 0 and x2 < w and y2 < h):
                    continue
                left, top = int(x2), int(y2)
                right, bottom = min(left + 1, w - 1), min(top + 1, h - 1)
                a, b = x2 - left, y2 - top
                out[i, :, y, x] = ((1 - a) * (1 - b) * image[i, :, top, left]
                                   + a * (1 - b) * image[i, :, top, right]
                                   + (1 - a) * b * image[i, :, bottom, left]
                                   + a * b * image[i, :, bottom, right])
    return out


def test_flow_warp_non_integer_flow_matches_opencv(tmp_path: Path) -> None:
    image = normal(2, 4, 6, 9)
    flow = RNG.uniform(-3.5, 3.5, (2, 2, 6, 9)).astype(F32)
    flow[0, :, 0, 0] = [-0.25, 0.0]    # just outside on the left
    flow[0, :, 1, 1] = [7.0, 0.5]      # exactly on the last column: inside, right tap clamped
    flow[0, :, 2, 2] = [6.5, 0.0]      # x2 = 8.5: inside, between the last column and beyond
    flow[1, :, 5, 3] = [0.0, 0.75]     # y2 = 5.75 on a 6-row image: bottom tap clamped
    ours, theirs = both(tmp_path, "FlowWarp", {"image": image, "flow": flow})
    np.testing.assert_allclose(ours, theirs, **TOL)
    np.testing.assert_allclose(ours, flow_warp_reference(image, flow), **TOL)


def test_flow_warp_nan_fill(tmp_path: Path) -> None:
    image, flow = normal(1, 2, 5, 6), RNG.uniform(-4, 4, (1, 2, 5, 6)).astype(F32)
    net, _ = build(tmp_path, "FlowWarp", {"image": image.shape, "flow": flow.shape},
                   "flow_warp_param { fill_value: NOT_A_NUMBER }")
    ours = forward(net, {"image": image, "flow": flow})
    expected = flow_warp_reference(image, flow, fill=np.nan)
    assert np.isnan(expected).any() and not np.isnan(expected).all()
    np.testing.assert_allclose(ours, expected, **TOL)


def test_flow_warp_gradcheck() -> None:
    shape = (2, 3, 5, 6)
    warp = make_layer('name: "y" type: "FlowWarp" bottom: "i" bottom: "f" top: "y"',
                      [shape, (2, 2, 5, 6)])
    gen = torch.Generator().manual_seed(2)
    image = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    # whole pixels plus a fraction in [0.2, 0.8]: no sample sits on a kink of the
    # bilinear interpolation or on the image border
    whole = torch.randint(-3, 3, (2, 2, 5, 6), generator=gen).double()
    frac = 0.2 + 0.6 * torch.rand((2, 2, 5, 6), generator=gen, dtype=torch.float64)
    flow = (whole + frac).requires_grad_()
    assert torch.autograd.gradcheck(warp, (image, flow))


# -- Resample -----------------------------------------------------------------------------

def round_away(v: np.float32) -> int:
    return int(np.floor(v + F32(0.5))) if v >= 0 else int(np.ceil(v - F32(0.5)))


def triangle(t):
    if -1 <= t < 0:
        return t + 1
    if 0 <= t <= 1:
        return 1 - t
    return F32(0)


def bicubic(t):
    t = abs(t)
    if t <= 1:
        return t * t * (F32(1.5) * t - F32(2.5)) + 1
    if t < 2:
        return t * (t * (F32(-0.5) * t + F32(2.5)) - 4) + 2
    return F32(0)


def resample_reference(x: np.ndarray, out_h: int, out_w: int, kind: str,
                       antialias: bool = True) -> np.ndarray:
    """resample_layer.cu's NearestNeighborKernel and InterpolationKernel, per output pixel."""
    n, c, h, w = x.shape
    fx, fy = F32(w) / F32(out_w), F32(h) / F32(out_h)
    antialias = antialias and (fx > 1 or fy > 1)
    ax = F32(1) / (fx if antialias else F32(1))
    ay = F32(1) / (fy if antialias else F32(1))
    filt, width = {"LINEAR": (triangle, 2), "CUBIC": (bicubic, 4)}.get(kind, (None, 0))
    rx = 2 if fx < 1 else math.ceil(F32(width) / ax)
    ry = 2 if fy < 1 else math.ceil(F32(width) / ay)
    out = np.zeros((n, c, out_h, out_w), F32)
    for yo in range(out_h):
        for xo in range(out_w):
            x_in = F32(xo) * fx + fy / F32(2) - F32(0.5)
            y_in = F32(yo) * fy + fx / F32(2) - F32(0.5)
            xr, yr = round_away(x_in), round_away(y_in)
            if kind == "NEAREST":
                out[:, :, yo, xo] = x[:, :, yr, xr]
                continue
            total, wsum = np.zeros((n, c), np.float64), 0.0
            for yy in range(yr - ry, yr + ry + 1):
                for xx in range(xr - rx, xr + rx + 1):
                    if yy < 0 or xx < 0 or yy >= h or xx >= w:
                        continue
                    weight = (ax * filt(ax * (x_in - F32(xx)))) * (ay * filt(ay * (y_in - F32(yy))))
                    total += weight * x[:, :, yy, xx]
                    wsum += weight
            out[:, :, yo, xo] = 0 if wsum == 0 else total / wsum
    return out


@pytest.mark.parametrize("params,size", [
    ("type: NEAREST factor: 3", (12, 15)),
    ("type: NEAREST width: 10 height: 8", (8, 10)),
])
def test_resample_nearest_integer_factor_matches_opencv(params, size, tmp_path: Path) -> None:
    """Integer upscaling: the fork's rounded half-pixel positions pick OpenCV's pixels."""
    x = normal(2, 3, 4, 5)
    ours, theirs = both(tmp_path, "Resample", {"x": x}, f"resample_param {{ {params} }}")
    assert ours.shape == (2, 3, *size)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(ours, resample_reference(x, *size, "NEAREST"))


def test_resample_second_bottom_size_matches_opencv(tmp_path: Path) -> None:
    """The output takes bottom 1's size (x3 wide, x2 high here)."""
    x, ref = normal(2, 3, 3, 4), normal(2, 1, 6, 12)
    ours, theirs = both(tmp_path, "Resample", {"x": x, "ref": ref},
                        "resample_param { type: NEAREST }")
    assert ours.shape == (2, 3, 6, 12)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("params,size", [
    ("type: LINEAR factor: 1.5", (6, 7)),
    ("type: LINEAR width: 7 height: 6", (6, 7)),
    # shrinks in y, so the widened x axis gets the fork's 1 / fx "antialias" scale too
    ("type: LINEAR width: 13 height: 3", (3, 13)),
    ("type: LINEAR width: 3 height: 2", (2, 3)),
    ("type: LINEAR width: 3 height: 2 antialias: false", (2, 3)),
    ("type: CUBIC factor: 1.7", (6, 8)),
    ("type: CUBIC width: 4 height: 3", (3, 4)),
    ("type: NEAREST factor: 1.5", (6, 7)),
    ("type: NEAREST factor: 0.5", (2, 2)),
])
def test_resample_kernels(params: str, size, tmp_path: Path) -> None:
    """The fork's LINEAR/CUBIC filters and non-integer NEAREST, written out in the test.

    OpenCV is no reference here: it refuses LINEAR with a factor and NEAREST below 1, and
    its LINEAR (asymmetric bilinear) and non-integer NEAREST (floor) are not the fork's.
    """
    x = normal(2, 2, 4, 5)
    net, _ = build(tmp_path, "Resample", {"x": x.shape}, f"resample_param {{ {params} }}")
    ours = forward(net, {"x": x})
    kind = params.split()[1]
    expected = resample_reference(x, *size, kind, antialias="antialias: false" not in params)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, **TOL)


def test_resample_linear_gradcheck() -> None:
    resample = make_layer('name: "y" type: "Resample" bottom: "x" top: "y" resample_param '
                          '{ type: LINEAR width: 7 height: 3 }', [(1, 2, 5, 4)])
    x = torch.randn((1, 2, 5, 4), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(resample, (x,))


# -- Accum --------------------------------------------------------------------------------

def corner_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """accum_layer.cpp's Forward_cpu for one bottom."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, out_h, out_w), F32)
    for yo in range(out_h):
        for xo in range(out_w):
            xpos = F32(xo) / F32(out_w - 1) * F32(w - 1)
            ypos = F32(yo) / F32(out_h - 1) * F32(h - 1)
            tlx, tly = int(np.floor(xpos)), int(np.floor(ypos))
            xd, yd = xpos - tlx, ypos - tly
            tlx1, tly1 = min(tlx + 1, w - 1), min(tly + 1, h - 1)
            out[:, :, yo, xo] = ((1 - xd) * (1 - yd) * x[:, :, tly, tlx]
                                 + xd * yd * x[:, :, tly1, tlx1]
                                 + (1 - xd) * yd * x[:, :, tly1, tlx]
                                 + xd * (1 - yd) * x[:, :, tly, tlx1])
    return out


@pytest.mark.parametrize("params,size", [
    ("", (7, 9)),
    ("accum_param { top_height: 11 top_width: 12 }", (11, 12)),
    ("accum_param { top_height: 11 top_width: 8 }", (7, 9)),   # not larger in both axes
    ("accum_param { have_reference: true }", (10, 13)),
])
@pytest.mark.parametrize("num", [1, 2])
def test_accum_matches_opencv(params: str, size, num: int, tmp_path: Path) -> None:
    """OpenCV only for num 1: with more images it writes each bottom's block contiguously
    instead of interleaving them per image."""
    feed = {"a": normal(num, 2, 3, 4), "b": normal(num, 3, 7, 5), "c": normal(num, 1, 6, 9)}
    if "have_reference" in params:
        feed["r"] = normal(num, 1, 10, 13)
    ours, theirs = both(tmp_path, "Accum", feed, params)
    expected = np.concatenate([corner_resize(feed[n], *size) for n in "abc"], 1)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, **TOL)
    if num == 1:
        np.testing.assert_allclose(ours, theirs, **TOL)


@pytest.mark.parametrize("shapes,size", [
    ([(1, 2, 5, 7), (1, 1, 3, 4)], (8, 8)),
    ([(1, 2, 8, 7), (1, 1, 3, 4)], (8, 7)),   # 8 is divisible already: no growth at all
])
def test_accum_size_divisible_by(shapes, size, tmp_path: Path) -> None:
    """The fork rounds the largest size up to the divisor when that grows both axes (OpenCV's
    integer division never rounds up, so it is no reference here)."""
    feed = {name: normal(*shape) for name, shape in zip("ab", shapes)}
    net, _ = build(tmp_path, "Accum", {n: v.shape for n, v in feed.items()},
                   "accum_param { size_divisible_by: 4 }")
    expected = np.concatenate([corner_resize(feed[n], *size) for n in "ab"], 1)
    np.testing.assert_allclose(forward(net, feed), expected, **TOL)


def test_accum_gradient_is_the_forks_cpu_backward(tmp_path: Path) -> None:
    """Backward scatters the top diff with the forward's bilinear weights (Backward_cpu)."""
    x = torch.randn((1, 2, 3, 4), dtype=torch.float64, requires_grad=True)
    ref = torch.randn((1, 1, 5, 7), dtype=torch.float64)
    accum = make_layer('name: "y" type: "Accum" bottom: "x" bottom: "r" top: "y" '
                       'accum_param { have_reference: true }', [(1, 2, 3, 4), (1, 1, 5, 7)])
    assert torch.autograd.gradcheck(lambda t: accum(t, ref), (x,))


# -- DataAugmentation ---------------------------------------------------------------------

def augmentation(tmp_path: Path, params: str, shape=(2, 3, 4, 5), phase=caffe.TEST) -> caffe.Net:
    return build(tmp_path, "DataAugmentation", {"x": shape},
                 f"augmentation_param {{ {params} }}", phase)[0]


@pytest.mark.parametrize("per_pixel", [False, True])
def test_data_augmentation_running_mean(per_pixel: bool, tmp_path: Path) -> None:
    """recompute_mean: 2 averages the first two batches' means, then the mean is frozen."""
    net = augmentation(tmp_path, "augment_during_test: true recompute_mean: 2 "
                                 f"mean_per_pixel: {str(per_pixel).lower()}")
    batches = [normal(2, 3, 4, 5) + i for i in range(3)]
    means = [b.mean(0, keepdims=True) for b in batches[:2]]
    running = [means[0], (means[0] + means[1]) / 2, (means[0] + means[1]) / 2]
    for batch, mean in zip(batches, running):
        subtrahend = mean if per_pixel else mean.mean((2, 3), keepdims=True)
        np.testing.assert_allclose(forward(net, {"x": batch}), batch - subtrahend, **TOL)
    iteration, mean, channel_mean = (blob.data for blob in net.params["y"])
    assert iteration.item() == 3
    np.testing.assert_allclose(mean, running[-1], **TOL)
    np.testing.assert_allclose(channel_mean, running[-1].mean((2, 3), keepdims=True), **TOL)


def test_data_augmentation_uses_a_trained_mean(tmp_path: Path) -> None:
    """Past recompute_mean iterations the stored per-channel mean is subtracted (a trained
    FlowNet2 model's); OpenCV would subtract the batch's own mean instead."""
    net = augmentation(tmp_path, "recompute_mean: 1000 mean_per_pixel: false")
    iteration, _, channel_mean = net.params["y"]
    iteration.data[...] = 5000
    channel_mean.data[...] = np.array([0.4, 0.5, 0.6], F32).reshape(1, 3, 1, 1)
    x = normal(2, 3, 4, 5)
    np.testing.assert_allclose(forward(net, {"x": x}), x - channel_mean.data, **TOL)


def test_data_augmentation_fixed_mean(tmp_path: Path) -> None:
    """Three ``mean`` values are subtracted per channel with mean_per_pixel: false; the fork
    ignores them with the default mean_per_pixel: true."""
    x = normal(2, 3, 4, 5)
    net = augmentation(tmp_path, "mean: 0.5 mean: -1 mean: 2 mean_per_pixel: false")
    expected = x - np.array([0.5, -1, 2], F32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(forward(net, {"x": x}), expected, **TOL)
    net = augmentation(tmp_path, "mean: 0.5 mean: -1 mean: 2")
    np.testing.assert_array_equal(forward(net, {"x": x}), x)


def crop_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """SpatialAugmentation with identity coefficients: a centred bilinear crop, clamped."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, out_h, out_w), F32)
    for yo in range(out_h):
        for xo in range(out_w):
            xpos = min(max(F32(xo) + F32(0.5 * w - 0.5 * out_w), F32(0)), F32(w) - F32(1.05))
            ypos = min(max(F32(yo) + F32(0.5 * h - 0.5 * out_h), F32(0)), F32(h) - F32(1.05))
            tlx, tly = int(np.floor(xpos)), int(np.floor(ypos))
            xd, yd = xpos - tlx, ypos - tly
            out[:, :, yo, xo] = ((1 - xd) * (1 - yd) * x[:, :, tly, tlx]
                                 + xd * yd * x[:, :, tly + 1, tlx + 1]
                                 + (1 - xd) * yd * x[:, :, tly + 1, tlx]
                                 + xd * (1 - yd) * x[:, :, tly, tlx + 1])
    return out


@pytest.mark.parametrize("crop", [(4, 5), (6, 5), (8, 7)])
def test_data_augmentation_crop(crop, tmp_path: Path) -> None:
    """Cropping without random coefficients; the mean is taken over the cropped top."""
    x = normal(2, 3, 8, 7)
    params = (f"crop_height: {crop[0]} crop_width: {crop[1]} recompute_mean: 1 "
              "mean_per_pixel: false translate { spread: 0.2 }")   # random, but not at TEST
    net = augmentation(tmp_path, params, shape=x.shape)
    cropped = crop_reference(x, *crop)
    expected = cropped - cropped.mean((0, 2, 3), keepdims=True)
    np.testing.assert_allclose(forward(net, {"x": x}), expected, **TOL)


# -- bad parameters -----------------------------------------------------------------------

BAD = [
    ("Correlation", {"a": (1, 2, 6, 6), "b": (1, 2, 6, 6)},
     "correlation_param { max_displacement: 1 }", "kernel_size is required"),
    ("Correlation", {"a": (1, 2, 6, 6), "b": (1, 2, 6, 6)},
     "correlation_param { kernel_size: 2 max_displacement: 1 }", "must be odd"),
    ("Correlation", {"a": (1, 2, 6, 6), "b": (1, 2, 6, 6)},
     "correlation_param { kernel_size: 1 max_displacement: 1 single_direction: 1 }",
     "Correlation1D"),
    ("Correlation", {"a": (1, 2, 6, 6), "b": (1, 2, 6, 6)},
     "correlation_param { kernel_size: 1 max_displacement: 3 }", "too small"),
    ("Correlation1D", {"a": (1, 2, 6, 6), "b": (1, 2, 6, 6)},
     "correlation_param { kernel_size: 1 max_displacement: 1 single_direction: 2 }",
     "must be -1 \\(left\\), 0 \\(both ways\\) or 1 \\(right\\), got 2"),
    ("Correlation1D", {"a": (1, 2, 6, 6), "b": (1, 2, 6, 6)},
     "correlation_param { kernel_size: 3 max_displacement: 2 }", "too small"),
    ("Correlation1D", {"a": (1, 2, 6), "b": (1, 2, 6)},
     "correlation_param { kernel_size: 1 max_displacement: 1 }", "4-D bottom"),
    ("Correlation", {"a": (1, 2, 6, 6), "b": (1, 3, 6, 6)},
     "correlation_param { kernel_size: 1 max_displacement: 1 }", "same shape"),
    ("FlowWarp", {"i": (1, 3, 4, 4), "f": (1, 3, 4, 4)}, "", "flow"),
    ("Resample", {"x": (1, 1, 4, 4)}, "resample_param { type: AREA factor: 2 }", "AREA"),
    ("Resample", {"x": (1, 1, 4, 4)}, "resample_param { width: 3 }", "both"),
    ("Resample", {"x": (1, 1, 4, 4)}, "resample_param { type: NEAREST }", "needs width"),
    ("Resample", {"x": (1, 1, 4, 4)}, "resample_param { width: 3 height: 3 factor: 2 }",
     "give one"),
    ("Resample", {"x": (1, 1, 4, 4), "r": (1, 1, 8, 8)}, "resample_param { factor: 2 }",
     "must be 1"),
    ("Accum", {"x": (1, 1, 4, 4)}, "accum_param { have_reference: true }", "two bottoms"),
    ("Accum", {"x": (1, 1, 4, 4)}, "accum_param { size_divisible_by: 0 }", "positive"),
    ("Accum", {"x": (1, 1, 4, 4), "z": (2, 1, 4, 4)}, "", "same num"),
    ("DataAugmentation", {"x": (1, 3, 4, 4)}, "augmentation_param { crop_width: 5 "
     "crop_height: 4 }", "larger than the bottom"),
    ("DataAugmentation", {"x": (1, 3, 4, 4)}, "augmentation_param { crop_width: 3 "
     "crop_height: 3 augment_during_test: true gamma { spread: 0.1 } }",
     "random augmentation \\(gamma\\) with augment_during_test"),
    ("DataAugmentation", {"x": (1, 2, 4, 4)}, "augmentation_param { mean: 1 mean: 2 mean: 3 "
     "mean_per_pixel: false }", "3-channel"),
]


@pytest.mark.parametrize("type_,shapes,params,message", BAD,
                         ids=[f"{b[0]}-{b[3].split()[0]}" for b in BAD])
def test_bad_parameters_name_the_layer(type_, shapes, params, message, tmp_path: Path) -> None:
    with pytest.raises(NetError, match=f"layer 'y' \\({type_}\\): .*{message}"):
        build(tmp_path, type_, shapes, params)


def test_random_augmentation_in_train_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(NetError, match="layer 'y' .*random augmentation \\(mirror, noise\\) "
                                       "in TRAIN"):
        augmentation(tmp_path, "crop_width: 3 crop_height: 3 mirror { prob: 0.5 } "
                               "noise { spread: 0.1 }", phase=caffe.TRAIN)


def test_data_augmentation_coefficient_tops_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "net.prototxt"
    path.write_text(inputs(x=(1, 3, 4, 4)) + layer("DataAugmentation", ["x"], ["y", "params"],
                                                   "augmentation_param { recompute_mean: 1 }",
                                                   name="y"))
    with pytest.raises(NetError, match="layer 'y' .*coefficient"):
        caffe.Net(str(path), caffe.TEST)
