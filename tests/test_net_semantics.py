"""Caffe's net assembly rules (net.cpp, insert_splits.cpp, layer.hpp) on small prototxts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch import NetError
from caffe2torch.layers import CaffeLayer, register

DATA = 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }\n'


def net_from(tmp_path, body: str, phase=caffe.TEST, **kw) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text(body)
    return caffe.Net(str(path), phase, **kw)


def ip(name: str, bottom: str, top: str, extra: str = "", n: int = 4) -> str:
    return (f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" {extra}'
            f' inner_product_param {{ num_output: {n} weight_filler {{ type: "gaussian" }} }} }}\n')


def test_phase_level_stage_filtering(tmp_path):
    body = DATA + "".join([
        ip("train_only", "data", "a", 'include { phase: TRAIN }'),
        ip("test_only", "data", "b", 'include { phase: TEST }'),
        ip("level2", "data", "c", 'include { min_level: 2 }'),
        ip("staged", "data", "d", 'include { stage: "deploy" }'),
        ip("not_staged", "data", "e", 'exclude { stage: "deploy" }'),
        ip("max1", "data", "f", 'include { max_level: 1 }'),
    ])
    names = net_from(tmp_path, body)._layer_names
    assert [n for n in names if "split" not in n] == ["data", "test_only", "not_staged", "max1"]
    names = net_from(tmp_path, body, caffe.TRAIN, level=2, stages=["deploy"])._layer_names
    assert [n for n in names if "split" not in n] == ["data", "train_only", "level2", "staged"]


def test_include_and_exclude_together_is_an_error(tmp_path):
    body = DATA + ip("both", "data", "a", 'include { phase: TEST } exclude { phase: TRAIN }')
    with pytest.raises(NetError, match="'both'.*either include rules or exclude rules"):
        net_from(tmp_path, body)


def test_split_blobs_and_layers_use_caffes_names(tmp_path):
    net = net_from(tmp_path, DATA + ip("a", "data", "a") + ip("b", "data", "b"))
    assert "data_data_0_split" in net._layer_names
    assert list(net.blobs) == ["data", "data_data_0_split_0", "data_data_0_split_1", "a", "b"]
    assert net.bottom_names["a"] == ["data_data_0_split_0"]


def test_split_gradients_accumulate(tmp_path):
    net = net_from(tmp_path, "force_backward: true\n" + DATA + ip("a", "data", "a") + ip("b", "data", "b"))
    net.blobs["data"].data[...] = np.random.randn(2, 3)
    net.forward()
    net.blobs["a"].diff[...] = 1
    net.blobs["b"].diff[...] = 1
    net.backward()
    wa, wb = net.params["a"][0].data, net.params["b"][0].data
    expected = np.ones((2, 4)) @ wa + np.ones((2, 4)) @ wb
    np.testing.assert_allclose(net.blobs["data"].diff, expected, rtol=1e-5)
    np.testing.assert_allclose(net.blobs["data_data_0_split_0"].diff, np.ones((2, 4)) @ wa, rtol=1e-5)


def test_in_place_top_rebinds_the_name_and_diff_is_the_producers(tmp_path):
    body = ("force_backward: true\n" + DATA + ip("a", "data", "a") +
            'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }\n')
    net = net_from(tmp_path, body)
    x = np.random.randn(2, 3).astype(np.float32)
    net.blobs["data"].data[...] = x
    net.forward()
    pre = x @ net.params["a"][0].data.T
    np.testing.assert_allclose(net.blobs["a"].data, np.maximum(pre, 0), rtol=1e-5, atol=1e-6)
    net.blobs["a"].diff[...] = 1
    net.backward()
    np.testing.assert_allclose(net.blobs["a"].diff, (pre > 0).astype(np.float32))


def test_top_produced_twice_names_both_layers(tmp_path):
    body = DATA + ip("first", "data", "x") + ip("second", "data", "x")
    with pytest.raises(NetError, match="'second'.*'x' is produced by multiple sources.*'first'"):
        net_from(tmp_path, body)


def test_unknown_bottom_names_layer_and_line(tmp_path):
    body = DATA + ip("a", "nothing", "a")
    with pytest.raises(NetError, match=r"net.prototxt:2: layer 'a' \(InnerProduct\): unknown bottom blob 'nothing'"):
        net_from(tmp_path, body)


def test_unknown_layer_type_says_how_to_register(tmp_path):
    body = DATA + 'layer { name: "m" type: "MyMagic" bottom: "data" top: "m" }\n'
    with pytest.raises(NetError, match="unknown layer type 'MyMagic'.*register"):
        net_from(tmp_path, body)


def test_user_registered_layer_is_used(tmp_path):
    @register("TimesThree")
    class TimesThree(CaffeLayer):
        min_bottoms = max_bottoms = 1

        def forward(self, x):
            return x * 3

    net = net_from(tmp_path, DATA + 'layer { name: "t" type: "TimesThree" bottom: "data" top: "t" }\n')
    net.blobs["data"].data[...] = 1
    assert np.all(net.forward()["t"] == 3)
    assert "TimesThree" in caffe.layer_type_list()


def test_loss_weight_on_any_layer_sums_its_top(tmp_path):
    body = DATA + ip("a", "data", "a", "loss_weight: 2")
    net = net_from(tmp_path, body)
    net.blobs["data"].data[...] = np.random.randn(2, 3)
    assert net.blob_loss_weights["a"] == 2
    _, loss = net.module.run({"data": torch.from_numpy(net.blobs["data"].data)})
    out = net.forward()["a"]
    assert loss.item() == pytest.approx(2 * out.sum(), rel=1e-5)


def test_loss_weight_count_must_match_tops(tmp_path):
    body = DATA + ip("a", "data", "a", "loss_weight: 1 loss_weight: 2")
    with pytest.raises(NetError, match="loss_weight must be unspecified or given once per top"):
        net_from(tmp_path, body)


def test_weight_sharing_by_param_name(tmp_path):
    shared = 'param { name: "w" } param { name: "b" }'
    net = net_from(tmp_path, DATA + ip("a", "data", "a", shared) + ip("b", "data", "b", shared))
    assert net.params["a"][0]._param is net.params["b"][0]._param
    assert len(net.module.learnable) == 2
    net.params["a"][0].data[...] = 5
    assert np.all(net.params["b"][0].data == 5)


def test_strict_sharing_checks_shape_and_permissive_reshapes(tmp_path):
    a = ('layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" %s } '
         'inner_product_param { num_output: 6 bias_term: false } }\n')
    b = ('layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" %s } '
         'inner_product_param { num_output: 3 bias_term: false } }\n')
    with pytest.raises(NetError, match="cannot share param 'w' \\(STRICT\\)"):
        net_from(tmp_path, DATA + a % "" + b % "")
    net = net_from(tmp_path, "force_backward: true\n" + DATA + a % "share_mode: PERMISSIVE" +
                   b % "share_mode: PERMISSIVE")
    assert net.params["b"][0].data.shape == (3, 6)
    net.params["a"][0].data[...] = np.arange(18).reshape(6, 3)
    np.testing.assert_array_equal(net.params["b"][0].data, np.arange(18).reshape(3, 6))


def test_shared_params_need_matching_lr_mult(tmp_path):
    a = ip("a", "data", "a", 'param { name: "w" lr_mult: 1 }')
    b = ip("b", "data", "b", 'param { name: "w" lr_mult: 2 }')
    with pytest.raises(NetError, match="mismatched lr_mult"):
        net_from(tmp_path, DATA + a + b)


def test_copy_from_checks_shapes_and_ignores_unknown_layers(tmp_path):
    net = net_from(tmp_path, DATA + ip("a", "data", "a"))
    net.params["a"][0].data[...] = np.random.randn(4, 3)
    net.save(str(tmp_path / "w.caffemodel"))
    other = net_from(tmp_path, DATA + ip("a", "data", "a") + ip("extra", "a", "e"))
    other.copy_from(str(tmp_path / "w.caffemodel"))
    np.testing.assert_array_equal(other.params["a"][0].data, net.params["a"][0].data)
    wrong = net_from(tmp_path, DATA + ip("a", "data", "a", n=5))
    with pytest.raises(NetError, match="cannot copy param 0 weights from layer 'a'; shape mismatch"):
        wrong.copy_from(str(tmp_path / "w.caffemodel"))


def test_legacy_constructor_and_phase_names(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(DATA + ip("a", "data", "a"))
    first = caffe.Net(str(path), caffe.TEST)
    first.save(str(tmp_path / "w.caffemodel"))
    legacy = caffe.Net(str(path), str(tmp_path / "w.caffemodel"), caffe.TEST)
    np.testing.assert_array_equal(legacy.params["a"][0].data, first.params["a"][0].data)
    module = caffe.load(str(path), str(tmp_path / "w.caffemodel"), phase="train")
    assert module.phase == caffe.TRAIN


def test_module_forward_returns_output_and_frees_nothing_needed(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_text(DATA + ip("a", "data", "a") + 'layer { name: "r" type: "ReLU" bottom: "a" top: "a" }\n')
    model = caffe.load(str(path))
    x = torch.randn(2, 3)
    out = model(x)
    w, b = model.layers["a"].blobs
    torch.testing.assert_close(out, torch.relu(x @ w.T + b))
