"""The course's pycaffe programs, run on caffe2torch as ``import caffe2torch as caffe``.

Each test is one of the course's programs written with the same pycaffe calls: training
with ``SGDSolver`` (restore, copy_from, step, snapshot, blobs), a loss plot, a plateau
learning-rate scheduler, LMDBs of Datums, nets built from ``caffe_pb2`` messages, net
surgery (SVD compression), Python layers, NetSpec, ``caffe.io``/``Classifier``/
``Detector``, ``caffe2torch pyrun`` and the object-detection practice in
examples/detection_practice.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from google.protobuf import text_format

import caffe2torch as caffe
from caffe2torch import layers as L
from caffe2torch import params as P
from caffe2torch.proto import caffe_pb2
from conftest import shared_path

ROOT = Path(__file__).resolve().parents[1]
MATERIALS = "corpus/repos/kyehyeon__caffe-materials"
PRACTICE = ROOT / "examples" / "detection_practice"


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch, tmp_path: Path):
    """Python-layer modules, and the folders put on sys.path to find them, stay in their test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if (getattr(sys.modules[name], "__file__", None) or "").startswith(
                (str(tmp_path), str(PRACTICE))):
            del sys.modules[name]


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


# -- the pycaffe surface ---------------------------------------------------------------------
def test_caffe2torch_is_the_pycaffe_surface():
    for name in ("Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
                 "AdaDeltaSolver", "AdamSolver", "get_solver", "TRAIN", "TEST", "set_mode_cpu",
                 "set_mode_gpu", "set_device", "set_random_seed", "layer_type_list", "Layer",
                 "Classifier", "Detector", "NetSpec", "to_proto", "install_caffe_alias"):
        assert hasattr(caffe, name), name
    for name in ("Transformer", "load_image", "resize_image", "oversample", "blobproto_to_array",
                 "array_to_blobproto", "array_to_datum", "datum_to_array"):
        assert hasattr(caffe.io, name), name
    assert caffe.proto.caffe_pb2 is caffe_pb2
    assert caffe.net_spec.layers.Convolution is not None and P.Pooling.MAX == 0
    # caffe2torch.layers is the layer package and net_spec's layers at once
    assert callable(L.register) and "Python" in caffe.layer_type_list()
    assert isinstance(L.Convolution(), caffe.net_spec.Top)


def test_install_caffe_alias_gives_one_module_per_name(monkeypatch):
    for name in [n for n in sys.modules if n == "caffe" or n.startswith("caffe.")]:
        monkeypatch.delitem(sys.modules, name)
    caffe.install_caffe_alias()
    import caffe as alias
    from caffe.proto import caffe_pb2 as pb2
    from caffe import layers as L2, params as P2

    assert alias is caffe and pb2 is caffe_pb2
    assert importlib.import_module("caffe.io") is sys.modules["caffe2torch.io"]
    assert isinstance(L2.ReLU(), caffe.net_spec.Top) and P2.Pooling.AVE == 1
    assert importlib.import_module("caffe.pycaffe").Net is caffe.Net


# -- solver programs (practice 1: ImageNet-style training on the course's tiny LMDB) ----------
@pytest.fixture
def practice1(tmp_path: Path) -> Path:
    """The course's practice1 net and solver, with paths pointing at the corpus LMDB."""
    materials = shared_path(MATERIALS)
    net = (materials / "practice1" / "net.pt").read_text()
    (tmp_path / "net.pt").write_text(net.replace("data/tiny_lmdb",
                                                 str(materials / "tiny_lmdb")))
    solver = (materials / "practice1" / "solver.pt").read_text()
    solver = solver.replace("caffe-materials/practice1/net.pt", str(tmp_path / "net.pt"))
    solver = solver.replace("caffe-materials/practice1/net_train", str(tmp_path / "net_train"))
    (tmp_path / "solver.pt").write_text(solver + "random_seed: 5\n")
    return tmp_path / "solver.pt"


def test_practice1_train_snapshot_restore(practice1: Path):
    solver = caffe.SGDSolver(str(practice1))
    assert solver.net.blobs["data"].data.shape == (1, 3, 224, 224)
    losses = []
    for _ in range(2):
        solver.step(1)
        losses.append(solver.net.blobs["loss"].data.item())
    assert solver.iter == 2 and all(np.isfinite(losses))
    model, state = solver.snapshot()
    assert Path(model).name == "net_train_iter_2.caffemodel"
    weights = solver.net.params["conv1/conv"][0].data.copy()

    resumed = caffe.SGDSolver(str(practice1))
    resumed.restore(state)
    assert resumed.iter == 2
    np.testing.assert_array_equal(resumed.net.params["conv1/conv"][0].data, weights)

    finetune = caffe.get_solver(str(practice1))
    finetune.net.copy_from(model)
    np.testing.assert_array_equal(finetune.net.params["conv5/conv"][0].data,
                                  solver.net.params["conv5/conv"][0].data)
    finetune.step(1)
    assert finetune.iter == 1
    assert not np.array_equal(finetune.net.params["conv1/conv"][0].data, weights)


