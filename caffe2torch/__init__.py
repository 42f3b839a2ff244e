"""caffe2torch: run Caffe nets, weights, solvers and pycaffe scripts on PyTorch.

``import caffe2torch as caffe`` is pycaffe's surface: ``Net``, the solvers, ``Layer`` for
Python layers, ``io``, ``Classifier``/``Detector``, ``net_spec`` (``NetSpec``, ``layers``,
``params``, ``to_proto``), ``draw`` and ``proto.caffe_pb2``. Unchanged scripts that
``import caffe`` run with ``caffe2torch pyrun script.py`` or after
:func:`install_caffe_alias`. :func:`load` gives a plain ``nn.Module``.

``caffe2torch.layers`` is both the package of layer implementations (``register``,
``CaffeLayer``) and net_spec's ``layers`` (``layers.Convolution(...)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from . import draw, io, net_spec, proto
from .caffe_alias import install_caffe_alias
from .classifier import Classifier
from .compiler import CaffeNet
from .detector import Detector
from .errors import CaffeError, FormatError, NetError
from .layers import layer_type_list
from .layers.python_layer import Layer
from .mode import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .net import TEST, TRAIN, Blob, Net, compile_net
from .net_spec import NetSpec, params, to_proto
from .proto import caffe_pb2
from .solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver, RMSPropSolver,
                     SGDSolver, get_solver)

# Caffe computes in full float32: TF32 tensor-core math would miss its numbers by ~1e-3.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

__all__ = ["AdaDeltaSolver", "AdaGradSolver", "AdamSolver", "Blob", "CaffeError", "CaffeNet",
           "Classifier", "Detector", "FormatError", "Layer", "Net", "NesterovSolver", "NetError",
           "NetSpec", "RMSPropSolver", "SGDSolver", "TEST", "TRAIN", "caffe_pb2", "draw",
           "get_solver", "install_caffe_alias", "io", "layer_type_list", "layers", "load",
           "net_spec", "params", "proto", "set_device", "set_mode_cpu", "set_mode_gpu",
           "set_random_seed", "to_proto"]


def load(model: str | Path | caffe_pb2.NetParameter, weights: str | Path | None = None,
         phase: str | int = "test", level: int = 0, stages: Iterable[str] = ()) -> CaffeNet:
    """Compile a prototxt (and optionally load a .caffemodel) into an ``nn.Module``."""
    return compile_net(model, phase, level, stages, weights=weights)
