"""Activations, normalisation, Scale/Bias and Dropout: configuration errors and the
Caffe rules the golden cases do not reach."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import caffe2torch as caffe
from caffe2torch import NetError
from caffe2torch.layers import get_layer_class
from caffe2torch.layers.normalization import _CrossChannelLRN


def data_layer(name: str, *dims: int) -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return (f'layer {{ name: "{name}" type: "Input" top: "{name}" '
            f'input_param {{ shape {{ {shape} }} }} }}\n')


def layer(type_: str, params: str = "", bottoms: tuple[str, ...] = ("data",), name: str = "l",
          extra: str = "") -> str:
    bottom = " ".join(f'bottom: "{b}"' for b in bottoms)
    return f'layer {{ name: "{name}" type: "{type_}" {bottom} top: "{name}" {extra} {params} }}\n'


def make_net(tmp_path, body: str, dims=(2, 3, 4, 5), phase=caffe.TEST) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text("force_backward: true\n" + data_layer("data", *dims) + body)
    return caffe.Net(str(path), phase)


def run(net: caffe.Net, x: np.ndarray, top: str = "l", topdiff: np.ndarray | None = None):
    """Forward ``x`` through ``data``; back-propagate ``topdiff`` (ones) from ``top``."""
    net.blobs["data"].data[...] = x
    net.forward()
    net.blobs[top].diff[...] = 1 if topdiff is None else topdiff
    net.backward()
    return net.blobs[top].data.copy(), net.blobs["data"].diff.copy()


# -- configuration errors: they name the layer and say expected vs got ------------------

@pytest.mark.parametrize("body, dims, message", [
    (layer("PReLU"), (6,), r"'l' \(PReLU\).*at least 2 axes.*got shape \[6\]"),
    (layer("BatchNorm"), (6,), r"'l' \(BatchNorm\).*at least 2 axes.*got shape \[6\]"),
    (layer("LRN", "lrn_param { local_size: 4 }"), (2, 3, 4, 5),
     r"'l' \(LRN\).*local_size must be odd, got 4"),
    (layer("LRN"), (2, 3, 4), r"'l' \(LRN\).*expected a 4-D bottom.*got shape \[2, 3, 4\]"),
    (layer("MVN"), (1, 2, 3, 4, 5), r"'l' \(MVN\).*at most 4 axes.*got shape \[1, 2, 3, 4, 5\]"),
    (layer("Clip", "clip_param { min: 0 }"), (2, 3),
     r"'l' \(Clip\).*needs both min and max; missing max"),
    (layer("Exp", "exp_param { base: 0 }"), (2, 3), r"'l' \(Exp\).*strictly positive.*got 0"),
    (layer("Log", "log_param { base: -2 }"), (2, 3), r"'l' \(Log\).*strictly positive.*got -2"),
    (layer("Log", "log_param { base: 1 }"), (2, 3), r"'l' \(Log\).*must not be 1"),
    (layer("Dropout", "dropout_param { dropout_ratio: 1 }"), (2, 3),
     r"'l' \(Dropout\).*dropout_ratio must be in \[0, 1\), got 1"),
    (layer("Scale", "scale_param { axis: 4 }"), (2, 3, 4, 5),
     r"'l' \(Scale\).*scale_param.axis 4 is out of range.*expected -4 <= axis < 4"),
    (layer("Bias", "bias_param { axis: 2 num_axes: 3 }"), (2, 3, 4, 5),
     r"'l' \(Bias\).*axis 2 \+ num_axes 3 extends past bottom\[0\]'s 4 axes"),
    (layer("Scale", "scale_param { num_axes: -2 }"), (2, 3, 4, 5),
     r"'l' \(Scale\).*num_axes must be non-negative, or -1.*got -2"),
])
def test_configuration_errors(tmp_path, body, dims, message):
    with pytest.raises(NetError, match=message):
        make_net(tmp_path, body, dims)


@pytest.mark.parametrize("type_", ["Scale", "Bias"])
def test_second_bottom_must_match_the_covered_axes(tmp_path, type_):
    body = data_layer("s", 3, 5) + layer(type_, bottoms=("data", "s"))
    with pytest.raises(NetError, match=rf"'l' \({type_}\).*operand shape \[3, 5\].*"
                                       r"expected \[3, 4\], got \[3, 5\]"):
        make_net(tmp_path, body)


def test_batchnorm_refuses_learned_statistics(tmp_path):
    body = layer("BatchNorm", extra="param { lr_mult: 0 } param { lr_mult: 2 }")
    with pytest.raises(NetError, match=r"'l' \(BatchNorm\).*param 1.*expected lr_mult 0, got 2"):
        make_net(tmp_path, body)
    # Exactly three specs is the old form that UpgradeNetBatchNorm rewrites to lr_mult 0.
    make_net(tmp_path, layer("BatchNorm", extra="param { lr_mult: 1 } " * 3))
    # An unset lr_mult means ParamSpec's default 1, which Caffe's CHECK refuses too.
    with pytest.raises(NetError, match=r"param 0.*expected lr_mult 0, got 1"):
        make_net(tmp_path, layer("BatchNorm", extra='param { name: "shared_mean" }'))


def test_batchnorm_statistics_get_lr_mult_zero(tmp_path):
    """BatchNormLayer::LayerSetUp appends ``ParamSpec{lr_mult: 0}`` for each missing spec,
    so the solver never updates the statistics."""
    net = make_net(tmp_path, layer("BatchNorm", extra="param { lr_mult: 0 decay_mult: 0 }"))
    entries = [e for e in net.module.learnable if e.layer == "l"]
    assert [e.lr_mult for e in entries] == [0, 0, 0]
    assert [e.decay_mult for e in entries] == [0, 1, 1]
    assert all(not p.requires_grad for p in net.module.layers["l"].blobs)


# -- rules the golden cases do not cover --------------------------------------------------

def test_v1_enum_names_are_aliases():
    for v1, v2 in [("RELU", "ReLU"), ("SIGMOID", "Sigmoid"), ("TANH", "TanH"), ("ABSVAL", "AbsVal"),
                   ("BNLL", "BNLL"), ("POWER", "Power"), ("EXP", "Exp"), ("THRESHOLD", "Threshold"),
                   ("DROPOUT", "Dropout"), ("LRN", "LRN"), ("MVN", "MVN")]:
        assert get_layer_class(v1) is get_layer_class(v2)


def test_threshold_passes_no_gradient(tmp_path):
    """threshold_layer.hpp: Backward_cpu is NOT_IMPLEMENTED; here nothing flows back."""
    net = make_net(tmp_path, layer("Threshold", "threshold_param { threshold: 0.5 }"), (2, 3))
    x = np.array([[0.5, 0.6, -1.0], [2.0, 0.49, 0.5001]], np.float32)
    y, dx = run(net, x)
    np.testing.assert_array_equal(y, (x > 0.5).astype(np.float32))
    np.testing.assert_array_equal(dx, np.zeros_like(x))


def test_power_gradient_uses_caffes_output_ratio(tmp_path):
    """power_layer.cpp Backward_cpu with shift 0: dy/dx = power * y / x, so a zero input
    gives NaN (0/0) where the exact derivative of x^3 would be 0."""
    net = make_net(tmp_path, layer("Power", "power_param { power: 3 scale: 2 }"), (1, 4))
    x = np.array([[0.0, 1.5, -2.0, 0.25]], np.float32)
    y, dx = run(net, x)
    np.testing.assert_allclose(y, (2 * x) ** 3, rtol=1e-6)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = 3 * y / x
    np.testing.assert_allclose(dx, expected, rtol=1e-6)
    assert np.isnan(dx[0, 0])


def test_power_constant_for_negative_base_follows_c_pow(tmp_path):
    """scale 0: the top is pow(shift, power) as C computes it (NaN for (-8)^0.5)."""
    params = "power_param { power: 0.5 scale: 0 shift: -8 }"
    net = make_net(tmp_path, layer("Power", params), (1, 2))
    y, dx = run(net, np.ones((1, 2), np.float32))
    assert np.isnan(y).all()
    np.testing.assert_array_equal(dx, 0)


def test_clip_with_min_above_max_gives_min(tmp_path):
    """clip_layer.cpp: max(min, min(x, max)) is ``min`` everywhere when min > max, and
    the gradient mask (min <= x <= max) is empty; torch.clamp would give ``max``."""
    net = make_net(tmp_path, layer("Clip", "clip_param { min: 1 max: -1 }"), (1, 3))
    y, dx = run(net, np.array([[-2.0, 0.0, 2.0]], np.float32))
    np.testing.assert_array_equal(y, 1.0)
    np.testing.assert_array_equal(dx, 0.0)


def test_prelu_default_filler_and_shared_scalar_blob(tmp_path):
    net = make_net(tmp_path, layer("PReLU"), (2, 3))
    np.testing.assert_array_equal(net.params["l"][0].data, np.full(3, 0.25, np.float32))
    shared = make_net(tmp_path, layer("PReLU", "prelu_param { channel_shared: true }"), (2, 3))
    assert tuple(shared.module.layers["l"].blobs[0].shape) == ()


def test_scale_and_bias_defaults(tmp_path):
    """scale_layer.cpp: bias_term defaults to false and the scale filler to constant 1;
    bias_layer.cpp: the bias filler defaults to constant 0."""
    scale = make_net(tmp_path, layer("Scale"))
    assert [tuple(p.data.shape) for p in scale.params["l"]] == [(3,)]
    np.testing.assert_array_equal(scale.params["l"][0].data, 1)
    bias = make_net(tmp_path, layer("Bias", "bias_param { num_axes: -1 }"))
    assert [tuple(p.data.shape) for p in bias.params["l"]] == [(3, 4, 5)]
    np.testing.assert_array_equal(bias.params["l"][0].data, 0)


def test_dropout_train_masks_and_scales(tmp_path):
    """dropout_layer.cpp: TRAIN keeps each value with probability 1 - ratio and scales it
    by 1 / (1 - ratio); the gradient uses the same mask and scale."""
    torch.manual_seed(0)
    net = make_net(tmp_path, layer("Dropout", "dropout_param { dropout_ratio: 0.75 }"), (100, 100),
                   phase=caffe.TRAIN)
    x = np.random.RandomState(0).uniform(1, 2, (100, 100)).astype(np.float32)
    y, dx = run(net, x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] * 4, rtol=1e-6)
    np.testing.assert_allclose(dx, kept * np.float32(4), rtol=1e-6)
    assert 0.22 < kept.mean() < 0.28


def test_dropout_scale_train_false_scales_at_test(tmp_path):
    """py-faster-rcnn's scale_train: false: TRAIN gives x * mask, TEST x * (1 - ratio)."""
    params = "dropout_param { dropout_ratio: 0.25 scale_train: false }"
    x = np.random.RandomState(1).uniform(1, 2, (50, 50)).astype(np.float32)
    train = make_net(tmp_path, layer("Dropout", params), (50, 50), phase=caffe.TRAIN)
    y, dx = run(train, x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept], rtol=1e-6)
    np.testing.assert_allclose(dx, kept.astype(np.float32), rtol=1e-6)
    test = make_net(tmp_path, layer("Dropout", params), (50, 50))
    y, dx = run(test, x)
    np.testing.assert_allclose(y, x * 0.75, rtol=1e-6)
    np.testing.assert_allclose(dx, 0.75, rtol=1e-6)


