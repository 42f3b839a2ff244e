"""Caffe's ``Python`` layer: a pycaffe ``caffe.Layer`` subclass named by ``python_param``.

As in Caffe, ``python_param { module layer param_str }`` names a module (imported from
``sys.path``/``PYTHONPATH``; here also from the prototxt's folder) and a class in it. The
class is constructed with the LayerParameter, given ``param_str`` and ``phase``, and its
``setup(bottom, top)`` runs once, on host blobs of the bottom shapes. ``reshape`` runs before
every ``forward``, and its top shapes are the layer's output shapes.

Forward and backward run the user's code on numpy arrays (GPU tensors go through host
memory) inside a ``torch.autograd.Function``, so Python layers back-propagate and train like
any other layer: ``self.blobs.add_blob(*shape)`` adds a zero-filled parameter of the module
(lr/decay mults from the layer's ``param {}``, solver history, caffemodel I/O). Like Caffe's
``PythonLayer``, it is not a loss layer: give ``loss_weight`` to make its tops a loss.

The module may ``import caffe``: building a Python layer installs caffe2torch as ``caffe``
(:func:`caffe2torch.caffe_alias.install_caffe_alias`) unless a ``caffe`` module is already
imported, because a layer class derived from the real pycaffe ``caffe.Layer`` cannot run here.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Sequence

import torch
from torch import nn

from ..blob import Blob, ParamBlob
from ..errors import CaffeError
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape
from .registry import register


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A C-contiguous float32 host copy, as Caffe's blobs always are, whatever layout the net
    computed ``tensor`` in (channels-last convolutions), for user code that relies on it."""
    return tensor.detach().to("cpu", torch.float32, copy=True,
                              memory_format=torch.contiguous_format)


class BlobVec(Sequence[ParamBlob]):
    """pycaffe's ``Layer.blobs``: the layer's parameter blobs, a list with ``add_blob``."""

    def __init__(self) -> None:
        self.params = nn.ParameterList()
        self._views: list[ParamBlob] = []

    def add_blob(self, *shape: int) -> None:
        """Append a zero-filled parameter blob of this shape (``_caffe.cpp`` BlobVec_add_blob)."""
        self.params.append(nn.Parameter(torch.zeros([int(s) for s in shape])))
        self._views.append(ParamBlob(self.params, len(self.params) - 1))

    def __getitem__(self, index):  # type: ignore[override]
        return self._views[index]

    def __len__(self) -> int:
        return len(self._views)


class Layer:
    """pycaffe's ``caffe.Layer``, the base class of Python layers.

    Subclasses define ``setup(bottom, top)``, ``reshape(bottom, top)``,
    ``forward(bottom, top)`` and ``backward(top, propagate_down, bottom)``; ``bottom`` and
    ``top`` are lists of blobs with numpy ``data``/``diff``. ``self.param_str`` and
    ``self.phase`` are set before ``setup``.
    """

    type = "Python"

    def __init__(self, param: caffe_pb2.LayerParameter | None = None):
        self.blobs = BlobVec()
        self.param_str = param.python_param.param_str if param is not None else ""
        self.phase = caffe_pb2.TRAIN

    def setup(self, bottom: list[Blob], top: list[Blob]) -> None:
        """One-time set-up (read ``param_str``, add blobs); the default does nothing."""

    def reshape(self, bottom: list[Blob], top: list[Blob]) -> None:
        """Shape the tops for these bottoms; the default does nothing."""

    def forward(self, bottom: list[Blob], top: list[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no forward(bottom, top)")

    def backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]) -> None:
        raise NotImplementedError(f"{type(self).__name__} defines no backward(top, "
                                  "propagate_down, bottom), but a gradient must flow through it")


def _import_module(name: str, layer: "PythonLayer"):
    """Import ``name`` as Caffe does (sys.path), else from the prototxt's folder."""
    from ..caffe_alias import install_caffe_alias

    install_caffe_alias(replace=False)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing_itself = exc.name is not None and (name == exc.name
                                                   or name.startswith(exc.name + "."))
        folder = layer.base_dir
        if not missing_itself:
            raise layer.error(f"importing python_param module '{name}' failed: {exc}") from exc
        if folder is None or str(folder) in sys.path:
            where = "" if folder is None else f" or in the prototxt's folder {folder}"
            raise layer.error(f"cannot import python_param module '{name}': {exc} (looked on "
                              f"sys.path/PYTHONPATH{where})") from None
        sys.path.append(str(folder))
        importlib.invalidate_caches()
        return _import_module(name, layer)
    except Exception as exc:
        raise layer.error(f"importing python_param module '{name}' failed: "
                          f"{type(exc).__name__}: {exc}") from exc


