"""The fast paths of caffe2torch.fusion give what the layers give one by one (BatchNorm+Scale as
one batch_norm call, in-place ReLU and Eltwise SUM), in the module and the pycaffe view, at TEST
and TRAIN, with and without autograd."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe2torch as caffe
from caffe2torch import fusion

from prototxt import inputs, layer

CONV = ('convolution_param { num_output: 4 kernel_size: 3 pad: 1 '
        'weight_filler { type: "gaussian" } }')
IP = 'inner_product_param { num_output: 3 weight_filler { type: "gaussian" } }'

pytestmark = pytest.mark.usefixtures("cpu_mode")  # feeds host tensors to net.module


def bn_scale_net(bn_top: str, scale_top: str, bn_extra: str = "") -> str:
    """conv -> BatchNorm -> Scale(bias) -> in-place ReLU -> InnerProduct, with the chosen tops."""
    return ("force_backward: true\n" + inputs(data=(2, 3, 5, 5))
            + layer("Convolution", ["data"], ["c"], CONV, name="conv")
            + layer("BatchNorm", ["c"], [bn_top], bn_extra, name="bn")
            + layer("Scale", [bn_top], [scale_top], "scale_param { bias_term: true }", name="sc")
            + layer("ReLU", [scale_top], [scale_top], name="relu")
            + layer("InnerProduct", [scale_top], ["out"], IP, name="ip"))


def twins(tmp_path, body: str, phase=caffe.TEST) -> tuple[caffe.Net, caffe.Net]:
    """The net with the fast paths and without them, with the same random weights and
    BatchNorm statistics."""
    path = tmp_path / "net.prototxt"
    path.write_text(body)
    fast, plain = caffe.Net(str(path), phase), caffe.Net(str(path), phase)
    plain.module.fuse = False
    rng = np.random.default_rng(0)
    for name, blobs in fast.params.items():
        for i, blob in enumerate(blobs):
            if name == "bn":
                blob.data[...] = [rng.normal(size=4), 1 + rng.random(4), [2.5]][i]
            else:
                blob.data[...] = rng.normal(size=blob.data.shape)
            plain.params[name][i].data[...] = blob.data
    return fast, plain


@pytest.fixture
def calls(monkeypatch) -> list[int]:
    """Counts the fused BatchNorm+Scale calls."""
    counted: list[int] = []
    original = fusion.batch_norm_scale

    def counting(*args):
        counted.append(1)
        return original(*args)
    monkeypatch.setattr(fusion, "batch_norm_scale", counting)
    return counted


def pycaffe_pass(net: caffe.Net, x: np.ndarray, **forward) -> dict[str, tuple[np.ndarray, ...]]:
    """Every blob's data and diff after forward and (unless ``end`` is given) backward."""
    net.blobs["data"].data[...] = x
    net.forward(**forward)
    if not forward:
        diff = net.blobs["out"].diff
        diff[...] = np.linspace(-2, 3, diff.size).reshape(diff.shape)
        net.backward()
    blobs = {name: (b.data.copy(), b.diff.copy()) for name, b in net.blobs.items()}
    params = {name: tuple(p.diff.copy() for p in ps) for name, ps in net.params.items()}
    return {**blobs, **{f"param {k}": v for k, v in params.items()}}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        for a, b in zip(got[name], want[name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)


# -- BatchNorm + Scale -------------------------------------------------------------------------

@pytest.mark.parametrize("bn_top, scale_top, module_fused, pycaffe_fused", [
    ("c", "c", True, True),        # ResNet/MobileNet: everything in place on the conv's top
    ("bn", "bn", True, False),     # the view would take the Scale's output for bn's first value
    ("bn", "sc", False, False),    # the BatchNorm's own top stays visible
])
def test_bn_scale_matches_the_layers(tmp_path, calls, bn_top, scale_top, module_fused,
                                     pycaffe_fused):
    fast, plain = twins(tmp_path, bn_scale_net(bn_top, scale_top))
    x = np.random.default_rng(1).normal(size=(2, 3, 5, 5)).astype(np.float32)
    assert_same(pycaffe_pass(fast, x), pycaffe_pass(plain, x))
    assert len(calls) == pycaffe_fused
    calls.clear()
    outs, grads = [], []
    for net in (fast, plain):
        data = torch.from_numpy(x).requires_grad_(True)
        out = net.module(data)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append([data.grad] + [p.grad.clone() for p in net.module.parameters()
                                    if p.grad is not None])
        net.module.zero_grad()
    assert len(calls) == module_fused
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bn_scale_blob_shows_the_bn_output_when_the_run_ends_there(tmp_path, calls):
    fast, plain = twins(tmp_path, bn_scale_net("c", "c"))
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 5)).astype(np.float32)
    assert_same(pycaffe_pass(fast, x, end="bn"), pycaffe_pass(plain, x, end="bn"))
    assert not calls
    fast.forward(start="sc")  # from the Scale on: the Scale runs alone
    plain.forward(start="sc")
    np.testing.assert_allclose(fast.blobs["out"].data, plain.blobs["out"].data, rtol=1e-5)
    assert not calls


