"""pycaffe's ``Blob``: named arrays whose ``data`` and ``diff`` are writable numpy views.

Activation blobs own host tensors; parameter blobs are views of a layer's parameters and
their ``.grad``. GPU tensors show as host copies that write through on item assignment.
Shared by the ``Net`` view and by Python layers (their bottoms, tops and ``self.blobs``).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import NetError


class _DeviceArray(np.ndarray):
    """Host copy of a GPU tensor whose item assignment writes through to the tensor."""

    _tensor: torch.Tensor

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        with torch.no_grad():
            self._tensor.copy_(torch.from_numpy(np.asarray(self)).view(self._tensor.shape))


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A writable numpy view (CPU) or write-through host copy (other devices) of ``tensor``."""
    if tensor.device.type == "cpu":
        return tensor.numpy()
    array = tensor.detach().cpu().numpy().view(_DeviceArray)
    array._tensor = tensor
    return array


class Blob:
    """A named activation blob: ``data`` and ``diff`` as numpy arrays that can be written."""

    def __init__(self, shape: Sequence[int] = ()):
        self._data = torch.zeros(tuple(shape))
        self._diff = torch.zeros(tuple(shape))

    @property
    def data(self) -> np.ndarray:
        return self._data.numpy()

    @property
    def diff(self) -> np.ndarray:
        return self._diff.numpy()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(self._data.numel())

    num = property(lambda self: self.shape[0] if self.shape else 1)
    channels = property(lambda self: self.shape[1] if len(self.shape) > 1 else 1)
    height = property(lambda self: self.shape[2] if len(self.shape) > 2 else 1)
    width = property(lambda self: self.shape[3] if len(self.shape) > 3 else 1)

    def reshape(self, *shape: int) -> None:
        """Give the blob a new shape (contents become zeros), as Caffe's Blob::Reshape."""
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(int(s) for s in shape)
        if shape != self.shape:
            self._data = torch.zeros(shape)
            self._diff = torch.zeros(shape)

    def _set(self, value: torch.Tensor) -> None:
        value = value.detach()
        if value.device.type != "cpu" or value.dtype != torch.float32:
            value = value.to("cpu", torch.float32)
        self._data = value
        if self._diff.shape != value.shape:
            self._diff = torch.zeros(value.shape)

    def __repr__(self) -> str:
        return f"Blob(shape={list(self.shape)})"


class ParamBlob(Blob):
    """A parameter blob: its data and diff are the module parameter and its ``.grad``."""

    def __init__(self, owner: nn.ParameterList, index: int):  # noqa: D107 - no storage of its own
        self._owner = owner
        self._index = index

    @property
    def _param(self) -> torch.Tensor:
        return self._owner[self._index]

    @property
    def data(self) -> np.ndarray:
        return _numpy(self._data)

    @property
    def diff(self) -> np.ndarray:
        return _numpy(self._diff)

    @property
    def _data(self) -> torch.Tensor:  # type: ignore[override]
        return self._param.detach()

    @property
    def grad_holder(self) -> nn.Parameter:
        """The parameter whose ``.grad`` is this blob's diff (a PERMISSIVE-shared view's owner)."""
        param = self._param
        if isinstance(param, nn.Parameter):
            return param
        return self._owner.parametrizations[str(self._index)].original

    @property
    def _diff(self) -> torch.Tensor:  # type: ignore[override]
        param = self.grad_holder
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        return param.grad.view(self._param.shape)

    def reshape(self, *shape: int) -> None:
        raise NetError("parameter blobs cannot be reshaped; assign a new net instead")


__all__ = ["Blob", "ParamBlob"]
