"""Fork layers without golden cases: OpenCV's dnn where it implements them, else the
fork's definition written out in the test; plus the real-weight UltraFace detectors
against onnxruntime's outputs.

The golden cases of the other fork layers (Upsample, Resize, Pad, Proposal, ...) replay
in tests/test_golden_layers_ssd.py.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

import caffe2torch as caffe
from caffe2torch import NetError
from caffe2torch.layers.fork_rcnn import _partial_quicksort
from conftest import shared_dir
from prototxt import forward

RNG = np.random.default_rng(20240611)


def inputs_text(inputs: dict[str, tuple[int, ...]]) -> str:
    return "".join(f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ '
                   f'{" ".join(f"dim: {d}" for d in s)} }} }} }}\n' for n, s in inputs.items())


def build(tmp_path: Path, body: str, inputs: dict[str, tuple[int, ...]],
          phase=caffe.TEST) -> tuple[caffe.Net, Path]:
    path = tmp_path / "net.prototxt"
    path.write_text('name: "t"\nforce_backward: true\n' + inputs_text(inputs) + body)
    return caffe.Net(str(path), phase), path


def backward(net: caffe.Net, topdiff: np.ndarray, top: str = "y") -> None:
    net.blobs[top].diff[...] = topdiff
    net.backward()


# -- OpenCV's dnn implements these ------------------------------------------------------

def rois(count: int, height: int, width: int, scale: float, batch: int = 1) -> np.ndarray:
    """Image-space ROIs on a ``height x width`` map at ``scale``, with half-pixel corners."""
    x1 = RNG.integers(-2, width / scale, count) + RNG.choice([0, 0.5, 0.3], count)
    y1 = RNG.integers(-2, height / scale, count) + RNG.choice([0, 0.5, 0.7], count)
    x2 = x1 + RNG.integers(0, width / scale, count) + RNG.choice([0, 0.5], count)
    y2 = y1 + RNG.integers(0, height / scale, count) + RNG.choice([0, 0.5], count)
    index = RNG.integers(0, batch, count)
    return np.stack([index, x1, y1, x2, y2], axis=1).astype(np.float32)


OPENCV_CASES = {
    "interp_zoom": ('interp_param { zoom_factor: 3 }', {"x": (2, 3, 4, 5)}),
    "interp_size": ('interp_param { height: 9 width: 4 }', {"x": (1, 2, 6, 7)}),
    "shuffle_channel": ('shuffle_channel_param { group: 3 }', {"x": (2, 12, 3, 4)}),
    "relu6": ("", {"x": (2, 3, 4, 5)}),
    "roi_pooling": ('roi_pooling_param { pooled_h: 3 pooled_w: 4 spatial_scale: 0.25 }',
                    {"x": (2, 5, 9, 11), "r": (12, 5)}),
    "psroi_pooling": ('psroi_pooling_param { spatial_scale: 0.5 output_dim: 3 group_size: 3 }',
                      {"x": (2, 27, 8, 10), "r": (10, 5)}),
    "conv_depthwise": ('convolution_param { num_output: 6 kernel_size: 3 stride: 2 pad: 1 }',
                       {"x": (2, 6, 7, 8)}),
}
OPENCV_TYPES = {"interp": "Interp", "shuffle": "ShuffleChannel", "relu6": "ReLU6",
                "roi": "ROIPooling", "psroi": "PSROIPooling", "conv": "ConvolutionDepthwise"}


@pytest.mark.parametrize("case", sorted(OPENCV_CASES))
def test_matches_opencv(case: str, tmp_path: Path) -> None:
    """Same outputs as cv2.dnn.readNetFromCaffe, an independent implementation."""
    params, shapes = OPENCV_CASES[case]
    bottoms = " ".join(f'bottom: "{n}"' for n in shapes)
    type_ = OPENCV_TYPES[case.split("_")[0]]
    net, model = build(tmp_path, f'layer {{ name: "y" type: "{type_}" {bottoms} top: "y" '
                                  f'{params} }}\n', shapes)
    feed = {n: RNG.standard_normal(s).astype(np.float32) * 3 for n, s in shapes.items()}
    if "r" in shapes:
        scale = 0.25 if case == "roi_pooling" else 0.5
        feed["r"] = rois(shapes["r"][0], *shapes["x"][2:], scale, batch=shapes["x"][0])
    for blob in net.params.get("y", []):
        blob.data[...] = RNG.standard_normal(blob.data.shape)
    weights = tmp_path / "net.caffemodel"
    net.save(str(weights))
    ours = forward(net, feed)
    cv_net = cv2.dnn.readNetFromCaffe(str(model), str(weights))
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in feed.items():
        cv_net.setInput(value, name)
    theirs = cv_net.forward("y")
    np.testing.assert_allclose(ours, theirs.reshape(ours.shape), rtol=1e-5, atol=1e-5)


# -- Upsample: one name, two layers -------------------------------------------------------

def segnet_unpool(x: np.ndarray, mask: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """caffe-segnet UpsampleLayer::Forward_cpu: top[mask[i]] = bottom[i] per plane."""
    top = np.zeros((*x.shape[:2], out_h * out_w), np.float32)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for i, idx in enumerate(mask[n, c].reshape(-1).astype(int)):
                top[n, c, idx] = x[n, c].reshape(-1)[i]
    return top.reshape(*x.shape[:2], out_h, out_w)


@pytest.mark.parametrize("params,size", [
    ("scale: 2", (8, 10)),
    ("scale: 2 pad_out_h: true", (7, 10)),
    ("upsample_h: 7 upsample_w: 9", (7, 9)),
])
def test_segnet_upsample(params: str, size: tuple[int, int], tmp_path: Path) -> None:
    """Pooling's mask top unpools the values; the gradient reads top_diff at the mask."""
    body = ('layer { name: "pool" type: "Pooling" bottom: "x" top: "p" top: "m" pooling_param '
            '{ pool: MAX kernel_size: 2 stride: 2 } }\n'
            f'layer {{ name: "y" type: "Upsample" bottom: "p" bottom: "m" top: "y" '
            f'upsample_param {{ {params} }} }}\n')
    net, _ = build(tmp_path, body, {"x": (2, 3, *size)})
    x = RNG.standard_normal((2, 3, *size)).astype(np.float32)
    ours = forward(net, {"x": x})
    pooled, mask = net.blobs["p"].data, net.blobs["m"].data
    np.testing.assert_array_equal(ours, segnet_unpool(pooled, mask, *size))
    topdiff = RNG.standard_normal(ours.shape).astype(np.float32)
    backward(net, topdiff)
    flat = topdiff.reshape(*topdiff.shape[:2], -1)
    expected = np.take_along_axis(flat, mask.reshape(*mask.shape[:2], -1).astype(int), axis=2)
    np.testing.assert_array_equal(net.blobs["p"].diff, expected.reshape(pooled.shape))