def test_dropout_sample_weights_test_samples_at_test(tmp_path):
    """Bayesian SegNet's sample_weights_test: a fresh mask at TEST too (Monte Carlo dropout)."""
    net = make_net(tmp_path, layer("Dropout", "dropout_param { sample_weights_test: true }"),
                   (50, 50))
    y, _ = run(net, np.ones((50, 50), np.float32))
    assert set(np.unique(y)) == {0.0, 2.0}


def test_batchnorm_statistics_accumulate_caffes_way(tmp_path):
    """batch_norm_layer.cpp Forward_cpu over two TRAIN passes: factor = maf*factor + 1,
    sums = maf*sums + batch mean / (m/(m-1)) * biased variance; the top uses the biased one."""
    net = make_net(tmp_path, layer("BatchNorm", "batch_norm_param { moving_average_fraction: 0.5 "
                                                "eps: 0.001 }"), (4, 2, 3), phase=caffe.TRAIN)
    rng = np.random.RandomState(2)
    factor, mean_sum, var_sum = 0.0, np.zeros(2), np.zeros(2)
    for _ in range(2):
        x = rng.randn(4, 2, 3).astype(np.float32) * 3 + 1
        y, _ = run(net, x)
        mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
        expected = (x - mean[:, None]) / np.sqrt(var[:, None] + 0.001)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
        factor, mean_sum = 0.5 * factor + 1, 0.5 * mean_sum + mean
        var_sum = 0.5 * var_sum + 12 / 11 * var
        params = [p.data for p in net.params["l"]]
        np.testing.assert_allclose(params[0], mean_sum, rtol=1e-5)
        np.testing.assert_allclose(params[1], var_sum, rtol=1e-5)
        np.testing.assert_allclose(params[2], [factor], rtol=1e-6)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_global_stats_follow_every_blob_write(tmp_path, device):
    """With global statistics the mean and variance are the sums over the factor (0 when
    it is 0), however the blobs change between calls: loaded, written in place or
    replaced (on a GPU they are kept between calls until one of them changes)."""
    path = tmp_path / "net.prototxt"
    path.write_text(data_layer("data", 2, 3, 4) + layer("BatchNorm", "batch_norm_param { "
                                                       "use_global_stats: true eps: 0.01 }"))
    module = caffe.load(str(path)).to(device)
    mean_sum, var_sum, factor = module.layers["l"].blobs
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3)).to(device)

    def expected() -> torch.Tensor:
        scale = 0.0 if factor.item() == 0 else 1.0 / factor.item()
        mean, var = mean_sum * scale, var_sum * scale
        return (x - mean[:, None]) / torch.sqrt(var[:, None] + 0.01)

    with torch.no_grad():
        torch.testing.assert_close(module(x), expected())
        mean_sum.copy_(torch.tensor([1.0, -2.0, 3.0]))
        var_sum.copy_(torch.tensor([4.0, 0.5, 2.0]))
        factor.fill_(2.0)
        torch.testing.assert_close(module(x), expected())
        mean_sum.mul_(3)
        torch.testing.assert_close(module(x), expected())
        factor.data = torch.full((1,), 0.5, device=device)
        torch.testing.assert_close(module(x), expected())
        factor.zero_()
        torch.testing.assert_close(module(x), expected())