# -- a small regression problem for the scripted training loops ------------------------------
REGRESSION_LAYERS = '''
import json
import numpy as np
import caffe


class RandomRegression(caffe.Layer):
    """Data layer: x ~ U(-1, 1) and y = 2 x + 1 + noise (batch, noise, seed: param_str)."""

    def setup(self, bottom, top):
        params = json.loads(self.param_str)
        self.batch, self.noise = params["batch"], params["noise"]
        self.rng = np.random.RandomState(params["seed"])

    def reshape(self, bottom, top):
        top[0].reshape(self.batch, 3)
        top[1].reshape(self.batch, 3)

    def forward(self, bottom, top):
        x = self.rng.uniform(-1, 1, size=(self.batch, 3))
        top[0].data[...] = x
        top[1].data[...] = 2 * x + 1 + self.noise * self.rng.randn(self.batch, 3)

    def backward(self, top, propagate_down, bottom):
        pass


class ScaleBias(caffe.Layer):
    """y = a * x + b per channel, a and b trainable blobs (a starts at param_str's init)."""

    def setup(self, bottom, top):
        channels = bottom[0].data.shape[1]
        self.blobs.add_blob(channels)
        self.blobs.add_blob(channels)
        self.blobs[0].data[...] = json.loads(self.param_str)["init"]
        self.reshapes = 0

    def reshape(self, bottom, top):
        self.reshapes += 1
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self.blobs[0].data + self.blobs[1].data

    def backward(self, top, propagate_down, bottom):
        self.blobs[0].diff[...] += (top[0].diff * bottom[0].data).sum(0)
        self.blobs[1].diff[...] += top[0].diff.sum(0)
        if propagate_down[0]:
            bottom[0].diff[...] = top[0].diff * self.blobs[0].data


class EuclideanLoss(caffe.Layer):
    """Caffe's Euclidean loss in Python (examples/pycaffe/layers/pyloss.py)."""

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("Inputs must have the same dimension.")
        self.diff = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.diff[...] = bottom[0].data - bottom[1].data
        top[0].data[...] = np.sum(self.diff ** 2) / bottom[0].num / 2.

    def backward(self, top, propagate_down, bottom):
        self.top_diff = top[0].diff.copy()     # the loss weight; pyloss.py does not apply it
        for i in range(2):
            if not propagate_down[i]:
                continue
            sign = 1 if i == 0 else -1
            bottom[i].diff[...] = sign * self.diff / bottom[i].num


class DoubleInPlace(caffe.Layer):
    """In place (top = bottom): relies on the top being the bottom's blob, as in Caffe."""

    def forward(self, bottom, top):
        top[0].data[...] *= 2

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] *= 2


class Broken(caffe.Layer):
    def setup(self, bottom, top):
        raise KeyError("no such option")
'''

REGRESSION_NET = '''
name: "regression"
layer { name: "data" type: "Python" top: "x" top: "y"
        python_param { module: "course_pylayers" layer: "RandomRegression"
                       param_str: '{"batch": 16, "noise": NOISE, "seed": 3}' } }
layer { name: "affine" type: "Python" bottom: "x" top: "z"
        param { lr_mult: 1 } param { lr_mult: BIAS_LR decay_mult: 0 }
        python_param { module: "course_pylayers" layer: "ScaleBias" param_str: '{"init": 0.5}' } }
layer { name: "loss" type: "Python" bottom: "z" bottom: "y" top: "loss" loss_weight: 1
        python_param { module: "course_pylayers" layer: "EuclideanLoss" } }
'''


@pytest.fixture
def regression(tmp_path: Path):
    """Write the regression net (Python layers beside it) and return a solver factory."""
    write(tmp_path / "course_pylayers.py", REGRESSION_LAYERS)

    def make(base_lr: float = 0.2, bias_lr: float = 2, noise: float = 0.0) -> caffe.SGDSolver:
        net = REGRESSION_NET.replace("BIAS_LR", str(bias_lr)).replace("NOISE", str(noise))
        write(tmp_path / "net.prototxt", net)
        fields = {"net": f'"{tmp_path / "net.prototxt"}"', "base_lr": str(base_lr),
                  "lr_policy": '"fixed"', "momentum": "0.9", "weight_decay": "0.0001",
                  "max_iter": "1000", "snapshot_prefix": f'"{tmp_path / "reg"}"'}
        write(tmp_path / "solver.prototxt", "".join(f"{k}: {v}\n" for k, v in fields.items()))
        return caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
    return make


def test_python_layers_train_end_to_end(regression):
    solver = regression()
    learnable = solver.net.module.learnable
    assert [(p.layer, p.lr_mult, p.decay_mult) for p in learnable] == \
        [("affine", 1.0, 1.0), ("affine", 2.0, 0.0)]
    assert solver.net.blob_loss_weights["loss"] == 1.0
    first = None
    for _ in range(150):
        solver.step(1)
        first = first if first is not None else float(solver.net.blobs["loss"].data[0])
    a, b = solver.net.params["affine"][0].data, solver.net.params["affine"][1].data
    np.testing.assert_allclose(a, 2.0, atol=0.02)
    np.testing.assert_allclose(b, 1.0, atol=0.02)
    assert float(solver.net.blobs["loss"].data[0]) < 1e-3 < first
    # the Python layer's own view of its blobs is the trained parameter
    np.testing.assert_array_equal(solver.net.layer_dict["affine"].blobs[0].data, a)
    model, state = solver.snapshot()
    history = caffe2torch_solverstate(state)
    assert len(history) == 2 and history[0].shape == (3,)

    restored = regression()
    restored.restore(state)
    np.testing.assert_array_equal(restored.net.params["affine"][0].data, a)


def caffe2torch_solverstate(path: str) -> list[np.ndarray]:
    from caffe2torch.formats import read_solverstate
    return read_solverstate(path).history