def test_unpool_repeated_index_last_wins(tmp_path: Path) -> None:
    """Overlapping pooling windows repeat a mask index: Caffe's later write wins."""
    body = 'layer { name: "y" type: "MaxUnPool" bottom: "v" bottom: "m" top: "y" ' \
           'max_unpool_param { dst_h: 2 dst_w: 2 } }\n'
    net, _ = build(tmp_path, body, {"v": (1, 1, 1, 3), "m": (1, 1, 1, 3)})
    ours = forward(net, {"v": np.array([[[[1, 2, 3]]]], np.float32),
                         "m": np.array([[[[3, 3, 0]]]], np.float32)})
    np.testing.assert_array_equal(ours.reshape(-1), [3, 0, 0, 2])


@pytest.mark.parametrize("bottoms,params,message", [
    (("x",), "upsample_h: 8 upsample_w: 8", "second bottom"),
    (("x",), "scale_h: 2 scale_w: 2", "second bottom"),
    (("x", "m"), "scale: 2 dims_num: 4", "dims_num"),
])
def test_upsample_ambiguous_parameters(bottoms, params, message, tmp_path: Path) -> None:
    """Parameters of the other Upsample meaning are an error, not silently ignored."""
    names = " ".join(f'bottom: "{b}"' for b in bottoms)
    body = (f'layer {{ name: "y" type: "Upsample" {names} top: "y" '
            f'upsample_param {{ {params} }} }}\n')
    with pytest.raises(NetError, match=message):
        build(tmp_path, body, {b: (1, 2, 4, 4) for b in bottoms})


