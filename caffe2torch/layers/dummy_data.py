"""DummyData: tops filled by Caffe fillers, with no bottoms (dummy_data_layer.cpp)."""
from __future__ import annotations

import torch

from ..errors import NetError
from ..fillers import fill_
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape
from .registry import register

_LEGACY = ("num", "channels", "height", "width")


@register("DummyData", "DUMMY_DATA")
class DummyData(CaffeLayer):
    """Tops of ``shape`` (or legacy num/channels/height/width), each given once or once per top.

    ``data_filler`` is absent (constant 0), one filler for every top, or one per top.
    Caffe fills the tops of constant fillers once at setup and refills the others on
    every forward; here a constant top is a buffer returned as is, a random one is
    drawn anew by each forward.
    """

    max_bottoms = 0
    min_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.dummy_data_param
        tops = len(spec.param.top)
        if len(p.data_filler) not in (0, 1, tops):
            raise self.error(f"dummy_data_param.data_filler must be given 0, 1 or {tops} (one per "
                             f"top) times, got {len(p.data_filler)}")
        self.shapes = self._shapes(p, tops)
        default = caffe_pb2.FillerParameter(type="constant", value=0)
        self.fillers = [p.data_filler[i if len(p.data_filler) > 1 else 0] if p.data_filler
                        else default for i in range(tops)]
        self.refill = [f.type != "constant" for f in self.fillers]
        for i, (shape, filler) in enumerate(zip(self.shapes, self.fillers)):
            self.register_buffer(f"top{i}", self._fill(torch.empty(shape), filler),
                                 persistent=False)

    def _shapes(self, p: caffe_pb2.DummyDataParameter, tops: int) -> list[Shape]:
        """One shape per top from ``shape`` or the legacy 4-D fields (not both)."""
        legacy = [list(getattr(p, name)) for name in _LEGACY]
        if any(legacy):
            if len(p.shape):
                raise self.error("dummy_data_param: give either shape or the legacy "
                                 "num/channels/height/width fields, got both")
            for name, values in zip(_LEGACY, legacy):
                if len(values) not in (1, tops):
                    raise self.error(f"dummy_data_param.{name} must be given once or once per top "
                                     f"({tops}), got {len(values)} value(s)")
            return [tuple(int(v[0] if len(v) == 1 else v[i]) for v in legacy) for i in range(tops)]
        if len(p.shape) not in (1, tops):
            raise self.error(f"dummy_data_param.shape must be given once or once per top "
                             f"({tops}), got {len(p.shape)}")
        shapes = [tuple(int(d) for d in p.shape[0 if len(p.shape) == 1 else i].dim)
                  for i in range(tops)]
        for shape in shapes:
            if any(d < 0 for d in shape):
                raise self.error(f"dummy_data_param.shape dims must be >= 0, got {list(shape)}")
        return shapes

    def _fill(self, tensor: torch.Tensor, filler: caffe_pb2.FillerParameter) -> torch.Tensor:
        try:
            return fill_(tensor, filler)
        except NetError as exc:
            raise self.error(f"dummy_data_param.data_filler: {exc}") from None

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return list(self.shapes)

    def forward(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        tops = []
        for i, (filler, refill) in enumerate(zip(self.fillers, self.refill)):
            stored = getattr(self, f"top{i}")
            tops.append(fill_(torch.empty_like(stored), filler) if refill else stored)
        return tops[0] if len(tops) == 1 else tuple(tops)
