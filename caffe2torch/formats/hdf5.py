"""Caffe's HDF5 weights (``.caffemodel.h5``) and solver snapshots (``.solverstate.h5``).

Weights (``Net::ToHDF5`` / ``CopyTrainedLayersFromHDF5``): group ``data`` holds one group per
layer, named after it, with one float dataset per parameter blob named ``0``, ``1``, ...
in the blob's shape; a parameter shared from another layer (not its owner) is not stored.
``diff``, when written, mirrors ``data`` with the gradients of every blob.

A layer name with '/' is a path to HDF5: Caffe's ``H5Gcreate2`` makes a real sub-group
when the parent group exists (a layer ``conv1`` then ``conv1/bn``) and fails otherwise,
and its reader lists only the top level of ``data``. We always write nested groups
(creating parents as needed) and read layers at any depth, so such nets round-trip.

Snapshots (``SGDSolver::SnapshotSolverStateToHDF5``): scalar int datasets ``iter`` and
``current_step``, the string ``learned_net`` and group ``history`` with datasets ``0``...
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ..errors import FormatError
from ..proto import caffe_pb2
from .atomic import atomic_open
from .caffemodel import BlobRecord, LayerRecord
from .solverstate import SolverStateRecord


@contextmanager
def _open(path: str | Path, what: str) -> Iterator[h5py.File]:
    """Open an HDF5 file for reading; a missing, foreign or broken file is a FormatError."""
    if not Path(path).is_file():
        raise FormatError(path, f"no such file, expected {what}")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise FormatError(path, f"is not a readable HDF5 file ({exc}), expected {what}") from None
    with handle:
        try:
            yield handle
        except FormatError:
            raise
        except (KeyError, OSError, TypeError, ValueError) as exc:
            raise FormatError(path, f"is not {what}: {exc}") from None


def _blobs(group: h5py.Group, diffs: h5py.Group | None) -> list[BlobRecord | None]:
    """The numbered datasets of a layer group; None where Caffe skipped a shared blob."""
    indices = sorted(int(k) for k, v in group.items() if isinstance(v, h5py.Dataset))
    blobs: list[BlobRecord | None] = [None] * (indices[-1] + 1 if indices else 0)
    for i in indices:
        data = np.asarray(group[str(i)][()], dtype=np.float32)
        diff = None
        if diffs is not None and str(i) in diffs:
            diff = np.asarray(diffs[str(i)][()], dtype=np.float32).reshape(-1)
        blobs[i] = BlobRecord(data.reshape(-1), data.shape, False, diff)
    return blobs


def read_hdf5_weights(path: str | Path) -> list[LayerRecord]:
    """Layers and blobs of Caffe HDF5 weights (layer type is not stored: '').

    A blob list holds None where the file skips a shared parameter, as Caffe allows.
    """
    what = "Caffe HDF5 weights (a 'data' group of layer groups)"
    records: list[LayerRecord] = []
    with _open(path, what) as handle:
        data, diff = handle["data"], handle.get("diff")

        def visit(group: h5py.Group, prefix: str) -> None:
            for name, item in group.items():
                if not isinstance(item, h5py.Group):
                    continue
                layer = prefix + name
                children = list(item.values())
                if not children or any(isinstance(c, h5py.Dataset) for c in children):
                    diffs = diff.get(layer) if diff is not None else None
                    records.append(LayerRecord(layer, "", _blobs(item, diffs)))
                visit(item, layer + "/")

        visit(data, "")
    return records


def write_hdf5_weights(path: str | Path, net: caffe_pb2.NetParameter,
                       blobs: Sequence[Sequence[np.ndarray | None]],
                       diffs: Sequence[Sequence[np.ndarray]] | None = None) -> None:
    """Write layer i of ``net`` with ``blobs[i]`` (None: a shared blob Caffe does not store)
    and, if given, ``diffs[i]``, in ``Net::ToHDF5``'s layout, atomically."""
    with atomic_open(path, "w+b") as raw, h5py.File(raw, "w") as handle:
        groups = [("data", blobs)] + ([("diff", diffs)] if diffs is not None else [])
        for top, arrays in groups:
            root = handle.create_group(top)
            for i, layer in enumerate(net.layer):
                group = root.require_group(layer.name)
                for j, array in enumerate(arrays[i] if i < len(arrays) else ()):
                    if array is not None:
                        group.create_dataset(str(j), data=np.asarray(array, dtype=np.float32))


def read_hdf5_solverstate(path: str | Path) -> SolverStateRecord:
    """An HDF5 solver snapshot (``learned_net`` is optional, as in Caffe's restore)."""
    with _open(path, "a Caffe HDF5 solverstate (iter, current_step, history)") as handle:
        learned = handle["learned_net"][()] if "learned_net" in handle else b""
        history = handle["history"]
        return SolverStateRecord(
            iter=int(handle["iter"][()]),
            learned_net=learned.decode("utf-8", "replace"),
            history=[np.asarray(history[str(i)][()], dtype=np.float32)
                     for i in range(len(history))],
            current_step=int(handle["current_step"][()]))


def write_hdf5_solverstate(path: str | Path, state: SolverStateRecord) -> None:
    """Write ``state`` as Caffe does, atomically: ``learned_net`` as a null-terminated
    fixed-length string (``H5LTmake_dataset_string``), the ints as scalar int32."""
    with atomic_open(path, "w+b") as raw, h5py.File(raw, "w") as handle:
        handle.create_dataset("iter", data=np.int32(state.iter))
        name = state.learned_net.encode("utf-8")
        string_type = h5py.h5t.C_S1.copy()
        string_type.set_size(len(name) + 1)
        string_type.set_strpad(h5py.h5t.STR_NULLTERM)
        scalar = h5py.h5s.create(h5py.h5s.SCALAR)
        dataset = h5py.h5d.create(handle.id, b"learned_net", string_type, scalar)
        dataset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(name + b"\0", dtype=f"S{len(name) + 1}"))
        handle.create_dataset("current_step", data=np.int32(state.current_step))
        history = handle.create_group("history")
        for i, array in enumerate(state.history):
            history.create_dataset(str(i), data=np.asarray(array, dtype=np.float32))
