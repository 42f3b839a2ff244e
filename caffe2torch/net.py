"""pycaffe's ``Net`` and ``Blob``, as a view over one compiled :class:`CaffeNet`.

Blobs expose writable numpy ``data``/``diff`` arrays; parameter blobs are the
module's own parameters, so ``net.params[name][i].data[...] = w`` is net surgery on
the PyTorch module. Forward and backward run the module with autograd; a blob's
diff is the gradient of the first tensor bound to its name, which is what Caffe's
shared in-place memory holds after backward.
"""
from __future__ import annotations

from collections import OrderedDict
from itertools import zip_longest
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .blob import Blob, ParamBlob
from .compiler import AUTOMATIC_TOP, CaffeNet
from .errors import NetError
from .formats import read_hdf5_weights, read_net
from .graph import build_graph, make_state
from .layers.data import set_input_arrays
from .layers.python_layer import PythonLayer
from .mode import device as mode_device
from .proto import caffe_pb2
from .weights import copy_weights, save_caffemodel, save_hdf5

TRAIN = caffe_pb2.TRAIN
TEST = caffe_pb2.TEST


class LayerView:
    """pycaffe's ``net.layers[i]``: the layer type and its parameter blobs."""

    def __init__(self, module: nn.Module, type_: str, name: str):
        self.module = module
        self.type = type_
        self.name = name
        self.blobs = [ParamBlob(module.blobs, i) for i in range(len(module.blobs))]

    def __repr__(self) -> str:
        return f"Layer({self.name!r}, type={self.type!r})"


def _phase(value) -> int:
    if isinstance(value, str):
        try:
            return {"train": TRAIN, "test": TEST}[value.lower()]
        except KeyError:
            raise NetError(f"phase must be 'train' or 'test' (or caffe.TRAIN/TEST), got {value!r}") \
                from None
    if value not in (TRAIN, TEST):
        raise NetError(f"phase must be caffe.TRAIN (0) or caffe.TEST (1), got {value!r}")
    return int(value)


def compile_net(model: str | Path | caffe_pb2.NetParameter, phase=TEST, level: int = 0,
                stages: Iterable[str] = (), input_shapes=None,
                weights: str | Path | None = None) -> CaffeNet:
    """Read, upgrade, filter and compile a net definition into a :class:`CaffeNet`,
    loading ``weights`` first and drawing fillers only for the blobs they do not cover."""
    net_param, locations = read_net(model)
    state = make_state(_phase(phase), level, stages or (), net_param.state)
    graph = build_graph(net_param, state, locations)
    base_dir = Path(model).parent if isinstance(model, (str, Path)) else None
    net = CaffeNet(graph, base_dir=base_dir, input_shapes=input_shapes, fill=weights is None)
    if weights is not None:
        copied = set(copy_weights(net, weights))
        by_name = {step.name: net.layers[step.key] for step in net.steps}
        net.fill_blobs({id(p) for name in copied for p in by_name[name].blobs})
    return net