def test_python_layer_lr_mult_zero_freezes_its_blob(regression):
    solver = regression(bias_lr=0)
    solver.step(5)
    np.testing.assert_array_equal(solver.net.params["affine"][1].data, 0)
    assert not np.allclose(solver.net.params["affine"][0].data, 0.5)


def test_python_layer_gradients_and_reshape(tmp_path: Path):
    write(tmp_path / "course_pylayers.py", REGRESSION_LAYERS)
    write(tmp_path / "net.prototxt", '''
        force_backward: true
        layer { name: "in" type: "Input" top: "x" top: "y"
                input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 3 } } }
        layer { name: "affine" type: "Python" bottom: "x" top: "z"
                python_param { module: "course_pylayers" layer: "ScaleBias"
                               param_str: '{"init": 1.5}' } }
        layer { name: "double" type: "Python" bottom: "z" top: "z"
                python_param { module: "course_pylayers" layer: "DoubleInPlace" } }
        layer { name: "loss" type: "Python" bottom: "z" bottom: "y" top: "loss"
                loss_weight: 3 propagate_down: true propagate_down: false
                python_param { module: "course_pylayers" layer: "EuclideanLoss" } }
    ''')
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TRAIN)
    rng = np.random.RandomState(0)
    x, y = rng.randn(4, 3).astype(np.float32), rng.randn(4, 3).astype(np.float32)
    net.params["affine"][1].data[...] = [0.1, 0.2, 0.3]
    a, b = net.params["affine"][0].data.copy(), net.params["affine"][1].data.copy()
    out = net.forward(x=x, y=y)
    z = 2 * (a * x + b)
    d = z - y
    np.testing.assert_allclose(net.blobs["z"].data, z, rtol=1e-6)
    np.testing.assert_allclose(out["loss"], [(d ** 2).sum() / 8], rtol=1e-5)
    diffs = net.backward()
    dz = d / 4                                   # Euclidean over num 4
    np.testing.assert_allclose(net.params["affine"][0].diff, (2 * dz * x).sum(0), rtol=1e-5)
    np.testing.assert_allclose(net.params["affine"][1].diff, (2 * dz).sum(0), rtol=1e-5)
    np.testing.assert_allclose(diffs["x"], 2 * dz * a, rtol=1e-5)
    np.testing.assert_array_equal(net.blobs["y"].diff, 0)   # propagate_down: false
    np.testing.assert_array_equal(net.layer_dict["loss"].top_diff, [3])   # loss_weight

    layer = net.layer_dict["affine"]          # net.layers[i] of a Python layer is its object
    assert isinstance(layer, caffe.Layer) and layer.param_str == '{"init": 1.5}'
    assert layer.phase == caffe.TRAIN
    before = layer.reshapes
    net.blobs["x"].reshape(6, 3)
    net.blobs["y"].reshape(6, 3)
    net.reshape()
    assert net.blobs["z"].shape == (6, 3)
    net.forward()
    assert layer.reshapes == before + 2      # Net.reshape, then before the forward


def test_python_layer_errors_name_the_layer(tmp_path: Path):
    write(tmp_path / "course_pylayers.py", REGRESSION_LAYERS)
    base = 'layer {{ name: "in" type: "Input" top: "x" input_param {{ shape {{ dim: 2 }} }} }}\n' \
           'layer {{ name: "py" type: "Python" bottom: "x" top: "z" python_param {{ {} }} }}\n'
    cases = [('module: "course_pylayers" layer: "Broken"',
              r"layer 'py' \(Python\): its Python setup\(\) raised KeyError"),
             ('module: "no_such_module_xyz" layer: "L"',
              "cannot import python_param module 'no_such_module_xyz'"),
             ('module: "course_pylayers" layer: "Missing"', "no such name in the module"),
             ('module: "course_pylayers"', "needs both 'module' and 'layer'")]
    for param, message in cases:
        write(tmp_path / "bad.prototxt", base.format(param))
        with pytest.raises(caffe.NetError, match=message):
            caffe.Net(str(tmp_path / "bad.prototxt"), caffe.TEST)


