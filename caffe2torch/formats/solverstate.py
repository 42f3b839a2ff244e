"""Solver snapshots (``.solverstate``): Caffe's SolverState message, or its HDF5 form.

Caffe writes one history blob per learnable parameter (owners only, in ``learnable_params``
order; AdaDelta and Adam append a second set) with ``Blob::ToProto``: shape plus packed
float data. The binary form is read with the caffemodel wire scanner; HDF5 files
(``.solverstate.h5``, recognised by their signature) go through :mod:`.hdf5`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FormatError
from ..proto import caffe_pb2
from .caffemodel import (HDF5_SIGNATURE, blob_chunks, decoding, map_file, message_fields,
                         message_with_blobs, parse_blob, signed, split_message, write_chunks)

_WHAT = "a binary .solverstate (SolverState)"


@dataclass
class SolverStateRecord:
    """What a snapshot holds: the iteration, the .caffemodel written with it, the update
    rule's history arrays (float32, in the stored shape) and the multistep position."""

    iter: int
    learned_net: str
    history: list[np.ndarray] = field(default_factory=list)
    current_step: int = 0


def read_solverstate(path: str | Path) -> SolverStateRecord:
    """A binary or HDF5 solver snapshot."""
    buf = map_file(path, _WHAT)
    if bytes(buf[:8]) == HDF5_SIGNATURE:
        from .hdf5 import read_hdf5_solverstate
        return read_hdf5_solverstate(path)
    state = SolverStateRecord(0, "")
    with decoding(buf, path, _WHAT):
        for number, _, value, stop in message_fields(buf, caffe_pb2.SolverState.DESCRIPTOR):
            if number == 1:
                state.iter = signed(value)
            elif number == 2:
                state.learned_net = bytes(buf[value:stop]).decode("utf-8", "replace")
            elif number == 3:
                record = parse_blob(buf, value, stop)
                needed = int(np.prod(record.shape, dtype=np.int64))
                if record.data.size != needed:
                    raise FormatError(path, f"history blob {len(state.history)}: shape "
                                            f"{list(record.shape)} needs {needed} values but "
                                            f"the file holds {record.data.size}")
                state.history.append(record.data.reshape(record.shape))
            elif number == 4:
                state.current_step = signed(value)
    return state


def write_solverstate(path: str | Path, state: SolverStateRecord) -> None:
    """Write ``state`` atomically: HDF5 when ``path`` ends in ``.h5`` (Caffe's rule for
    restoring), else the binary SolverState exactly as Caffe serialises it."""
    if str(path).endswith(".h5"):
        from .hdf5 import write_hdf5_solverstate
        write_hdf5_solverstate(path, state)
        return
    header = caffe_pb2.SolverState(iter=state.iter, learned_net=state.learned_net,
                                   current_step=state.current_step)
    head, tail = split_message(header, 3)
    write_chunks(path, message_with_blobs(head, [blob_chunks(h) for h in state.history],
                                          tail, 3))