def test_batchnorm_one_value_per_channel(tmp_path):
    """m = 1: Caffe's x - mean is exactly 0 (top and gradient 0) and the correction
    factor m/(m-1) becomes 1, so the variance sum gains 0, not NaN."""
    net = make_net(tmp_path, layer("BatchNorm"), (1, 3), phase=caffe.TRAIN)
    x = np.array([[5.0, -2.0, 0.5]], np.float32)
    y, dx = run(net, x, topdiff=np.array([[1.0, 2.0, 3.0]], np.float32))
    np.testing.assert_array_equal(y, 0)
    np.testing.assert_array_equal(dx, 0)
    np.testing.assert_array_equal(net.params["l"][0].data, x[0])
    np.testing.assert_array_equal(net.params["l"][1].data, 0)


def test_mvn_top_has_caffes_legacy_4d_shape(tmp_path):
    """mvn_layer.cpp Reshape uses num/channels/height/width: a (N, C, H) bottom gives an
    (N, C, H, 1) top, normalised over H per (n, c)."""
    net = make_net(tmp_path, layer("MVN"), (2, 3, 4))
    x = np.random.RandomState(3).randn(2, 3, 4).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    y = net.blobs["l"].data
    assert y.shape == (2, 3, 4, 1)
    centered = x - x.mean(axis=2, keepdims=True)
    expected = centered / (np.sqrt((centered ** 2).mean(axis=2, keepdims=True)) + 1e-9)
    np.testing.assert_allclose(y[..., 0], expected, rtol=1e-5, atol=1e-6)


