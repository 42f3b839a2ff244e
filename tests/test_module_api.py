"""The PyTorch face: a compiled net is an ordinary nn.Module (devices, state_dict,
autograd, torch.jit.trace, torch.compile, ONNX export)."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime
import pytest
import torch

import caffe2torch
from conftest import shared_dir

# torch's own modules call the deprecated torch.jit.script_method while torch.compile and the
# ONNX exporter load; nothing in caffe2torch does.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def lenet() -> caffe2torch.CaffeNet:
    case = shared_dir() / "golden" / "nets" / "lenet"
    return caffe2torch.load(case / "net.prototxt", case / "weights.caffemodel").eval()


def _input(model: caffe2torch.CaffeNet) -> torch.Tensor:
    torch.manual_seed(3)
    return torch.randn(model.blob_shapes[model.input_names[0]])


def test_state_dict_round_trip_and_autograd(lenet):
    x = _input(lenet)
    clone = caffe2torch.load(shared_dir() / "golden" / "nets" / "lenet" / "net.prototxt")
    clone.load_state_dict(lenet.state_dict())
    torch.testing.assert_close(clone(x), lenet(x))
    x.requires_grad_(True)
    lenet(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_jit_trace_matches_eager(lenet):
    x = _input(lenet)
    traced = torch.jit.trace(lenet, (x,), strict=False)
    torch.testing.assert_close(traced(x), lenet(x))


def test_torch_compile_matches_eager(lenet):
    x = _input(lenet)
    compiled = torch.compile(lenet)
    torch.testing.assert_close(compiled(x), lenet(x), rtol=1e-5, atol=1e-6)


def test_torch_compile_training_step_matches_eager(tmp_path, monkeypatch):
    """Gradients through torch.compile equal eager ones, including convolutions whose weight
    gradient is the patch GEMM (few output pixels per filter, as in a net's last layers)."""
    from caffe2torch.layers import conv

    gemm, calls = conv._patch_gemm, []
    monkeypatch.setattr(conv, "_patch_gemm", lambda *args: calls.append(1) or gemm(*args))
    path = tmp_path / "net.prototxt"
    path.write_text(
        'layer { name: "data" type: "Input" top: "data" '
        'input_param { shape { dim: 2 dim: 8 dim: 4 dim: 4 } } }\n'
        'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { '
        'num_output: 64 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.1 } } }\n'
        'layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }\n'
        'layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2" convolution_param { '
        'num_output: 40 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }\n')
    model = caffe2torch.load(path)
    model.use_channels_last(True)  # the CPU default, unless CAFFE2TORCH_CHANNELS_LAST=0
    x = _input(model)

    def step(module: torch.nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = module(x)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in model.parameters()]

    for got, expected in zip(step(torch.compile(model)), step(model)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == 4  # both convolutions, compiled and eager


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_onnx_export_runs_in_onnxruntime(lenet):
    x = _input(lenet)
    buffer = io.BytesIO()
    torch.onnx.export(lenet, (x,), buffer, dynamo=False, input_names=lenet.input_names,
                      output_names=lenet.output_names)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    (ours,) = session.run(None, {lenet.input_names[0]: x.numpy()})
    np.testing.assert_allclose(ours, lenet(x).detach().numpy(), rtol=1e-5, atol=1e-6)