class Net:
    """pycaffe's ``caffe.Net``: ``Net(model, phase, weights=..., level=..., stages=...)``
    or the legacy ``Net(model, weights, phase)``."""

    def __init__(self, model: str | Path | caffe_pb2.NetParameter, *args, phase=None,
                 weights: str | Path | None = None, level: int = 0,
                 stages: Sequence[str] | None = None, module: CaffeNet | None = None):
        if len(args) == 2:          # legacy Net(model, weights, phase)
            weights, phase = args
        elif len(args) == 1:
            phase = args[0]
        elif args:
            raise TypeError("Net(model, phase, weights=None, level=0, stages=None) or "
                            "Net(model, weights, phase)")
        if phase is None:
            raise TypeError("Net() needs a phase: caffe.TRAIN or caffe.TEST")
        if module is None:
            module = compile_net(model, phase, level, stages or (), weights=weights)
        elif weights is not None:
            copy_weights(module, weights)
        self.module = module
        self.module.to(mode_device())
        self._build_views()

    # -- structure ----------------------------------------------------------------------
    def _build_views(self) -> None:
        m = self.module
        self.blobs: OrderedDict[str, Blob] = OrderedDict(
            (name, Blob(m.blob_shapes.get(name, ()))) for name in m.blob_names)
        # pycaffe's net.layers[i] of a Python layer is the user's layer object itself
        self.layers = [m.layers[s.key].python if isinstance(m.layers[s.key], PythonLayer)
                       else LayerView(m.layers[s.key], s.type, s.name) for s in m.steps]
        self._layer_names = [s.name for s in m.steps]
        self._blob_names = list(self.blobs)
        self.params: OrderedDict[str, Sequence[ParamBlob]] = OrderedDict(
            (name, view.blobs) for name, view in zip(self._layer_names, self.layers) if view.blobs)
        self.layer_dict = OrderedDict(zip(self._layer_names, self.layers))
        self.inputs = list(m.input_names)
        self.outputs = list(m.output_names)
        self.top_names = OrderedDict((s.name, list(s.tops)) for s in m.steps)
        self.bottom_names = OrderedDict((s.name, list(s.bottoms)) for s in m.steps)
        self.blob_loss_weights = OrderedDict((name, 0.0) for name in m.blob_names)
        for step in m.steps:
            for top, weight in zip(step.tops, step.loss_weights):
                if weight:
                    self.blob_loss_weights[top] = weight
                    self.blobs[top]._diff.fill_(weight)
        self._first: dict[str, torch.Tensor] = {}
        self._final: dict[str, torch.Tensor] = {}
        self._writer: dict[str, int] = {}

    @property
    def phase(self) -> int:
        return self.module.phase

    @property
    def device(self) -> torch.device:
        """Where the module's parameters live (the mode's device when it was built)."""
        for param in self.module.parameters():
            return param.device
        return mode_device()

    def _index(self, name: str | None, default: int) -> int:
        return default if name is None else self.module.layer_index(name)

    def _needs_grad(self) -> bool:
        return self.module.force_backward or any(
            w for s in self.module.steps for w in s.loss_weights)

    # -- forward / backward -------------------------------------------------------------
    def forward(self, blobs: Sequence[str] | None = None, start: str | None = None,
                end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Run layers ``start..end``; returns the output blobs (and ``blobs``) as arrays."""
        if kwargs:
            if set(kwargs) != set(self.inputs):
                raise NetError(f"input blob arguments {sorted(kwargs)} do not match the net's "
                               f"inputs {self.inputs}")
            for name, value in kwargs.items():
                value = np.asarray(value)
                if value.shape[:1] != self.blobs[name].shape[:1]:
                    raise NetError(f"input '{name}' is not batch sized: got shape "
                                   f"{list(value.shape)}, the blob is {list(self.blobs[name].shape)}")
                self.blobs[name].data[...] = value
        first = self._index(start, 0)
        last = self._index(end, len(self.module.steps) - 1)
        grad = self._needs_grad() and torch.is_grad_enabled()
        feed: dict[str, torch.Tensor] = {}
        names = self.inputs if first == 0 else list(self.blobs)
        where = self.device
        for name in names:
            tensor = self.blobs[name]._data.to(where)
            if grad and self.module.force_backward:
                tensor = tensor.detach().requires_grad_(True)
            feed[name] = tensor
        if first == 0:
            self._first, self._final, self._writer = {}, {}, {}
        for name, tensor in feed.items():
            self._first.setdefault(name, tensor)
            self._final[name] = tensor

        def observe(step, outs):
            for top, value in zip(step.tops, outs):
                if top not in self._first:
                    self._first[top] = value
                    if value.requires_grad and value.grad_fn is not None:
                        value.retain_grad()
                self._final[top] = value
                self.blobs[top]._set(value)

        with torch.set_grad_enabled(grad):
            self.module.run(feed, start=first, end=last, observer=observe)
        wanted = set(self.outputs if end is None else self.top_names[self._layer_names[last]])
        wanted.update(blobs or ())
        return {name: self.blobs[name].data for name in wanted}

    def backward(self, diffs: Sequence[str] | None = None, start: str | None = None,
                 end: str | None = None, **kwargs) -> dict[str, np.ndarray]:
        """Back-propagate the output blobs' diffs (loss weights for losses) through the net."""
        for name, value in kwargs.items():
            if name not in self.outputs:
                raise NetError(f"'{name}' is not an output blob; outputs are {self.outputs}")
            self.blobs[name].diff[...] = value
        last = self._index(start, len(self.module.steps) - 1)
        read_later = {b for s in self.module.steps[:last + 1] for b in s.bottoms}
        tensors, grads = [], []
        for name, tensor in self._final.items():
            if name in read_later and name not in self.outputs:
                continue
            if tensor.requires_grad:
                tensors.append(tensor)
                grads.append(self.blobs[name]._diff.to(tensor.device).reshape(tensor.shape))
        for tensor in self._first.values():
            if tensor.requires_grad:
                tensor.grad = None
        if tensors:
            torch.autograd.backward(tensors, grads, retain_graph=True)
        for name, tensor in self._first.items():
            if tensor.grad is not None:
                self.blobs[name]._diff = tensor.grad.detach().to("cpu").clone()
        wanted = set(self.inputs) | set(diffs or ())
        return {name: self.blobs[name].diff for name in wanted if name in self.blobs}

    def reshape(self) -> None:
        """Recompute every blob's shape from the current input blob shapes."""
        shapes = {name: self.blobs[name].shape for name in self.inputs}
        for step in self.module.steps:
            layer = self.module.layers[step.key]
            if step.is_input:
                tops = [shapes.get(t, self.blobs[t].shape) for t in step.tops]
            else:
                tops = layer.infer_shapes([shapes[b] for b in step.bottoms])
            for name, shape in zip(step.tops, tops):
                shapes[name] = tuple(shape)
                if name in self.blobs and not step.is_input:
                    self.blobs[name].reshape(*shape)

    def forward_all(self, blobs: Sequence[str] | None = None, **kwargs: np.ndarray
                    ) -> dict[str, np.ndarray]:
        """Forward any number of inputs in batch-sized chunks (the last one zero-padded);
        returns the outputs (and ``blobs``) for exactly the given items."""
        outs: dict[str, list[np.ndarray]] = {name: [] for name in {*self.outputs, *(blobs or ())}}
        for batch in self._batch(kwargs):
            for name, value in self.forward(blobs=blobs, **batch).items():
                outs[name].extend(value.copy())
        return self._unpad(outs, kwargs)

    def forward_backward_all(self, blobs: Sequence[str] | None = None,
                             diffs: Sequence[str] | None = None, **kwargs: np.ndarray
                             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Forward inputs and backward output diffs (both by keyword) batch by batch; returns
        the outputs and the input diffs (and ``blobs``/``diffs``) for the given items."""
        outs: dict[str, list[np.ndarray]] = {name: [] for name in {*self.outputs, *(blobs or ())}}
        grads: dict[str, list[np.ndarray]] = {name: [] for name in {*self.inputs, *(diffs or ())}}
        forward = self._batch({k: v for k, v in kwargs.items() if k in self.inputs})
        backward = self._batch({k: v for k, v in kwargs.items() if k in self.outputs})
        for fb, bb in zip_longest(forward, backward, fillvalue={}):
            for name, value in self.forward(blobs=blobs, **fb).items():
                outs[name].extend(value.copy())
            for name, value in self.backward(diffs=diffs, **bb).items():
                grads[name].extend(value.copy())
        return self._unpad(outs, kwargs), self._unpad(grads, kwargs)

    def _batch(self, arrays: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """pycaffe's ``Net._batch``: batch-sized slices, the last padded with zeros. No arrays
        (a net fed by data layers): one pass."""
        if not arrays:
            yield {}
            return
        num = len(next(iter(arrays.values())))
        size = next(iter(self.blobs.values())).shape[0]
        for start in range(0, num, size):
            batch = {}
            for name, array in arrays.items():
                chunk = np.asarray(array[start:start + size])
                if len(chunk) < size:
                    pad = np.zeros((size - len(chunk),) + chunk.shape[1:], dtype=chunk.dtype)
                    chunk = np.concatenate([chunk, pad])
                batch[name] = chunk
            yield batch

    @staticmethod
    def _unpad(collected: dict[str, list[np.ndarray]], given: Mapping[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
        """Stack collected items and drop the padding of the last batch."""
        num = len(next(iter(given.values()))) if given else None
        return {name: np.asarray(items[:num]) for name, items in collected.items()}

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Serve these arrays from the net's first layer, a MemoryData (pycaffe's method)."""
        set_input_arrays(self.module, data, labels)

    # -- weights ------------------------------------------------------------------------
    def copy_from(self, path: str | Path) -> None:
        """Load weights by layer name (unknown layers are ignored): a binary .caffemodel, or
        HDF5 for ``*.h5`` (Caffe's ``CopyTrainedLayersFrom``)."""
        copy_weights(self.module, read_hdf5_weights(path) if str(path).endswith(".h5") else path)

    def load_hdf5(self, path: str | Path) -> None:
        """Load ``.caffemodel.h5`` weights by layer name."""
        copy_weights(self.module, read_hdf5_weights(path))

    def share_with(self, other: "Net") -> None:
        """Use ``other``'s parameter tensors for layers of the same name (Caffe's ShareTrainedLayersWith)."""
        theirs = {s.name: other.module.layers[s.key] for s in other.module.steps}
        for step in self.module.steps:
            source = theirs.get(step.name)
            mine = self.module.layers[step.key]
            if source is None or not len(mine.blobs):
                continue
            if len(source.blobs) != len(mine.blobs):
                raise NetError(f"cannot share layer '{step.name}': {len(source.blobs)} blobs vs "
                               f"{len(mine.blobs)}", layer=step.name, layer_type=step.type)
            for i, param in enumerate(source.blobs):
                if param.shape != mine.blobs[i].shape:
                    raise NetError(f"cannot share blob {i} of layer '{step.name}': shape "
                                   f"{list(param.shape)} vs {list(mine.blobs[i].shape)}",
                                   layer=step.name, layer_type=step.type)
                mine.blobs[i] = param
        self._build_views()

    def save(self, path: str | Path) -> None:
        """Write the weights as a binary .caffemodel (atomically)."""
        save_caffemodel(self.module, path)

    def save_hdf5(self, path: str | Path) -> None:
        """Write the weights as ``.caffemodel.h5`` (Caffe's ``Net::ToHDF5``)."""
        save_hdf5(self.module, path)

    def __repr__(self) -> str:
        return f"<caffe2torch.Net {self.module.name!r}: {len(self.layers)} layers>"


__all__ = ["Blob", "Net", "TRAIN", "TEST", "compile_net", "AUTOMATIC_TOP"]
