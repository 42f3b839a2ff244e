"""caffe2torch: run Caffe nets, weights, solvers and pycaffe scripts on PyTorch.

``import caffe2torch as caffe`` gives the pycaffe surface; :func:`load` gives a plain
``nn.Module``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .compiler import CaffeNet
from .errors import CaffeError, FormatError, NetError
from .layers import layer_type_list
from .mode import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from .net import TEST, TRAIN, Blob, Net, compile_net
from .proto import caffe_pb2
from .weights import copy_weights

# Caffe computes in full float32: TF32 tensor-core math would miss its numbers by ~1e-3.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

__all__ = ["CaffeNet", "CaffeError", "FormatError", "NetError", "Net", "Blob", "TRAIN", "TEST",
           "caffe_pb2", "layer_type_list", "load", "set_device", "set_mode_cpu", "set_mode_gpu",
           "set_random_seed"]


def load(model: str | Path | caffe_pb2.NetParameter, weights: str | Path | None = None,
         phase: str | int = "test", level: int = 0, stages: Iterable[str] = ()) -> CaffeNet:
    """Compile a prototxt (and optionally load a .caffemodel) into an ``nn.Module``."""
    module = compile_net(model, phase, level, stages)
    if weights is not None:
        copy_weights(module, weights)
    return module
