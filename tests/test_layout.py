"""caffe2torch.layout: conv nets run channels-last (NHWC) with the values, gradients, pycaffe
views, net surgery and saved weights of the NCHW net."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch.fillers import fill_
from caffe2torch.layout import is_nhwc, to_nhwc
from caffe2torch.proto import caffe_pb2

from prototxt import inputs, layer

CONV = ('convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 {extra} '
        'weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" }} }}')


def conv_net(channels: int = 1, group: int = 1) -> str:
    """conv -> ReLU -> MAX pool -> conv (maybe grouped) -> InnerProduct -> SoftmaxWithLoss."""
    second = CONV.format(n=4, extra=f"group: {group}" if group > 1 else "")
    return ("force_backward: true\n" + inputs(data=(3, channels, 8, 8), label=(3,))
            + layer("Convolution", ["data"], ["c1"], CONV.format(n=4, extra=""), name="conv1")
            + layer("ReLU", ["c1"], ["c1"], name="relu")
            + layer("Pooling", ["c1"], ["p1"], "pooling_param { pool: MAX kernel_size: 3 "
                    "stride: 2 }", name="pool")
            + layer("Convolution", ["p1"], ["c2"], second, name="conv2")
            + layer("InnerProduct", ["c2"], ["ip"], 'inner_product_param { num_output: 5 '
                    'weight_filler { type: "gaussian" std: 0.1 } }', name="ip")
            + layer("SoftmaxWithLoss", ["ip", "label"], ["loss"], name="loss"))


def make_twins(tmp_path, channels: int = 1, group: int = 1):
    """The net channels-last and NCHW with the same weights, and one batch."""
    path = tmp_path / "net.prototxt"
    path.write_text(conv_net(channels, group))
    nhwc, nchw = caffe.Net(str(path), caffe.TRAIN), caffe.Net(str(path), caffe.TRAIN)
    # Forced, so that the twins differ on any device (the default is NCHW off the CPU).
    assert nhwc.module.use_channels_last(True) and not nchw.module.use_channels_last(False)
    for name, blobs in nhwc.params.items():
        for mine, theirs in zip(blobs, nchw.params[name]):
            theirs.data[...] = mine.data
    rng = np.random.default_rng(0)
    feed = {"data": rng.standard_normal((3, channels, 8, 8)).astype(np.float32),
            "label": np.array([0, 3, 4], np.float32)}
    return nhwc, nchw, feed


def test_default_layout_follows_the_device(tmp_path):
    """A new net is channels-last on the CPU and NCHW once moved elsewhere (the meta device
    stands in for CUDA here); a forced layout holds on every device."""
    path = tmp_path / "net.prototxt"
    path.write_text(conv_net(1, 1))
    module = caffe.load(str(path), phase="train")
    assert module.channels_last
    moved = copy.deepcopy(module).to("meta")
    weight = moved.layers["conv2"].blobs[0]
    assert not moved.channels_last and weight.is_contiguous()
    module.use_channels_last(True)
    forced = copy.deepcopy(module).to("meta")
    assert forced.channels_last
    assert forced.layers["conv2"].blobs[0].is_contiguous(memory_format=torch.channels_last)


@pytest.fixture
def twins(tmp_path):
    return make_twins(tmp_path)


def test_weights_and_activations_are_nhwc(twins):
    nhwc, nchw, feed = twins
    weight = nhwc.module.layers["conv2"].blobs[0]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert nchw.module.layers["conv2"].blobs[0].is_contiguous()
    nhwc.forward(**feed)
    assert is_nhwc(nhwc.blobs["c1"]._data) and is_nhwc(nhwc.blobs["c2"]._data)
    assert nhwc.blobs["c1"].data.shape == (3, 4, 8, 8)


@pytest.mark.parametrize("channels,group", [(1, 1), (4, 4)])  # 4, 4: depthwise conv2
def test_values_and_gradients_match_the_nchw_net(tmp_path, channels, group):
    nhwc, nchw, feed = make_twins(tmp_path, channels, group)
    for net in (nhwc, nchw):
        net.forward(**feed)
        net.backward()
    assert is_nhwc(nhwc.blobs["c1"]._data) and nchw.blobs["c1"]._data.is_contiguous()
    for name in ("c1", "p1", "c2", "ip", "loss"):
        np.testing.assert_allclose(nhwc.blobs[name].data, nchw.blobs[name].data,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("c1", "c2", "data"):
        np.testing.assert_allclose(nhwc.blobs[name].diff, nchw.blobs[name].diff,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    for name, blobs in nhwc.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_allclose(blob.diff, nchw.params[name][i].diff, rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}[{i}]")


def test_surgery_and_saved_weights_keep_logical_order(twins, tmp_path):
    """Writing a param's numpy view changes the NHWC weight; a caffemodel saved from the
    NHWC net loads into an NCHW net element for element."""
    nhwc, nchw, feed = twins
    new = np.arange(4 * 4 * 9, dtype=np.float32).reshape(4, 4, 3, 3) / 100
    nhwc.params["conv2"][0].data[...] = new
    np.testing.assert_array_equal(nhwc.module.layers["conv2"].blobs[0].detach().cpu().numpy(), new)
    nhwc.save(str(tmp_path / "w.caffemodel"))
    nchw.copy_from(str(tmp_path / "w.caffemodel"))
    for name, blobs in nhwc.params.items():
        for i, blob in enumerate(blobs):
            np.testing.assert_array_equal(nchw.params[name][i].data, blob.data)


def test_switching_back_restores_nchw(twins):
    nhwc, _, feed = twins
    assert not nhwc.module.use_channels_last(False)
    nhwc.forward(**feed)
    assert nhwc.blobs["c2"]._data.is_contiguous()
    assert nhwc.module.layers["conv2"].blobs[0].is_contiguous()


def test_one_channel_view_is_free():
    x = torch.randn(2, 1, 5, 6)
    y = to_nhwc(x)
    assert is_nhwc(y) and y.data_ptr() == x.data_ptr() and torch.equal(x, y)
    many = torch.randn(2, 3, 5, 6)
    assert to_nhwc(many) is many  # the convolution converts it, without keeping a copy


@pytest.mark.parametrize("kind", ["gaussian", "positive_unitball", "xavier"])
def test_fillers_draw_the_same_values_in_either_layout(kind):
    filler = caffe_pb2.FillerParameter(type=kind)
    torch.manual_seed(3)
    plain = fill_(torch.empty(4, 3, 2, 2), filler)
    torch.manual_seed(3)
    nhwc = fill_(torch.empty(4, 3, 2, 2).contiguous(memory_format=torch.channels_last), filler)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc, plain, rtol=0, atol=0)


def test_python_layer_sees_c_contiguous_blobs(tmp_path):
    """Caffe's blobs are always C-contiguous; a Python layer after an NHWC convolution gets
    C-contiguous bottom data and top diff, as user code (e.g. C extensions) may assume."""
    (tmp_path / "contiguity_probe.py").write_text(
        "import caffe\n"
        "seen = []\n"
        "class Probe(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top):\n"
        "        seen.append(bottom[0].data.flags['C_CONTIGUOUS'])\n"
        "        top[0].data[...] = 2 * bottom[0].data\n"
        "    def backward(self, top, propagate_down, bottom):\n"
        "        seen.append(top[0].diff.flags['C_CONTIGUOUS'])\n"
        "        bottom[0].diff[...] = 2 * top[0].diff\n")
    path = tmp_path / "net.prototxt"
    path.write_text("force_backward: true\n" + inputs(data=(2, 3, 6, 6))
                    + layer("Convolution", ["data"], ["c"], CONV.format(n=4, extra=""),
                            name="conv")
                    + layer("Python", ["c"], ["p"], 'python_param { module: "contiguity_probe" '
                            'layer: "Probe" }', name="probe")
                    + layer("ReLU", ["p"], ["p"], name="relu"))
    net = caffe.Net(str(path), caffe.TRAIN)
    assert net.module.use_channels_last(True)  # forced: the default is NCHW off the CPU
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 6)).astype(np.float32)
    net.forward(data=x)
    net.blobs["p"].diff[...] = 1.0
    net.backward()
    import contiguity_probe
    assert contiguity_probe.seen == [True, True]
    np.testing.assert_allclose(net.blobs["p"].data, np.maximum(2 * net.blobs["c"].data, 0),
                               rtol=1e-6)