def test_bn_scale_net_surgery_takes_effect(tmp_path):
    fast, plain = twins(tmp_path, bn_scale_net("c", "c"))
    x = np.random.default_rng(3).normal(size=(2, 3, 5, 5)).astype(np.float32)
    for surgery in ({"bn": (0, 5.0)}, {"bn": (1, 0.25)}, {"sc": (0, -2.0)}, {"sc": (1, 3.0)},
                    {"bn": (2, 0.0)}):
        before = fast.forward(data=x)["out"].copy()
        for net in (fast, plain):
            for name, (index, value) in surgery.items():
                net.params[name][index].data[...] = value
        after, want = fast.forward(data=x)["out"], plain.forward(data=x)["out"]
        np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6)
        assert not np.allclose(after, before), surgery


def test_bn_scale_at_train_keeps_batch_statistics(tmp_path, calls):
    fast, plain = twins(tmp_path, bn_scale_net("c", "c"), caffe.TRAIN)
    x = torch.randn(2, 3, 5, 5)
    for _ in range(2):
        outs = [net.module(x) for net in (fast, plain)]
        torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(fast.params["bn"], plain.params["bn"]):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-6)
    assert not calls


def test_bn_scale_global_stats_at_train_is_fused_and_learns_the_scale(tmp_path, calls):
    body = bn_scale_net("c", "c", "batch_norm_param { use_global_stats: true }")
    fast, plain = twins(tmp_path, body, caffe.TRAIN)
    x = torch.randn(2, 3, 5, 5)
    grads = []
    for net in (fast, plain):
        net.module(x).sum().backward()
        grads.append([p.grad for p in net.module.parameters() if p.requires_grad])
    assert calls
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bn_scale_with_a_hook_runs_the_layers(tmp_path, calls):
    fast, plain = twins(tmp_path, bn_scale_net("c", "c"))
    seen = []
    fast.module.layers["sc"].register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fast.module(x), plain.module(x))
    assert len(seen) == 1 and not calls


# -- in-place ReLU ------------------------------------------------------------------------------

def test_relu_on_an_input_or_a_view_never_overwrites_it(tmp_path):
    body = (inputs(data=(2, 3, 4))
            + layer("ReLU", ["data"], ["data"], name="r1")
            + layer("Reshape", ["data"], ["v"], "reshape_param { shape { dim: 2 dim: -1 } }",
                    name="view")
            + layer("ReLU", ["v"], ["v"], name="r2"))
    path = tmp_path / "net.prototxt"
    path.write_text(body)
    model = caffe.load(str(path))
    assert not model._fast
    x = torch.randn(2, 3, 4)
    kept = x.clone()
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.relu(kept).reshape(2, -1))
    assert torch.equal(x, kept)


