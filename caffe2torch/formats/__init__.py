"""Every Caffe file format in and out: prototxt, caffemodel, binaryproto, solverstate, HDF5."""
from __future__ import annotations

from pathlib import Path

from ..errors import Location
from ..proto import caffe_pb2
from .binaryproto import (array_to_blobproto, blobproto_to_array, read_blobproto,
                          read_blobproto_vector, write_blobproto)
from .caffemodel import BlobRecord, LayerRecord, read_caffemodel, write_caffemodel
from .hdf5 import read_hdf5_weights, write_hdf5_weights
from .solverstate import SolverStateRecord, read_solverstate, write_solverstate
from .text import layer_lines, parse_text, read_message, read_text, to_text
from .upgrade import upgrade_net, upgrade_solver

__all__ = ["BlobRecord", "LayerRecord", "read_caffemodel", "write_caffemodel", "layer_lines",
           "parse_text", "read_message", "read_text", "to_text", "upgrade_net", "upgrade_solver",
           "read_net", "read_solver", "read_blobproto", "read_blobproto_vector",
           "write_blobproto", "blobproto_to_array", "array_to_blobproto", "read_hdf5_weights",
           "write_hdf5_weights", "SolverStateRecord", "read_solverstate", "write_solverstate"]


def read_net(source: str | Path | caffe_pb2.NetParameter
             ) -> tuple[caffe_pb2.NetParameter, list[Location | None]]:
    """A net from a prototxt path (or a message), upgraded, with each layer's prototxt line."""
    if isinstance(source, caffe_pb2.NetParameter):
        net = caffe_pb2.NetParameter()
        net.CopyFrom(source)
        upgrade_net(net)
        return net, [None] * len(net.layer)
    text = read_text(source)
    net = parse_text(text, caffe_pb2.NetParameter(), source)
    lines = layer_lines(text)
    if net.layers:   # V0 'padding' layers vanish into the conv/pool they feed
        lines = [line for line, old in zip(lines, net.layers) if old.layer.type != "padding"]
    upgrade_net(net, source)
    # Upgrading may prepend an Input layer for legacy input fields: it has no line.
    pad = max(len(net.layer) - len(lines), 0)
    locations: list[Location | None] = [None] * pad
    locations += [Location(str(source), line) for line in lines[:len(net.layer) - pad]]
    return net, locations


def read_solver(source: str | Path) -> caffe_pb2.SolverParameter:
    """A solver prototxt, upgraded from old forms."""
    return upgrade_solver(read_message(source, caffe_pb2.SolverParameter()), source)