# -- the training loop scripts ---------------------------------------------------------------
def test_training_loop_plots_the_loss(regression, tmp_path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solver = regression(base_lr=0.05)
    niter = 30
    train_loss = np.zeros(niter)
    for it in range(niter):
        solver.step(1)
        train_loss[it] = solver.net.blobs["loss"].data.item()
    fig, ax = plt.subplots()
    ax.plot(np.arange(niter), train_loss)
    ax.set_xlabel("iteration")
    ax.set_ylabel("train loss")
    fig.savefig(tmp_path / "loss.png")
    plt.close(fig)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert train_loss[-5:].mean() < train_loss[:5].mean()


def test_plateau_lr_scheduler(regression):
    """Drop the rate 10x when the moving average of the loss stops improving."""
    solver = regression(base_lr=0.2, noise=0.5)
    window, history, drops = 10, [], []
    for it in range(60):
        solver.step(1)
        history.append(solver.net.blobs["loss"].data.item())
        if len(history) >= 2 * window and it % window == window - 1:
            recent, before = np.mean(history[-window:]), np.mean(history[-2 * window:-window])
            if recent > 0.9 * before:
                solver.set_base_lr(solver.get_base_lr() * 0.1)
                drops.append(it)
    assert drops and solver.get_base_lr() < 0.2 and solver.lr == pytest.approx(solver.get_base_lr())
    solver.set_base_lr(0.0)           # from now on only the momentum moves the weights
    assert solver.lr == 0.0
    weights = [solver.net.params["affine"][0].data.copy()]
    for _ in range(2):
        solver.step(1)
        weights.append(solver.net.params["affine"][0].data.copy())
    np.testing.assert_allclose(weights[2] - weights[1], 0.9 * (weights[1] - weights[0]),
                               rtol=1e-3, atol=1e-7)


# -- LMDBs of Datums -------------------------------------------------------------------------
def test_lmdb_of_datums_feeds_a_data_layer(tmp_path: Path):
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, size=(6, 3, 5, 4)).astype(np.uint8)
    labels = rng.randint(0, 10, size=6)
    env = lmdb.open(str(tmp_path / "train_lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, (image, label) in enumerate(zip(images, labels)):
            datum = caffe.io.array_to_datum(image, int(label))
            txn.put(f"{i:08d}".encode("ascii"), datum.SerializeToString())
    env.close()

    env = lmdb.open(str(tmp_path / "train_lmdb"), readonly=True)
    with env.begin() as txn:
        for key, value in txn.cursor():
            datum = caffe_pb2.Datum()
            datum.ParseFromString(value)
            i = int(key)
            np.testing.assert_array_equal(caffe.io.datum_to_array(datum), images[i])
            assert datum.label == labels[i]
    env.close()

    write(tmp_path / "net.prototxt", f'''
        layer {{ name: "data" type: "Data" top: "data" top: "label"
                transform_param {{ scale: 0.00390625 }}
                data_param {{ source: "{tmp_path / 'train_lmdb'}" backend: LMDB batch_size: 3 }} }}
    ''')
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    for batch in range(2):
        net.forward()
        np.testing.assert_allclose(net.blobs["data"].data,
                                   images[3 * batch:3 * batch + 3] / 256.0, rtol=1e-6)
        np.testing.assert_array_equal(net.blobs["label"].data, labels[3 * batch:3 * batch + 3])


# -- nets built from caffe_pb2 messages ------------------------------------------------------
def conv_module(name: str, bottom: str, num_output: int, kernel: int = 3, stride: int = 1,
                pad: int = 1) -> list[caffe_pb2.LayerParameter]:
    """The course's conv module: Convolution, BatchNorm, Scale and ReLU, the last three in place."""
    conv = caffe_pb2.LayerParameter(name=f"{name}/conv", type="Convolution")
    conv.bottom.append(bottom)
    conv.top.append(name)
    conv.param.add(lr_mult=1, decay_mult=1)
    conv.convolution_param.num_output = num_output
    conv.convolution_param.kernel_size.append(kernel)
    conv.convolution_param.stride.append(stride)
    conv.convolution_param.pad.append(pad)
    conv.convolution_param.bias_term = False
    conv.convolution_param.weight_filler.type = "xavier"
    layers = [conv]
    for suffix, type_ in (("bn", "BatchNorm"), ("scale", "Scale"), ("relu", "ReLU")):
        layer = caffe_pb2.LayerParameter(name=f"{name}/{suffix}", type=type_)
        layer.bottom.append(name)
        layer.top.append(name)
        layers.append(layer)
    layers[1].batch_norm_param.use_global_stats = True
    layers[2].scale_param.bias_term = True
    return layers


def test_net_built_from_messages(tmp_path: Path):
    net_param = caffe_pb2.NetParameter(name="built")
    text_format.Merge('layer { name: "data" type: "Input" top: "data" '
                      'input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }', net_param)
    net_param.layer.extend(conv_module("conv1", "data", 4, stride=2))
    net_param.layer.extend(conv_module("conv2", "conv1", 6))
    head = caffe_pb2.NetParameter()
    head.layer.add(name="pool", type="Pooling", bottom=["conv2"], top=["pool"]) \
        .pooling_param.global_pooling = True
    net_param.MergeFromString(head.SerializeToString())   # appends the repeated layers
    assert [l.name for l in net_param.layer][-2:] == ["conv2/relu", "pool"]

    (tmp_path / "built.prototxt").write_text(str(net_param))
    from_file = caffe.Net(str(tmp_path / "built.prototxt"), caffe.TEST)
    from_message = caffe.Net(net_param, caffe.TEST)
    assert from_file.blobs["conv1"].data.shape == (2, 4, 4, 4)
    assert from_file.blobs["pool"].data.shape == (2, 6, 1, 1)
    assert list(from_file.params) == list(from_message.params) == \
        ["conv1/conv", "conv1/bn", "conv1/scale", "conv2/conv", "conv2/bn", "conv2/scale"]
    assert from_file._layer_names == [l.name for l in net_param.layer]


# -- net surgery: SVD compression of an InnerProduct -----------------------------------------
SVD_NET = '''
name: "mlp"
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 5 dim: 12 }} }} }}
{middle}
layer {{ name: "relu" type: "ReLU" bottom: "fc" top: "fc" }}
layer {{ name: "out" type: "InnerProduct" bottom: "fc" top: "out"
        inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
'''
FULL = ('layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" '
        'inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }')
SPLIT = ('layer { name: "fc_u" type: "InnerProduct" bottom: "data" top: "fc_u" '
         'inner_product_param { num_output: RANK bias_term: false } }\n'
         'layer { name: "fc_v" type: "InnerProduct" bottom: "fc_u" top: "fc" '
         'inner_product_param { num_output: 10 } }')


def test_svd_compression_by_net_surgery(tmp_path: Path):
    rank = 4
    (tmp_path / "full.prototxt").write_text(SVD_NET.format(middle=FULL))
    (tmp_path / "svd.prototxt").write_text(SVD_NET.format(middle=SPLIT.replace("RANK", str(rank))))
    caffe.set_random_seed(3)
    net = caffe.Net(str(tmp_path / "full.prototxt"), caffe.TEST)
    rng = np.random.RandomState(0)
    # a weight of rank 4 (a trained layer's spectrum would decay instead)
    net.params["fc"][0].data[...] = rng.randn(10, rank) @ rng.randn(rank, 12)
    net.params["fc"][1].data[...] = rng.randn(10)
    net.save(str(tmp_path / "full.caffemodel"))

    small = caffe.Net(str(tmp_path / "svd.prototxt"), caffe.TEST,
                      weights=str(tmp_path / "full.caffemodel"))   # copies "out" by name
    u, s, vt = np.linalg.svd(net.params["fc"][0].data.astype(np.float64), full_matrices=False)
    small.params["fc_u"][0].data[...] = np.diag(s[:rank]) @ vt[:rank]
    small.params["fc_v"][0].data[...] = u[:, :rank]
    small.params["fc_v"][1].data[...] = net.params["fc"][1].data
    np.testing.assert_array_equal(small.params["out"][0].data, net.params["out"][0].data)
    small.save(str(tmp_path / "svd.caffemodel"))

    data = rng.randn(5, 12).astype(np.float32)
    expected = net.forward(data=data)["out"].copy()
    reloaded = caffe.Net(str(tmp_path / "svd.prototxt"), str(tmp_path / "svd.caffemodel"),
                         caffe.TEST)
    np.testing.assert_allclose(reloaded.forward(data=data)["out"], expected, atol=1e-4)
    n_full = sum(p[0].data.size for p in net.params.values())
    n_small = sum(p[0].data.size for p in reloaded.params.values())
    assert n_small < n_full


# -- Net methods used by the course --------------------------------------------------------
def test_forward_all_backward_all_and_hdf5(tmp_path: Path):
    write(tmp_path / "net.prototxt", '''
        force_backward: true
        layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 4 } } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
                inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
        layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    ''')
    net = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    assert net._blob_names == ["data", "ip", "prob"] and list(net.layer_dict) == \
        ["data", "ip", "prob"]
    assert dict(net.blob_loss_weights) == {"data": 0.0, "ip": 0.0, "prob": 0.0}
    data = np.random.RandomState(0).randn(5, 4).astype(np.float32)
    w, b = net.params["ip"][0].data, net.params["ip"][1].data
    logits = data @ w.T + b
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    out = net.forward_all(data=data, blobs=["ip"])
    assert out["prob"].shape == (5, 3)
    np.testing.assert_allclose(out["prob"], prob, rtol=1e-5)
    np.testing.assert_allclose(out["ip"], logits, rtol=1e-5)

    top_diff = np.ones((5, 3), np.float32)
    outs, diffs = net.forward_backward_all(data=data, prob=top_diff)
    np.testing.assert_allclose(outs["prob"], prob, rtol=1e-5)
    assert diffs["data"].shape == (5, 4)
    np.testing.assert_allclose(diffs["data"], 0, atol=1e-6)   # softmax: sum of probs is 1

    net.save_hdf5(str(tmp_path / "w.caffemodel.h5"))
    other = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    other.load_hdf5(str(tmp_path / "w.caffemodel.h5"))
    np.testing.assert_array_equal(other.params["ip"][0].data, w)
    third = caffe.Net(str(tmp_path / "net.prototxt"), caffe.TEST)
    third.copy_from(str(tmp_path / "w.caffemodel.h5"))
    np.testing.assert_array_equal(third.params["ip"][1].data, b)


# -- NetSpec ---------------------------------------------------------------------------------
def lenet(lmdb_path: str, batch_size: int) -> caffe_pb2.NetParameter:
    """The 01-learning-lenet notebook's net."""
    n = caffe.NetSpec()
    n.data, n.label = L.Data(batch_size=batch_size, backend=P.Data.LMDB, source=lmdb_path,
                             transform_param=dict(scale=1. / 255), ntop=2)
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20,
                            weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(n.pool1, kernel_size=5, num_output=50,
                            weight_filler=dict(type="xavier"))
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.fc1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.fc1, in_place=True)
    n.score = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.score, n.label)
    return n.to_proto()