class _HostCall(torch.autograd.Function):
    """Autograd node of a Python layer: the user's forward/backward on host arrays."""

    @staticmethod
    def forward(ctx: Any, layer: "PythonLayer", count: int, *tensors: torch.Tensor):
        ctx.layer, ctx.count = layer, count
        ctx.shapes = [t.shape for t in tensors]
        ctx.devices = [t.device for t in tensors]
        return layer.host_forward(tensors[:count])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor):
        needs = ctx.needs_input_grad[2:]
        results = ctx.layer.host_backward(grads, needs[:ctx.count], needs[ctx.count:])
        return (None, None, *(None if g is None else g.to(d).reshape(s)
                              for g, d, s in zip(results, ctx.devices, ctx.shapes)))


@register("Python")
class PythonLayer(CaffeLayer):
    """Runs a user's pycaffe Python layer; see the module docstring."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        python_param = self.param.python_param
        if not python_param.module or not python_param.layer:
            raise self.error("python_param needs both 'module' and 'layer'")
        module = _import_module(python_param.module, self)
        cls = getattr(module, python_param.layer, None)
        if not (isinstance(cls, type) and issubclass(cls, Layer)):
            raise self.error(
                f"python_param layer '{python_param.layer}' of module '{python_param.module}' "
                "is not a subclass of caffe.Layer as caffe2torch provides it" +
                ("" if cls is not None else " (no such name in the module)") +
                "; if it derives from the real pycaffe's caffe.Layer, install caffe2torch's "
                "alias (caffe2torch.install_caffe_alias()) before importing caffe")
        self.python: Layer = self._call(cls, self.param)
        if not isinstance(getattr(self.python, "blobs", None), BlobVec):
            raise self.error(f"{cls.__name__}.__init__ must call caffe.Layer.__init__(self, param)")
        self.python.param_str = python_param.param_str
        self.python.phase = self.phase
        self.blobs = self.python.blobs.params  # the user's blobs are this module's parameters
        self._bottoms = [Blob(shape) for shape in spec.bottom_shapes]
        # An in-place top (same name as the bottom at its index) is the bottom's Blob, as in Caffe.
        bottoms, tops = list(self.param.bottom), list(self.param.top)
        self._tops = [self._bottoms[i] if i < len(bottoms) and bottoms[i] == top else Blob()
                      for i, top in enumerate(tops)]
        self._call(self.python.setup, self._bottoms, self._tops)

    def _call(self, function, *args):
        """Call user code; its exceptions become errors naming this layer (cause kept)."""
        try:
            return function(*args)
        except CaffeError:
            raise
        except Exception as exc:
            name = getattr(function, "__name__", str(function))
            raise self.error(f"its Python {name}() raised {type(exc).__name__}: {exc}") from exc

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        for blob, shape in zip(self._bottoms, bottom_shapes):
            blob.reshape(*shape)
        self._call(self.python.reshape, self._bottoms, self._tops)
        return [top.shape for top in self._tops]

    def forward(self, *bottoms: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = list(self.blobs)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*bottoms, *params)):
            return _HostCall.apply(self, len(bottoms), *bottoms, *params)
        return self.host_forward(bottoms)

    def host_forward(self, bottoms: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Caffe's ``Layer::Forward``: copy the bottoms to host, reshape, forward."""
        for blob, tensor in zip(self._bottoms, bottoms):
            blob._set(_host_copy(tensor))
        self._call(self.python.reshape, self._bottoms, self._tops)
        self._call(self.python.forward, self._bottoms, self._tops)
        where = bottoms[0].device if bottoms else torch.device("cpu")
        return tuple(top._data.to(where, copy=True) for top in self._tops)

    def host_backward(self, grads: Sequence[torch.Tensor], propagate_down: Sequence[bool],
                      param_needs: Sequence[bool]) -> list[torch.Tensor | None]:
        """Caffe's ``Layer::Backward`` on host blobs: top diffs in, bottom and param diffs out.

        Each call shows the user zeroed param diffs and returns what it wrote as the params'
        gradients, which autograd adds to their ``.grad`` (Caffe's accumulation).
        """
        aliased = {id(top) for top in self._tops}
        for blob in self._bottoms:
            if id(blob) not in aliased:
                blob._diff = torch.zeros(blob.shape)
        for blob, grad in zip(self._tops, grads):
            blob._diff = _host_copy(grad).reshape(blob.shape)
        holders = [view.grad_holder for view in self.python.blobs]
        saved = [holder.grad for holder in holders]
        for holder in holders:
            holder.grad = None
        try:
            self._call(self.python.backward, self._tops, list(propagate_down), self._bottoms)
            param_grads = [holder.grad if need else None
                           for holder, need in zip(holders, param_needs)]
        finally:
            for holder, grad in zip(holders, saved):
                holder.grad = grad
        bottom_grads = [blob._diff if down else None
                        for blob, down in zip(self._bottoms, propagate_down)]
        return bottom_grads + param_grads
