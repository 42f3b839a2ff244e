"""Moving weights between a compiled net and Caffe's files.

``copy_weights`` is Caffe's ``Net::CopyTrainedLayersFrom``: match layers by name,
ignore unknown ones, require the same blob count and shape (legacy 4-D shapes
compare right-aligned). ``net_to_proto``/``save_caffemodel`` are ``Net::ToProto`` and
``save_hdf5`` is ``Net::ToHDF5``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .compiler import CaffeNet
from .errors import NetError
from .formats import LayerRecord, read_caffemodel, write_caffemodel, write_hdf5_weights
from .formats.caffemodel import BlobRecord
from .proto import caffe_pb2


def shape_matches(record: BlobRecord, shape: tuple[int, ...]) -> bool:
    """Caffe's ``Blob::ShapeEquals``: legacy dims are matched against the shape right-aligned."""
    if record.legacy:
        if len(shape) > 4:
            return False
        padded = (1,) * (4 - len(shape)) + tuple(shape)
        return padded == tuple(record.shape)
    return tuple(record.shape) == tuple(shape)


def copy_weights(net: CaffeNet, source: str | Path | Iterable[LayerRecord]) -> list[str]:
    """Copy blobs from a .caffemodel (or records) into ``net`` by layer name; returns names copied."""
    records = read_caffemodel(source) if isinstance(source, (str, Path)) else list(source)
    where = str(source) if isinstance(source, (str, Path)) else "weights"
    targets = {step.name: net.layers[step.key] for step in net.steps}
    owners = {(lp.layer, lp.index) for lp in net.learnable}
    copied = []
    for record in records:
        layer = targets.get(record.name)
        if layer is None:
            continue
        # HDF5 weights (Net::ToHDF5) store a shared param under its owner layer only
        blobs = list(record.blobs) + [None] * (len(layer.blobs) - len(record.blobs))
        if len(blobs) != len(layer.blobs) or \
                any(b is None and (record.name, i) in owners for i, b in enumerate(blobs)):
            stored = sum(b is not None for b in record.blobs)
            raise NetError(f"{where}: incompatible number of blobs for layer '{record.name}': "
                           f"file has {stored}, the net expects {len(layer.blobs)}",
                           layer=record.name, layer_type=layer.param.type, location=layer.location)
        for i, (blob, param) in enumerate(zip(blobs, layer.blobs)):
            if blob is None:
                continue
            shape = tuple(param.shape)
            if not shape_matches(blob, shape) or blob.data.size != param.numel():
                raise NetError(
                    f"{where}: cannot copy param {i} weights from layer '{record.name}'; shape "
                    f"mismatch. Source param shape is {list(blob.shape)} ({blob.data.size}); "
                    f"target param shape is {list(shape)} ({param.numel()}). To learn this "
                    "layer's parameters from scratch rather than copying from a saved net, "
                    "rename the layer.", layer=record.name, layer_type=layer.param.type,
                    location=layer.location)
            with torch.no_grad():
                param.copy_(torch.from_numpy(np.asarray(blob.data).reshape(shape)))
        copied.append(record.name)
    return copied


def net_to_proto(net: CaffeNet, *, write_diff: bool = False
                 ) -> tuple[caffe_pb2.NetParameter, list[list[np.ndarray]]]:
    """The net's layers (as Caffe's ToProto lists them) and each layer's blobs as arrays."""
    proto = caffe_pb2.NetParameter(name=net.name)
    blobs: list[list[np.ndarray]] = []
    for step in net.steps:
        layer = net.layers[step.key]
        lp = proto.layer.add()
        lp.CopyFrom(layer.param)
        del lp.blobs[:]
        blobs.append([p.detach().cpu().numpy() for p in layer.blobs])
    return proto, blobs


def param_diffs(net: CaffeNet) -> list[list[np.ndarray]]:
    """Each layer's parameter gradients (zeros where none was computed), in net order."""
    def diff(p: torch.Tensor) -> np.ndarray:
        return (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().numpy()
    return [[diff(p) for p in net.layers[step.key].blobs] for step in net.steps]


def save_caffemodel(net: CaffeNet, path: str | Path, *, write_diff: bool = False) -> None:
    """Write the net's weights (and gradients) as a .caffemodel that Caffe and OpenCV read."""
    proto, blobs = net_to_proto(net)
    write_caffemodel(path, proto, blobs, param_diffs(net) if write_diff else None)


def save_hdf5(net: CaffeNet, path: str | Path, *, write_diff: bool = False) -> None:
    """Write ``.caffemodel.h5`` weights: a shared param only under its owner, diffs for all."""
    proto, blobs = net_to_proto(net)
    owners = {(lp.layer, lp.index) for lp in net.learnable}
    owned = [[array if (step.name, i) in owners else None for i, array in enumerate(arrays)]
             for step, arrays in zip(net.steps, blobs)]
    write_hdf5_weights(path, proto, owned, param_diffs(net) if write_diff else None)