# What BVLC's net_spec writes for lenet() (examples/mnist/lenet_auto_train.prototxt).
LENET_AUTO_TRAIN = '''
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00392156862745 }
  data_param { source: "mnist/mnist_train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool2" top: "fc1"
  inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "score" type: "InnerProduct" bottom: "fc1" top: "score"
  inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss" }
'''


def test_netspec_lenet_matches_bvlc_output():
    expected = text_format.Parse(LENET_AUTO_TRAIN, caffe_pb2.NetParameter())
    assert lenet("mnist/mnist_train_lmdb", 64) == expected


def caffenet(lmdb_path: str, batch_size: int = 256, include_acc: bool = False
             ) -> caffe_pb2.NetParameter:
    """Caffe's examples/pycaffe/caffenet.py: anonymous tops, helper functions, to_proto."""
    def conv_relu(bottom, ks, nout, stride=1, pad=0, group=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                             group=group)
        return conv, L.ReLU(conv, in_place=True)

    def fc_relu(bottom, nout):
        fc = L.InnerProduct(bottom, num_output=nout)
        return fc, L.ReLU(fc, in_place=True)

    def max_pool(bottom, ks, stride=1):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    data, label = L.Data(source=lmdb_path, backend=P.Data.LMDB, batch_size=batch_size, ntop=2,
                         transform_param=dict(crop_size=227, mean_value=[104, 117, 123],
                                              mirror=True))
    conv1, relu1 = conv_relu(data, 11, 96, stride=4)
    pool1 = max_pool(relu1, 3, stride=2)
    norm1 = L.LRN(pool1, local_size=5, alpha=1e-4, beta=0.75)
    conv2, relu2 = conv_relu(norm1, 5, 256, pad=2, group=2)
    pool2 = max_pool(relu2, 3, stride=2)
    norm2 = L.LRN(pool2, local_size=5, alpha=1e-4, beta=0.75)
    conv3, relu3 = conv_relu(norm2, 3, 384, pad=1)
    conv4, relu4 = conv_relu(relu3, 3, 384, pad=1, group=2)
    conv5, relu5 = conv_relu(relu4, 3, 256, pad=1, group=2)
    pool5 = max_pool(relu5, 3, stride=2)
    fc6, relu6 = fc_relu(pool5, 4096)
    drop6 = L.Dropout(relu6, in_place=True)
    fc7, relu7 = fc_relu(drop6, 4096)
    drop7 = L.Dropout(relu7, in_place=True)
    fc8 = L.InnerProduct(drop7, num_output=1000)
    loss = L.SoftmaxWithLoss(fc8, label)
    if include_acc:
        acc = L.Accuracy(fc8, label)
        return caffe.to_proto(loss, acc)
    return caffe.to_proto(loss)