def test_nearest_upsample_gradient_sums_blocks(tmp_path: Path) -> None:
    """MobileNet-YOLO's backward: each bottom cell collects its scale x scale block."""
    net, _ = build(tmp_path, 'layer { name: "y" type: "Upsample" bottom: "x" top: "y" '
                             'upsample_param { scale: 3 } }\n', {"x": (1, 2, 2, 3)})
    forward(net, {"x": RNG.standard_normal((1, 2, 2, 3)).astype(np.float32)})
    topdiff = RNG.standard_normal((1, 2, 6, 9)).astype(np.float32)
    backward(net, topdiff)
    expected = topdiff.reshape(1, 2, 2, 3, 3, 3).sum(axis=(3, 5))
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-6, atol=1e-6)


def interp2(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """DeepLab's caffe_cpu_interp2 (align corners), loop for loop, in float32."""
    height, width = x.shape[2:]
    rh = np.float32(height - 1) / np.float32(out_h - 1) if out_h > 1 else np.float32(0)
    rw = np.float32(width - 1) / np.float32(out_w - 1) if out_w > 1 else np.float32(0)
    top = np.zeros((*x.shape[:2], out_h, out_w), np.float32)
    for h2 in range(out_h):
        h1r = rh * np.float32(h2)
        h1 = int(h1r)
        hp, l1 = int(h1 < height - 1), h1r - np.float32(h1)
        for w2 in range(out_w):
            w1r = rw * np.float32(w2)
            w1 = int(w1r)
            wp, m1 = int(w1 < width - 1), w1r - np.float32(w1)
            upper = (1 - m1) * x[:, :, h1, w1] + m1 * x[:, :, h1, w1 + wp]
            lower = (1 - m1) * x[:, :, h1 + hp, w1] + m1 * x[:, :, h1 + hp, w1 + wp]
            top[:, :, h2, w2] = (1 - l1) * upper + l1 * lower
    return top


@pytest.mark.parametrize("params,size", [("shrink_factor: 2", (4, 5)),
                                         ("shrink_factor: 3 zoom_factor: 2", (5, 5)),
                                         ("zoom_factor: 2 height: 3 width: 3", (13, 17))])
def test_interp_sizes(params: str, size: tuple[int, int], tmp_path: Path) -> None:
    """PSPNet's InterpLayer::Reshape: a lone factor wins over height/width; shrink, then
    zoom, when both are given. Values: caffe_cpu_interp2. (OpenCV has no shrink_factor.)"""
    net, _ = build(tmp_path, f'layer {{ name: "y" type: "Interp" bottom: "x" top: "y" '
                             f'interp_param {{ {params} }} }}\n', {"x": (2, 3, 7, 9)})
    x = RNG.standard_normal((2, 3, 7, 9)).astype(np.float32)
    ours = forward(net, {"x": x})
    np.testing.assert_allclose(ours, interp2(x, *size), rtol=1e-5, atol=1e-6)


def test_axpy(tmp_path: Path) -> None:
    """SENet's AxpyLayer: top = a * bottom[1] + bottom[2]; x_diff = a * g, a_diff = sum(x * g)
    over H, W, y_diff = g. (OpenCV's importer scales bottom[2] instead, so it is no
    reference here.)"""
    shapes = {"a": (2, 6, 1, 1), "x": (2, 6, 3, 4), "z": (2, 6, 3, 4)}
    net, _ = build(tmp_path, 'layer { name: "y" type: "Axpy" bottom: "a" bottom: "x" '
                             'bottom: "z" top: "y" }\n', shapes)
    a, x, z = (RNG.standard_normal(s).astype(np.float32) for s in shapes.values())
    np.testing.assert_allclose(forward(net, {"a": a, "x": x, "z": z}), a * x + z, rtol=1e-6)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    backward(net, g)
    np.testing.assert_allclose(net.blobs["x"].diff, a * g, rtol=1e-6)
    np.testing.assert_allclose(net.blobs["a"].diff, (x * g).sum(axis=(2, 3), keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(net.blobs["z"].diff, g)


def test_interp_crops_before_resizing(tmp_path: Path) -> None:
    """Negative pad_beg/pad_end crop the input first (caffe_cpu_interp2 on the sub-image)."""
    shapes = {"x": (1, 2, 7, 8)}
    cropped, _ = build(tmp_path, 'layer { name: "y" type: "Interp" bottom: "x" top: "y" '
                                 'interp_param { pad_beg: -1 pad_end: -2 zoom_factor: 2 } }\n',
                       shapes)
    x = RNG.standard_normal((1, 2, 7, 8)).astype(np.float32)
    ours = forward(cropped, {"x": x})
    (tmp_path / "plain").mkdir()
    plain, _ = build(tmp_path / "plain", 'layer { name: "y" type: "Interp" bottom: "x" top: "y" '
                                         'interp_param { zoom_factor: 2 } }\n', {"x": (1, 2, 4, 5)})
    np.testing.assert_array_equal(ours, forward(plain, {"x": x[:, :, 1:-2, 1:-2]}))


# -- depthwise convolutions ---------------------------------------------------------------

def test_depthwise_convolution_is_grouped_convolution(tmp_path: Path) -> None:
    """MobileNet-YOLO's DepthwiseConvolution = Convolution with group = channels (the
    default when group is not given)."""
    body = ('layer { name: "y" type: "DepthwiseConvolution" bottom: "x" top: "y" '
            'convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }\n'
            'layer { name: "z" type: "Convolution" bottom: "x" top: "z" '
            'convolution_param { num_output: 4 kernel_size: 3 pad: 1 group: 4 } }\n')
    net, _ = build(tmp_path, body, {"x": (2, 4, 5, 6)})
    assert net.params["y"][0].data.shape == (4, 1, 3, 3)
    for mine, ref in zip(net.params["y"], net.params["z"]):
        mine.data[...] = ref.data[...] = RNG.standard_normal(ref.data.shape)
    y = forward(net, {"x": RNG.standard_normal((2, 4, 5, 6)).astype(np.float32)})
    np.testing.assert_array_equal(y, net.blobs["z"].data)


# -- BN: SegNet's and PSPNet's ------------------------------------------------------------

def segnet_bn(x: np.ndarray, scale: np.ndarray, shift: np.ndarray):
    """caffe-segnet BN, LEARN: batch mean, E(x^2) - E(x)^2, eps 1e-9, in every phase."""
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = (x * x).mean(axis=(0, 2, 3), keepdims=True) - mean ** 2
    return scale * (x - mean) / np.sqrt(var + 1e-9) + shift, mean, var


def bn_backward(x: np.ndarray, g: np.ndarray, slope: np.ndarray, invstd: np.ndarray,
                mean: np.ndarray) -> np.ndarray:
    """The forks' BN backward: invstd * (g' - mean(g') - xhat * mean(g' * xhat)), g' = slope*g."""
    xhat = (x - mean) * invstd
    gs = g * slope
    return invstd * (gs - gs.mean(axis=(0, 2, 3), keepdims=True)
                     - xhat * (gs * xhat).mean(axis=(0, 2, 3), keepdims=True))


@pytest.mark.parametrize("phase", [caffe.TRAIN, caffe.TEST])
def test_segnet_bn_learn(phase, tmp_path: Path) -> None:
    body = ('layer { name: "y" type: "BN" bottom: "x" top: "y" top: "mean" top: "var" '
            'bn_param { scale_filler { type: "constant" value: 1 } } }\n')
    net, _ = build(tmp_path, body, {"x": (3, 4, 5, 2)}, phase)
    scale, shift = (RNG.standard_normal((1, 4, 1, 1)).astype(np.float32) for _ in range(2))
    net.params["y"][0].data[...], net.params["y"][1].data[...] = scale, shift
    x = (RNG.standard_normal((3, 4, 5, 2)) * 2 + 1).astype(np.float32)
    expected, mean, var = segnet_bn(x.astype(np.float64), scale, shift)
    np.testing.assert_allclose(forward(net, {"x": x}), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.blobs["mean"].data, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(net.blobs["var"].data, var, rtol=1e-4, atol=1e-5)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    backward(net, g)
    np.testing.assert_allclose(net.blobs["x"].diff,
                               bn_backward(x.astype(np.float64), g, scale, 1 / np.sqrt(var + 1e-9),
                                           mean), rtol=1e-3, atol=1e-4)
    xhat = (x - mean) / np.sqrt(var + 1e-9)
    np.testing.assert_allclose(net.params["y"][0].diff, (g * xhat).sum(axis=(0, 2, 3),
                               keepdims=True), rtol=1e-4, atol=1e-4)


def test_segnet_bn_inference_is_affine(tmp_path: Path) -> None:
    net, _ = build(tmp_path, 'layer { name: "y" type: "BN" bottom: "x" top: "y" '
                             'bn_param { bn_mode: INFERENCE } }\n', {"x": (2, 3, 2, 2)})
    assert [p.data.shape for p in net.params["y"]] == [(1, 3, 1, 1)] * 2
    scale, shift = (RNG.standard_normal((1, 3, 1, 1)).astype(np.float32) for _ in range(2))
    net.params["y"][0].data[...], net.params["y"][1].data[...] = scale, shift
    x = RNG.standard_normal((2, 3, 2, 2)).astype(np.float32)
    np.testing.assert_allclose(forward(net, {"x": x}), x * scale + shift, rtol=1e-6)


PSP_BN = ('layer {{ name: "y" type: "BN" bottom: "x" top: "y" bn_param {{ slope_filler {{ '
          'type: "constant" value: 1 }} momentum: 0.9 eps: 0.001 {frozen} }} }}\n')


def set_psp_blobs(net: caffe.Net) -> list[np.ndarray]:
    values = [RNG.standard_normal((1, 3, 1, 1)).astype(np.float32) for _ in range(3)]
    values.append(RNG.uniform(0.5, 2, (1, 3, 1, 1)).astype(np.float32))
    for blob, value in zip(net.params["y"], values):
        blob.data[...] = value
    return values


def test_pspnet_bn_train_updates_statistics(tmp_path: Path) -> None:
    """PSPNet BN at TRAIN: batch statistics (biased variance), stored = 0.1*batch + 0.9*stored."""
    net, _ = build(tmp_path, PSP_BN.format(frozen=""), {"x": (2, 3, 4, 4)}, caffe.TRAIN)
    slope, bias, mean0, var0 = set_psp_blobs(net)
    x = (RNG.standard_normal((2, 3, 4, 4)) * 3).astype(np.float32)
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(forward(net, {"x": x}),
                               slope * (x - mean) / np.sqrt(var + 1e-3) + bias,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(net.params["y"][2].data, 0.1 * mean + 0.9 * mean0, rtol=1e-5)
    np.testing.assert_allclose(net.params["y"][3].data, 0.1 * var + 0.9 * var0, rtol=1e-5)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    backward(net, g)
    np.testing.assert_allclose(net.blobs["x"].diff,
                               bn_backward(x, g, slope, 1 / np.sqrt(var + 1e-3), mean),
                               rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("frozen", [True, False])
def test_pspnet_bn_stored_statistics(frozen: bool, tmp_path: Path) -> None:
    """Frozen or TEST: stored statistics. Frozen's backward is slope * invstd * g and leaves
    slope/bias without gradient (lr_mult forced to 0); not frozen, TEST back-propagates
    the batch formula with the stored statistics (BNLayer::Backward_cpu)."""
    net, _ = build(tmp_path, PSP_BN.format(frozen="frozen: true" if frozen else ""),
                   {"x": (2, 3, 4, 4)})
    slope, bias, mean, var = set_psp_blobs(net)
    x = RNG.standard_normal((2, 3, 4, 4)).astype(np.float32)
    invstd = 1 / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(forward(net, {"x": x}), slope * (x - mean) * invstd + bias,
                               rtol=1e-5, atol=1e-5)
    g = RNG.standard_normal(x.shape).astype(np.float32)
    backward(net, g)
    expected = g * slope * invstd if frozen else bn_backward(x, g, slope, invstd, mean)
    np.testing.assert_allclose(net.blobs["x"].diff, expected, rtol=1e-4, atol=1e-5)
    assert not np.any(net.params["y"][0].diff) == frozen
    layer = net.module.layers[net.module.steps[-1].key]
    assert [p.lr_mult for p in layer.param.param] == ([0.0] * 4 if frozen else [1.0, 1.0, 0.0, 0.0])


def test_bn_mixed_fields_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(NetError, match="mixes SegNet"):
        build(tmp_path, 'layer { name: "y" type: "BN" bottom: "x" top: "y" '
                        'bn_param { bn_mode: INFERENCE frozen: true } }\n', {"x": (1, 2, 3, 3)})


# -- Yolov3DetectionOutput ----------------------------------------------------------------

def yolov3_reference(bottoms: list[np.ndarray], classes: int, boxes: int, biases: list[float],
                     mask: list[int], scales: list[int], threshold: float,
                     nms: float) -> np.ndarray:
    """eric612/MobileNet-YOLO Yolov3DetectionOutputLayer::Forward_cpu, loop for loop."""
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    found = []
    step = len(mask) // len(bottoms)
    for t, x in enumerate(bottoms):
        side = x.shape[3]
        for b in range(x.shape[0]):
            for s in range(side * side):
                row, col = divmod(s, side)
                for n in range(boxes):
                    v = x[b, n * (5 + classes):(n + 1) * (5 + classes)].reshape(5 + classes,
                                                                                -1)[:, s]
                    m = mask[n + t * step]
                    box = ((col + sig(v[0])) / side, (row + sig(v[1])) / side,
                           np.exp(v[2]) * biases[2 * m] / (side * scales[t]),
                           np.exp(v[3]) * biases[2 * m + 1] / (side * scales[t]))
                    for c in range(classes):
                        score = sig(v[5 + c]) * sig(v[4])
                        if score > threshold:
                            found.append((score, c, box))
    found.sort(key=lambda f: -f[0])

    def iou(a, b):
        w = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
        h = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
        inter = 0 if w < 0 or h < 0 else w * h
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    dead = set()
    for i in range(len(found) - 1):
        if i not in dead:
            dead |= {j for j in range(i + 1, len(found))
                     if j not in dead and iou(found[i][2], found[j][2]) >= nms}
    return np.array([[0, c + 1, s, bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2]
                     for i, (s, c, (bx, by, bw, bh)) in enumerate(found) if i not in dead],
                    np.float32).reshape(1, 1, -1, 7)


YOLO_PARAMS = dict(classes=3, boxes=2, biases=[10, 14, 23, 27, 37, 58, 81, 82], mask=[2, 3, 0, 1],
                   scales=[32, 16], threshold=0.3, nms=0.45)


def yolo_net(tmp_path: Path, threshold: float) -> caffe.Net:
    p = YOLO_PARAMS
    fields = " ".join([f"biases: {b}" for b in p["biases"]] + [f"mask: {m}" for m in p["mask"]]
                      + [f"anchors_scale: {s}" for s in p["scales"]])
    body = (f'layer {{ name: "y" type: "Yolov3DetectionOutput" bottom: "a" bottom: "b" top: "y" '
            f'yolov3_detection_output_param {{ num_classes: {p["classes"]} num_box: {p["boxes"]} '
            f'confidence_threshold: {threshold} nms_threshold: {p["nms"]} {fields} }} }}\n')
    return build(tmp_path, body, {"a": (1, 16, 3, 3), "b": (1, 16, 6, 6)})[0]


def test_yolov3_detection_output(tmp_path: Path) -> None:
    net = yolo_net(tmp_path, YOLO_PARAMS["threshold"])
    feed = {"a": RNG.standard_normal((1, 16, 3, 3)).astype(np.float32) * 2,
            "b": RNG.standard_normal((1, 16, 6, 6)).astype(np.float32) * 2}
    ours = forward(net, feed)
    expected = yolov3_reference([feed["a"], feed["b"]], **YOLO_PARAMS)
    assert ours.shape[2] > 3, "the case should keep several detections"
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)


def test_yolov3_detection_output_without_detections(tmp_path: Path) -> None:
    net = yolo_net(tmp_path, 0.999)
    ours = forward(net, {"a": np.full((1, 16, 3, 3), -5, np.float32),
                         "b": np.full((1, 16, 6, 6), -5, np.float32)})
    np.testing.assert_array_equal(ours, [[[[0, -1, -1, -1, -1, -1, -1]]]])


# -- ROIPooling backward ------------------------------------------------------------------

def test_roi_pooling_gradient_goes_to_argmax(tmp_path: Path) -> None:
    """The fork's backward: each bin's top_diff lands on its argmax (summed over ROIs)."""
    body = ('layer { name: "y" type: "ROIPooling" bottom: "x" bottom: "r" top: "y" '
            'roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }\n')
    net, _ = build(tmp_path, body, {"x": (1, 1, 4, 4), "r": (2, 5)})
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    r = np.array([[0, 0, 0, 3, 3], [0, 1, 1, 2, 2]], np.float32)
    np.testing.assert_array_equal(forward(net, {"x": x, "r": r}).reshape(2, 4),
                                  [[5, 7, 13, 15], [5, 6, 9, 10]])
    backward(net, np.ones((2, 1, 2, 2), np.float32))
    expected = np.zeros(16, np.float32)
    np.add.at(expected, [5, 7, 13, 15, 5, 6, 9, 10], 1)
    np.testing.assert_array_equal(net.blobs["x"].diff.reshape(-1), expected)


# -- Proposal's sort ----------------------------------------------------------------------

def sort_box(scores: list[float], start: int, end: int, num_top: int, perm: list[int]) -> None:
    """proposal_layer.cpp's sort_box, line for line, on (score, index) pairs."""
    pivot = scores[start]
    left, right = start + 1, end
    while left <= right:
        while left <= end and scores[left] >= pivot:
            left += 1
        while right > start and scores[right] <= pivot:
            right -= 1
        if left <= right:
            scores[left], scores[right] = scores[right], scores[left]
            perm[left], perm[right] = perm[right], perm[left]
            left += 1
            right -= 1
    if right > start:
        scores[start], scores[right] = scores[right], scores[start]
        perm[start], perm[right] = perm[right], perm[start]
    if start < right - 1:
        sort_box(scores, start, right - 1, num_top, perm)
    if right + 1 < num_top and right + 1 < end:
        sort_box(scores, right + 1, end, num_top, perm)


@pytest.mark.parametrize("seed", range(6))
def test_proposal_sort_matches_fork_on_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 200).astype(np.float32) / 5  # many ties, zeros included
    num_top = int(rng.integers(1, 200))
    perm = list(range(len(scores)))
    sort_box(list(scores), 0, len(scores) - 1, num_top, perm)
    np.testing.assert_array_equal(_partial_quicksort(scores, num_top)[:num_top], perm[:num_top])


# -- real weights: UltraFace against onnxruntime ------------------------------------------

ULTRAFACE = (shared_dir() / "corpus" / "repos"
             / "Linzaer__Ultra-Light-Fast-Generic-Face-Detector-1MB")


@pytest.mark.parametrize("model,folder", [("RFB-320", "RFB-320"), ("slim-320", "Slim-320")])
def test_ultraface_matches_onnxruntime(model: str, folder: str) -> None:
    """The Caffe port of the detector gives onnxruntime's outputs of the original ONNX model
    (same weights): scores and raw box regressions within 1e-4."""
    root = ULTRAFACE / "caffe" / "model" / folder
    net = caffe.Net(str(root / f"{model}.prototxt"), caffe.TEST,
                    weights=str(root / f"{model}.caffemodel"))
    for ref in ("img1", "rand0"):
        expected = np.load(shared_dir() / "corpus" / "reference_outputs" / "ultraface"
                           / f"{model}_{ref}.npz")
        ours = net.forward(input=expected["input"])
        for name in ("scores", "boxes"):
            np.testing.assert_allclose(ours[name], expected[name], rtol=1e-4, atol=1e-4,
                                       err_msg=f"{model} {ref}: {name}")


# -- DenseImageData -----------------------------------------------------------------------

def dense_list(tmp_path: Path, count: int, size: tuple[int, int] = (6, 8)) -> list[tuple]:
    """``count`` BGR images whose blue channel equals their gray label image."""
    pairs, lines = [], []
    for i in range(count):
        label = RNG.integers(0, 12, size).astype(np.uint8)
        image = RNG.integers(0, 256, (*size, 3)).astype(np.uint8)
        image[..., 0] = label
        cv2.imwrite(str(tmp_path / f"im{i}.png"), image)
        cv2.imwrite(str(tmp_path / f"lab{i}.png"), label)
        lines.append(f"im{i}.png lab{i}.png")
        pairs.append((image, label))
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return pairs


def dense_net(tmp_path: Path, params: str, transform: str = "") -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text(f'layer {{ name: "d" type: "DenseImageData" top: "data" top: "label" '
                    f'dense_image_data_param {{ source: "{tmp_path / "list.txt"}" '
                    f'root_folder: "{tmp_path}/" {params} }} '
                    f'transform_param {{ {transform} }} }}\n')
    return caffe.Net(str(path), caffe.TRAIN)


def test_dense_image_data_reads_pairs(tmp_path: Path) -> None:
    """caffe-segnet's DenseImageData: transformed image (BGR, (x - mean) * scale), raw label
    values as (B, 1, H, W), the list read in order and round again."""
    pairs = dense_list(tmp_path, 3)
    net = dense_net(tmp_path, "batch_size: 2", "scale: 0.5 mean_value: 10")
    assert net.blobs["data"].shape == (2, 3, 6, 8) and net.blobs["label"].shape == (2, 1, 6, 8)
    for batch in ([0, 1], [2, 0]):
        net.forward()
        for slot, i in enumerate(batch):
            image, label = pairs[i]
            np.testing.assert_allclose(net.blobs["data"].data[slot],
                                       (image.transpose(2, 0, 1).astype(np.float32) - 10) * 0.5)
            np.testing.assert_array_equal(net.blobs["label"].data[slot, 0], label)


def test_dense_image_data_crops_and_mirrors_alike(tmp_path: Path) -> None:
    """ENet's crop_height/crop_width and mirror move image and label together."""
    dense_list(tmp_path, 4)
    net = dense_net(tmp_path, "batch_size: 4 crop_height: 4 crop_width: 5 mirror: true "
                              "shuffle: true")
    assert net.blobs["data"].shape == (4, 3, 4, 5)
    for _ in range(3):
        net.forward()
        np.testing.assert_array_equal(net.blobs["data"].data[:, 0], net.blobs["label"].data[:, 0])


def test_dense_image_data_label_divide_factor(tmp_path: Path) -> None:
    """ENet's label_divide_factor: the label is resized (nearest) to new_* / factor."""
    pairs = dense_list(tmp_path, 1, (8, 12))
    net = dense_net(tmp_path, "batch_size: 1 new_height: 6 new_width: 10 label_divide_factor: 2")
    net.forward()
    assert net.blobs["data"].shape == (1, 3, 6, 10)
    np.testing.assert_array_equal(net.blobs["label"].data[0, 0],
                                  cv2.resize(pairs[0][1], (5, 3), interpolation=cv2.INTER_NEAREST))


def test_dense_image_data_refuses_transform_crop(tmp_path: Path) -> None:
    dense_list(tmp_path, 1)
    with pytest.raises(NetError, match="crop_height"):
        dense_net(tmp_path, "batch_size: 1", "mirror: true")