def test_relu_in_place_only_after_a_layer_that_made_a_new_unsaved_tensor(tmp_path):
    body = ("force_backward: true\n" + inputs(data=(2, 3, 5, 5))
            + layer("Convolution", ["data"], ["c"], CONV, name="conv")
            + layer("ReLU", ["c"], ["c"], name="relu1")
            + layer("Convolution", ["c"], ["c2"], CONV, name="conv2")
            + layer("ReLU", ["c2"], ["c2"], name="relu2")
            + layer("Eltwise", ["c2", "c"], ["p"], "eltwise_param { operation: PROD }", name="p")
            + layer("ReLU", ["p"], ["p"], name="relu3")       # PROD may keep its top
            + layer("Dropout", ["p"], ["d"], name="drop")
            + layer("ReLU", ["d"], ["d"], name="relu4")       # Dropout passes p through at TEST
            + layer("Eltwise", ["d", "c"], ["out"], name="sum"))
    fast, plain = twins(tmp_path, body)
    steps = [s.name for s in fast.module.steps]
    assert [steps[i] for i, p in fast.module._fast.items() if p.kind == fusion.RELU] == \
        ["relu1", "relu2"]
    x = np.random.default_rng(4).normal(size=(2, 3, 5, 5)).astype(np.float32)
    with torch.no_grad():  # the pycaffe view without autograd: ReLUs in place
        for net in (fast, plain):
            net.forward(data=x)
    for name in fast.blobs:
        np.testing.assert_allclose(fast.blobs[name].data, plain.blobs[name].data,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    assert_same(pycaffe_pass(fast, x), pycaffe_pass(plain, x))  # with autograd: diffs too
    grads = []
    for net in (fast, plain):
        data = torch.from_numpy(x).requires_grad_(True)
        net.module(data).square().sum().backward()
        grads.append([data.grad] + [p.grad for p in net.module.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_relu_leaves_a_tensor_a_hook_kept_alone(tmp_path):
    fast, plain = twins(tmp_path, bn_scale_net("c", "c"))
    kept = []
    fast.module.layers["sc"].register_forward_hook(lambda m, i, o: kept.append((o.clone(), o)))
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fast.module(x), plain.module(x))
    (copy, seen), = kept
    assert torch.equal(copy, seen) and (seen < 0).any()  # the Scale's top, not the ReLU's


def test_relu_in_place_under_autograd_gives_the_same_gradients(tmp_path):
    fast, plain = twins(tmp_path, bn_scale_net("c", "c").replace("BatchNorm", "Bias")
                        .replace("scale_param { bias_term: true }", ""))
    x = torch.randn(2, 3, 5, 5)
    grads = []
    for net in (fast, plain):
        data = x.clone().requires_grad_(True)
        net.module(data).square().sum().backward()
        grads.append([data.grad] + [p.grad for p in net.module.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- in-place Eltwise SUM ------------------------------------------------------------------------

def test_sum_into_a_bottom_nothing_else_reads(tmp_path):
    body = ("force_backward: true\n" + inputs(data=(2, 4, 5, 5))
            + layer("Convolution", ["data"], ["a"], CONV, name="conv_a")
            + layer("Convolution", ["data"], ["b"], CONV, name="conv_b")
            + layer("Eltwise", ["a", "b"], ["s1"], name="s1")              # into a
            + layer("ReLU", ["s1"], ["s1"], name="relu")
            + layer("Convolution", ["s1"], ["c"], CONV, name="conv_c")
            + layer("Eltwise", ["s1", "c"], ["s2"], name="s2")             # s1 is a Split's
            + layer("Eltwise", ["s2", "s1"], ["s3"], "eltwise_param { coeff: 1 coeff: 2 }",
                    name="s3")                                             # coefficients: a new top
            + layer("Eltwise", ["s3", "data"], ["out"], name="s4"))        # data is the caller's
    fast, plain = twins(tmp_path, body)
    names = [s.name for s in fast.module.steps]
    into = {names[i]: p.into for i, p in fast.module._fast.items() if p.kind == fusion.SUM}
    assert into == {"s1": 0, "s2": 1, "s4": 0}
    # data and s1 feed several layers: their Splits hand out the bottom itself (the module
    # run) so autograd sums the gradients in place; the pycaffe view keeps one view per top
    splits = {names[i] for i, p in fast.module._fast.items() if p.kind == fusion.SPLIT}
    assert splits == {n for n in names if n.endswith("_split")} and len(splits) == 2
    x = torch.randn(2, 4, 5, 5)
    kept = x.clone()
    grads = []
    for net in (fast, plain):
        with torch.no_grad():
            torch.testing.assert_close(fast.module(x), plain.module(x))
        data = x.clone().requires_grad_(True)
        net.module(data).square().sum().backward()
        grads.append([data.grad] + [p.grad for p in net.module.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.equal(x, kept)
    y = np.random.default_rng(5).normal(size=(2, 4, 5, 5)).astype(np.float32)
    assert_same(pycaffe_pass(fast, y), pycaffe_pass(plain, y))  # the view: no sum in place