def test_lrn_across_backward_is_the_exact_derivative():
    """LRNLayer::CrossChannelBackward_cpu's formula, used by _CrossChannelLRN, equals the
    derivative of F.local_response_norm (the same forward), including C < local_size."""
    for shape, size in [((2, 7, 3, 4), 5), ((1, 3, 2, 2), 5)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        def lrn(t: torch.Tensor) -> torch.Tensor:
            return _CrossChannelLRN.apply(t, size, 0.3, 0.6, 2.0)
        assert torch.autograd.gradcheck(lrn, (x,))
        torch.testing.assert_close(lrn(x), F.local_response_norm(x, size, 0.3, 0.6, 2.0))


@pytest.mark.parametrize("body", [
    layer("ReLU", "relu_param { negative_slope: 0.1 }"), layer("PReLU"), layer("ELU"),
    layer("Power", "power_param { power: 2.5 shift: 3 }"), layer("Exp", "exp_param { base: 2 }"),
    layer("BatchNorm"), layer("LRN"), layer("LRN", "lrn_param { norm_region: WITHIN_CHANNEL }"),
    layer("MVN"), layer("Scale", "scale_param { bias_term: true }"), layer("Swish"),
])
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_layers_trace(tmp_path, cpu_mode, body):
    """Each module traces with torch.jit.trace and the trace reproduces the forward."""
    module = make_net(tmp_path, body).module.layers["l"]
    x = torch.rand(2, 3, 4, 5) + 0.5
    traced = torch.jit.trace(module, (x,))
    torch.testing.assert_close(traced(x), module(x))