def test_netspec_caffenet_autonames():
    net = caffenet("/path/to/caffe-val-lmdb", batch_size=50, include_acc=True)
    names = [(l.name, l.type, list(l.bottom), list(l.top)) for l in net.layer]
    assert names[:4] == [
        ("Data1", "Data", [], ["Data1", "Data2"]),
        ("Convolution1", "Convolution", ["Data1"], ["Convolution1"]),
        ("ReLU1", "ReLU", ["Convolution1"], ["Convolution1"]),
        ("Pooling1", "Pooling", ["Convolution1"], ["Pooling1"])]
    assert names[-6:] == [
        ("InnerProduct2", "InnerProduct", ["InnerProduct1"], ["InnerProduct2"]),
        ("ReLU7", "ReLU", ["InnerProduct2"], ["InnerProduct2"]),
        ("Dropout2", "Dropout", ["InnerProduct2"], ["InnerProduct2"]),
        ("InnerProduct3", "InnerProduct", ["InnerProduct2"], ["InnerProduct3"]),
        ("SoftmaxWithLoss1", "SoftmaxWithLoss", ["InnerProduct3", "Data2"], ["SoftmaxWithLoss1"]),
        ("Accuracy1", "Accuracy", ["InnerProduct3", "Data2"], ["Accuracy1"])]
    assert len(net.layer) == 25
    assert text_format.MessageToString(net.layer[0].transform_param) == \
        "mirror: true\ncrop_size: 227\nmean_value: 104.0\nmean_value: 117.0\nmean_value: 123.0\n"
    conv2 = net.layer[5].convolution_param
    assert conv2.group == 2 and list(conv2.pad) == [2]


def test_netspec_fields_params_and_zero_tops():
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=[dict(dim=[3]), dict(dim=[4, 2])], ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n.silence_data2 = L.Silence(n.data2, ntop=0)
    net = caffe.Net(n.to_proto(), caffe.TEST)
    assert len(net.forward()) == 0

    n = caffe.NetSpec()
    n.x = L.Input(shape=dict(dim=[2, 3]))
    n.fc = L.InnerProduct(n.x, num_output=4, param=[dict(lr_mult=1, decay_mult=1),
                                                    dict(lr_mult=2, decay_mult=0)],
                          bias_filler=dict(type="constant", value=0.5),
                          include=dict(phase=caffe.TEST), name="ip")
    n.py = L.Python(n.fc, module="m", layer="K", param_str="{}", loss_weight=1)
    layers = n.to_proto().layer
    assert layers[1].name == "ip" and [p.lr_mult for p in layers[1].param] == [1, 2]
    assert layers[1].include[0].phase == caffe.TEST
    assert layers[1].inner_product_param.bias_filler.value == 0.5
    assert (layers[2].python_param.module, layers[2].python_param.layer) == ("m", "K")
    assert list(layers[2].loss_weight) == [1.0] and layers[0].input_param.shape[0].dim == [2, 3]


# -- caffe.io, Classifier, Detector ----------------------------------------------------------
DEPLOY = '''
name: "tiny_classifier"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.05 }
                              bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
'''


@pytest.fixture
def deploy(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    caffe.set_random_seed(11)
    net = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST)
    net.save(str(tmp_path / "deploy.caffemodel"))
    return (tmp_path / "deploy.prototxt", tmp_path / "deploy.caffemodel",
            net.params["fc"][0].data.astype(np.float64), net.params["fc"][1].data)


MEAN_BGR = np.array([104.0, 117.0, 123.0])


