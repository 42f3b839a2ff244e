"""The base class every compiled Caffe layer derives from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import Location, NetError
from ..fillers import deferring, fill_
from ..proto import caffe_pb2

Shape = tuple[int, ...]


@dataclass
class LayerSpec:
    """Everything a layer is built from: its message, its bottoms' shapes and the net's state."""

    param: caffe_pb2.LayerParameter
    bottom_shapes: list[Shape]
    phase: int = caffe_pb2.TEST
    location: Location | None = None
    base_dir: Path | None = None
    extras: dict = field(default_factory=dict)


def canonical_axis(layer: "CaffeLayer", axis: int, shape: Sequence[int], what: str = "axis") -> int:
    """Caffe's ``Blob::CanonicalAxisIndex``: ``-ndim <= axis < ndim``, negatives count back.

    An axis out of range is an error naming the layer, the field and the bottom's shape.
    """
    n = len(shape)
    if not -n <= axis < n:
        raise layer.error(f"{what} {axis} is out of range for the {n}-D bottom {list(shape)}: "
                          f"expected {-n} <= axis < {n}, got {axis} (that is, expected an axis in "
                          f"[{-n}, {n - 1}])")
    return axis + n if axis < 0 else axis


class BlobList(nn.ParameterList):
    """``nn.ParameterList`` with a quicker ``blobs[i]``, which layers read at every call."""

    def __getitem__(self, idx):
        if type(idx) is int and idx >= 0:
            param = self._parameters.get(str(idx))  # absent when parametrized: the slow path
            if param is not None:
                return param
        return super().__getitem__(idx)


class CaffeLayer(nn.Module):
    """One Caffe layer as an ``nn.Module``.

    Subclasses create their parameter blobs in ``__init__`` with :meth:`add_blob`
    (in Caffe's blob order, so ``blobs[i]`` is Caffe's ``blobs_[i]``) and implement
    ``forward(*bottoms)`` returning one tensor per top (a tensor or a tuple). Forward
    must never modify a bottom in place: the compiler rebinds in-place tops by name.
    All tensor state lives in parameters or buffers so ``.to(device)`` moves it.

    Class attributes describe the layer to the compiler:
    ``min_bottoms``/``max_bottoms`` and ``min_tops``/``max_tops`` (None = unbounded),
    ``is_loss`` (Caffe's LossLayer: default ``loss_weight: 1`` on top 0 and an
    automatic top when none is named).
    """

    caffe_type: str = ""
    min_bottoms: int = 0
    max_bottoms: int | None = None
    min_tops: int = 0
    max_tops: int | None = None
    is_loss: bool = False

    def __init__(self, spec: LayerSpec):
        super().__init__()
        self.param = spec.param
        self.layer_name = spec.param.name
        self.phase = spec.phase
        self.location = spec.location
        self.base_dir = spec.base_dir
        self.blobs = BlobList()
        self.pending_fills: list[tuple[nn.Parameter, caffe_pb2.FillerParameter | None]] = []
        nb, nt = len(spec.param.bottom), len(spec.param.top)
        self._check_count("bottom", nb, self.min_bottoms, self.max_bottoms)
        self._check_count("top", nt, self.min_tops, self.max_tops)

    # -- helpers for subclasses -------------------------------------------------------
    def error(self, message: str) -> NetError:
        """An error naming this layer, its type and its prototxt line (raise it)."""
        return NetError(message, layer=self.layer_name, layer_type=self.param.type,
                        location=self.location)

    def _check_count(self, what: str, got: int, lo: int, hi: int | None) -> None:
        if got < lo or (hi is not None and got > hi):
            want = str(lo) if hi == lo else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
            raise self.error(f"expects {want} {what} blob(s), got {got}")

    def add_blob(self, shape: Sequence[int], filler: caffe_pb2.FillerParameter | None = None,
                 *, learnable: bool = True) -> nn.Parameter:
        """Append a parameter blob of ``shape`` filled by Caffe's ``filler`` (None = zeros).

        Non-learnable blobs (BatchNorm statistics) are parameters with
        ``requires_grad=False``: Caffe lists them among the net's params and saves them
        in the caffemodel, and the solver keeps history for them.
        """
        data = torch.empty(tuple(int(s) for s in shape), dtype=torch.float32)
        blob = nn.Parameter(data, requires_grad=learnable)
        if deferring():
            self.pending_fills.append((blob, filler))
        else:
            fill_(data, filler)
        self.blobs.append(blob)
        return blob

    def resolve_path(self, path: str, what: str = "file") -> Path:
        """A path named in the prototxt: as given (Caffe reads it from the working directory),
        else beside the prototxt; missing everywhere is an error naming both places."""
        candidate = Path(path)
        if candidate.exists() or candidate.is_absolute() or self.base_dir is None:
            if not candidate.exists():
                raise self.error(f"{what} '{path}' does not exist")
            return candidate
        beside = self.base_dir / candidate
        if not beside.exists():
            raise self.error(f"{what} '{path}' does not exist (looked in the working directory "
                             f"and in {self.base_dir})")
        return beside

    @property
    def num_tops(self) -> int:
        return len(self.param.top)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        """Top shapes for these bottom shapes, by running forward on meta tensors.

        Layers whose output shape depends on the data (or that cannot run on the meta
        device) override this.
        """
        meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
                for name, t in [*self.named_parameters(), *self.named_buffers()]}
        bottoms = tuple(torch.empty(s, device="meta") for s in bottom_shapes)
        out = torch.func.functional_call(self, meta, bottoms)
        if isinstance(out, torch.Tensor):
            out = (out,)
        return [tuple(t.shape) for t in out]

    def extra_repr(self) -> str:
        return f"name={self.layer_name!r}"
