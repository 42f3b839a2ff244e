"""pycaffe's global mode: CPU or GPU (and which GPU), and the random seed.

Nets built after ``set_mode_gpu()`` live on ``cuda:<device>``; numpy views of their
blobs go through host memory.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_state = {"gpu": False, "device_id": 0}


def set_mode_cpu() -> None:
    """Build and run nets on the CPU (the default)."""
    _state["gpu"] = False


def set_mode_gpu() -> None:
    """Build and run nets on the current CUDA device; a clear error if there is none."""
    if not torch.cuda.is_available():
        raise RuntimeError("set_mode_gpu(): no CUDA device is available to PyTorch "
                           "(install a CUDA build of torch, or stay with set_mode_cpu())")
    _state["gpu"] = True


def set_device(device_id: int) -> None:
    """Choose the CUDA device used in GPU mode."""
    _state["device_id"] = int(device_id)


def device() -> torch.device:
    """The device nets are placed on in the current mode."""
    return torch.device("cuda", _state["device_id"]) if _state["gpu"] else torch.device("cpu")


def set_random_seed(seed: int) -> None:
    """Seed every generator caffe2torch draws from (fillers, dropout, shuffles, crops)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