def by_hand(crop_rgb: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """pycaffe's preprocessing and the deploy net, in numpy: HWC RGB [0,1] -> class probs."""
    x = crop_rgb.transpose(2, 0, 1)[::-1] * 255.0 - MEAN_BGR[:, None, None]
    logits = w @ x.ravel() + b
    e = np.exp(logits - logits.max())
    return e / e.sum()


def test_transformer_matches_pycaffe_order():
    t = caffe.io.Transformer({"data": (1, 3, 4, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    t.set_mean("data", MEAN_BGR)
    t.set_input_scale("data", 0.5)
    image = np.random.RandomState(0).rand(4, 5, 3).astype(np.float32)
    original = image.copy()
    out = t.preprocess("data", image)
    expected = (image.transpose(2, 0, 1)[::-1] * 255 - MEAN_BGR[:, None, None]) * 0.5
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    np.testing.assert_array_equal(image, original)
    np.testing.assert_allclose(t.deprocess("data", out), image, atol=1e-5)
    resized = t.preprocess("data", cv2.resize(image, (10, 8)))   # resized back to 4x5
    assert resized.shape == (3, 4, 5)
    with pytest.raises(ValueError, match="not one of the net inputs"):
        t.preprocess("label", image)
    with pytest.raises(ValueError, match="Channel swap"):
        t.set_channel_swap("data", (1, 0))
    t.set_mean("data", np.ones((3, 8, 10)) * MEAN_BGR[:, None, None])   # resized to 4x5
    np.testing.assert_allclose(t.mean["data"], np.ones((3, 4, 5)) * MEAN_BGR[:, None, None],
                               rtol=1e-6)


def test_load_image(tmp_path: Path):
    rng = np.random.RandomState(2)
    bgr = rng.randint(0, 256, size=(7, 9, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    image = caffe.io.load_image(str(tmp_path / "c.png"))
    assert image.dtype == np.float32 and image.shape == (7, 9, 3)
    np.testing.assert_allclose(image, bgr[:, :, ::-1] / 255.0, rtol=1e-6)
    gray = rng.randint(0, 65536, size=(4, 6)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    assert caffe.io.load_image(str(tmp_path / "g.png")).shape == (4, 6, 3)
    one = caffe.io.load_image(str(tmp_path / "g.png"), color=False)
    np.testing.assert_allclose(one[:, :, 0], gray / 65535.0, rtol=1e-6)
    with pytest.raises(FileNotFoundError):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def test_classifier_predict_by_hand(deploy):
    model, weights, w, b = deploy
    clf = caffe.Classifier(str(model), str(weights), image_dims=(8, 8), mean=MEAN_BGR,
                           raw_scale=255, channel_swap=(2, 1, 0))
    rng = np.random.RandomState(4)
    images = [rng.rand(10, 12, 3).astype(np.float32) for _ in range(3)]
    resized = [cv2.resize(im, (8, 8), interpolation=cv2.INTER_LINEAR) for im in images]

    center = clf.predict(images, oversample=False)
    assert center.shape == (3, 4)
    for im, pred in zip(resized, center):
        np.testing.assert_allclose(pred, by_hand(im[1:7, 1:7], w, b), rtol=1e-4)

    averaged = clf.predict(images)      # 4 corners, centre, and their mirrors
    for im, pred in zip(resized, averaged):
        crops = [im[y:y + 6, x:x + 6] for y, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
        crops += [c[:, ::-1] for c in crops]
        np.testing.assert_allclose(pred, np.mean([by_hand(c, w, b) for c in crops], 0),
                                   rtol=1e-4)


def test_detector_windows_by_hand(deploy, tmp_path: Path):
    model, weights, w, b = deploy
    rng = np.random.RandomState(5)
    bgr = rng.randint(0, 256, size=(20, 24, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), bgr)
    rgb = bgr[:, :, ::-1] / 255.0
    windows = np.array([[0, 0, 6, 6], [2, 3, 14, 21]])
    det = caffe.Detector(str(model), str(weights), mean=MEAN_BGR, raw_scale=255,
                         channel_swap=(2, 1, 0))
    found = det.detect_windows([(str(tmp_path / "im.png"), windows)])
    assert [d["filename"] for d in found] == [str(tmp_path / "im.png")] * 2
    for d, (y1, x1, y2, x2) in zip(found, windows):
        crop = cv2.resize(rgb[y1:y2, x1:x2].astype(np.float32), (6, 6))
        np.testing.assert_allclose(d["prediction"], by_hand(crop, w, b), rtol=1e-4, atol=1e-6)

    padded = caffe.Detector(str(model), str(weights), mean=MEAN_BGR, raw_scale=255,
                            channel_swap=(2, 1, 0), context_pad=1)
    crop = padded.crop(rgb.astype(np.float32), np.array([0, 0, 10, 10]))
    assert crop.shape == (6, 6, 3)
    np.testing.assert_allclose(crop[0, 0], MEAN_BGR[::-1] / 255, rtol=1e-6)   # mean padding


# -- scripts that say "import caffe" ---------------------------------------------------------
SCRIPT = '''
import sys
import caffe
from caffe import layers as L, params as P
from caffe.proto import caffe_pb2
import caffe.io

n = caffe.NetSpec()
n.data = L.Input(shape=dict(dim=[2, 3]))
n.ip = L.InnerProduct(n.data, num_output=4, weight_filler=dict(type="constant", value=1))
proto = n.to_proto()
with open(sys.argv[1], "w") as f:
    f.write(str(proto))
net = caffe.Net(sys.argv[1], caffe.TEST)
net.blobs["data"].data[...] = 1
print("OUT", net.forward()["ip"].tolist(), sys.argv[2:], isinstance(proto, caffe_pb2.NetParameter),
      caffe.io.Transformer.__module__, __name__)
sys.exit(int(sys.argv[-1]))
'''


def test_pyrun_runs_an_unchanged_pycaffe_script(tmp_path: Path):
    script = write(tmp_path / "script.py", SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "caffe2torch.cli", "pyrun", str(script),
         str(tmp_path / "out.prototxt"), "-gpu", "0", "--some-flag=x", "3"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 3, result.stderr
    assert "OUT [[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0]] ['-gpu', '0', '--some-flag=x', " \
           "'3'] True caffe2torch.io __main__" in result.stdout
    missing = subprocess.run([sys.executable, "-m", "caffe2torch.cli", "pyrun", "nope.py"],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert missing.returncode == 1 and "nope.py: no such script" in missing.stderr


# -- caffe.draw ------------------------------------------------------------------------------
def test_draw(tmp_path: Path, monkeypatch):
    net = lenet("mnist/mnist_train_lmdb", 64)
    if importlib.util.find_spec("pydot") is not None:
        source = caffe.draw.draw_net(net, "LR", ext="dot").decode()
        assert "conv1" in source and "(Convolution)" in source and "#FF5050" in source
        target = tmp_path / "lenet.png"
        if shutil.which("dot"):
            caffe.draw.draw_net_to_file(net, str(target), "TB", phase=caffe.TRAIN)
            assert target.read_bytes()[:4] == b"\x89PNG"
        else:
            with pytest.raises(RuntimeError, match="Graphviz"):
                caffe.draw.draw_net_to_file(net, str(target))
    monkeypatch.setitem(sys.modules, "pydot", None)
    with pytest.raises(ImportError, match="'pydot' package"):
        caffe.draw.draw_net(net, "LR")


# -- the object-detection practice -----------------------------------------------------------
@pytest.fixture
def practice() -> None:
    """The practice's folder on sys.path and ``import caffe`` meaning caffe2torch, as for a
    user who runs its scripts with ``caffe2torch pyrun`` (whatever earlier tests did)."""
    sys.path.insert(0, str(PRACTICE))
    caffe.install_caffe_alias()


@pytest.mark.usefixtures("practice")
def test_detection_practice_trains_and_detects(tmp_path: Path, monkeypatch):
    make_dataset = importlib.import_module("make_dataset")
    boxes = importlib.import_module("od_boxes")
    detect = importlib.import_module("detect")
    monkeypatch.chdir(tmp_path)               # param_str paths are read from here, as in Caffe
    make_dataset.make_dataset("voc", count=24, seed=0)
    solver = caffe.SGDSolver(str(PRACTICE / "solver.prototxt"))
    losses = []
    for _ in range(30):
        solver.step(1)
        losses.append(float(solver.net.blobs["loss_bbox"].data[0])
                      + float(solver.net.blobs["loss_obj_score"].data[0]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert solver.net.blobs["gt_bbox"].data.shape == (4, 4, 8, 8)

    model, _ = solver.snapshot()
    net = caffe.Net(str(PRACTICE / "net.prototxt"), caffe.TEST, weights=model)
    image = cv2.imread("voc/JPEGImages/000001.jpg")
    dets = detect.detect(net, image, threshold=0.0, overlap=0.3)
    assert dets.shape[1] == 5 and len(dets) >= 1
    kept = dets[:, :4]
    for i in range(len(kept)):               # NMS left no pair above the overlap threshold
        assert (boxes.box_iou(kept[i], np.delete(kept, i, 0)) <= 0.3 + 1e-6).all()


class HostBlob:
    """The blob interface the practice's layers use, in float64 for finite differences."""

    def __init__(self, data: np.ndarray):
        self.data = np.array(data, dtype=np.float64)
        self.diff = np.zeros_like(self.data)

    def reshape(self, *shape: int) -> None:
        self.data, self.diff = np.zeros(shape), np.zeros(shape)


@pytest.mark.usefixtures("practice")
def test_unitbox_gradient_matches_finite_differences():
    loss_module = importlib.import_module("od_loss_layer")
    rng = np.random.RandomState(0)
    pred = rng.uniform(0.5, 3, size=(1, 4, 2, 3))
    gt = rng.uniform(0.5, 3, size=(1, 4, 2, 3))
    gt[0, :, 0, 0] = 0                           # one cell outside every box
    score = rng.randn(1, 1, 2, 3)
    target = rng.uniform(0, 1, size=(1, 1, 2, 3))
    layer = loss_module.ODLossLayer()

    def run(p: np.ndarray, s: np.ndarray) -> tuple[float, list[HostBlob], list[HostBlob]]:
        bottoms = [HostBlob(a) for a in (p, gt, s, target)]
        tops = [HostBlob(np.zeros(1)), HostBlob(np.zeros(1))]
        layer.reshape(bottoms, tops)
        layer.forward(bottoms, tops)
        return float(tops[0].data[0] + tops[1].data[0]), bottoms, tops

    _, bottoms, tops = run(pred, score)
    for top in tops:
        top.diff[...] = 1
    layer.backward(tops, [True, False, True, False], bottoms)
    eps = 1e-6
    for index, array in ((0, pred), (2, score)):
        numeric = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            shifted = []
            for step in (eps, -eps):
                moved = array.copy()
                moved[i] += step
                shifted.append(run(moved, score)[0] if index == 0 else run(pred, moved)[0])
            numeric[i] = (shifted[0] - shifted[1]) / (2 * eps)
        np.testing.assert_allclose(bottoms[index].diff, numeric, atol=1e-5)
