"""Compile a Caffe net (``NetParameter`` + ``NetState``) into one ``nn.Module``.

The module is the single implementation of the net: the pycaffe ``Net``, the
solvers and the command line are views over it and its parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from . import fusion, layout
from .errors import NetError
from .fillers import deferred, fill_
from .graph import NetGraph
from .layers import get_layer_class
from .layers.base import CaffeLayer, LayerSpec, Shape
from .layers.conv import _ConvolutionBase
from .proto import caffe_pb2

AUTOMATIC_TOP = "(automatic)"


@dataclass
class Step:
    """One layer call: which module, which blobs it reads and which it writes."""

    key: str                      # key of the module in ``CaffeNet.layers``
    name: str                     # the Caffe layer name (may repeat across layers)
    type: str
    bottoms: list[str]
    tops: list[str]
    loss_weights: list[float]     # one per top; all zero for layers outside the loss
    propagate_down: list[bool]    # one per bottom
    is_input: bool
    has_loss: bool = field(init=False)  # any loss weight: read at every call of the step

    def __post_init__(self) -> None:
        self.has_loss = any(self.loss_weights)


@dataclass
class LearnableParam:
    """A parameter the solver updates (owners only, in Caffe's learnable_params order)."""

    param: nn.Parameter
    lr_mult: float
    decay_mult: float
    layer: str
    index: int
    explicit: set[str] = field(default_factory=set)  # mults given in a ParamSpec


class _ReshapeTo(nn.Module):
    """Parametrization that shows a PERMISSIVE-shared owner blob in this layer's shape."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.shape = shape

    def forward(self, owner: torch.Tensor) -> torch.Tensor:
        return owner.reshape(self.shape)


def _module_key(name: str, used: set[str]) -> str:
    base = (name or "layer").replace(".", "_")
    key, n = base, 1
    while key in used or hasattr(nn.ModuleDict, key):  # e.g. a layer named "double" or "train"
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


class CaffeNet(nn.Module):
    """A compiled Caffe net.

    ``forward(*inputs, **named_inputs)`` feeds the net's Input blobs (positionally in
    the order of :attr:`input_names`) and returns its output blob, or a dict of
    outputs when there are several. :meth:`run` gives access to every blob.

    ``fuse`` (default True) enables the fast paths of :mod:`caffe2torch.fusion`
    (BatchNorm+Scale as one call, in-place ReLU and Eltwise SUM); set it False to run every
    layer as written.
    """

    def __init__(self, graph: NetGraph, *, base_dir: str | Path | None = None,
                 input_shapes: Mapping[str, Sequence[int]] | None = None, fill: bool = True):
        super().__init__()
        self.name = graph.name
        self.phase = graph.state.phase
        self.force_backward = graph.force_backward
        self.layers = nn.ModuleDict()
        # Empty buffer that follows .to(): tells where data-layer outputs must be moved.
        self.register_buffer("_device_marker", torch.empty(0), persistent=False)
        self.steps: list[Step] = []
        self.blob_shapes: dict[str, Shape] = {}
        self.learnable: list[LearnableParam] = []
        self.input_names = list(graph.inputs)
        self.output_names = list(graph.outputs)
        self.blob_names = list(graph.blob_names)
        self._base_dir = Path(base_dir) if base_dir is not None else None
        owners: dict[str, tuple[nn.Parameter, int, caffe_pb2.ParamSpec]] = {}
        used: set[str] = set()
        overrides = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
        for node in graph.nodes:
            cls = get_layer_class(node.type, layer=node.name, location=node.location)
            param = caffe_pb2.LayerParameter()
            param.CopyFrom(node.param)
            try:
                bottom_shapes = [self.blob_shapes[b] for b in node.bottoms]
            except KeyError as exc:
                raise NetError(f"bottom blob {exc} has no shape", layer=node.name,
                               layer_type=node.type, location=node.location) from None
            spec = LayerSpec(param=param, bottom_shapes=bottom_shapes, phase=self.phase,
                             location=node.location, base_dir=self._base_dir)
            with deferred():
                layer: CaffeLayer = cls(spec)
            tops = list(node.tops)
            if cls.is_loss and not tops:
                tops = [AUTOMATIC_TOP]
                self.blob_names.append(AUTOMATIC_TOP)
            key = _module_key(node.name, used)
            self.layers[key] = layer
            self._share_params(layer, owners)
            top_shapes = self._top_shapes(layer, node.type, bottom_shapes, tops, overrides)
            for blob, shape in zip(tops, top_shapes):
                self.blob_shapes[blob] = shape
            self.steps.append(Step(
                key=key, name=node.name, type=node.type, bottoms=list(node.bottoms), tops=tops,
                loss_weights=self._loss_weights(layer, tops), is_input=node.type == "Input",
                propagate_down=self._propagate_down(layer, node.bottoms)))
        self._last_use = self._liveness()
        self.fuse = fusion.ENABLED
        self._fast = fusion.plan(self.steps, self.layers, self._last_use)
        if fill:
            self.fill_blobs()
        self.use_channels_last(None if layout.ENABLED else False)

    def fill_blobs(self, loaded: set[int] = frozenset()) -> None:
        """Draw every blob from its layer's filler, except those in ``loaded`` (by ``id``).

        Shared blobs are drawn once, by their first layer, as in Caffe where a sharing
        layer's own draw is discarded when it starts using the owner's data.
        """
        done = set(loaded)
        for module in self.modules():
            for blob, filler in getattr(module, "pending_fills", ()):
                if id(blob) not in done:
                    fill_(blob.data, filler)
                    done.add(id(blob))
            if isinstance(module, CaffeLayer):
                module.pending_fills = []

    def use_channels_last(self, enabled: bool | None = True) -> bool:
        """Run the 2-D convolutions channels-last (:mod:`caffe2torch.layout`) or NCHW;
        returns whether the net now has a convolution running channels-last.

        ``None``, a new net's setting unless CAFFE2TORCH_CHANNELS_LAST=0, means
        channels-last while the net is on the CPU and NCHW on other devices (on CUDA,
        NCHW measured faster: README, Speed), decided again whenever the net moves;
        True or False holds on any device.
        """
        self._layout_choice = enabled
        nhwc = self._device_marker.device.type == "cpu" if enabled is None else enabled
        convolutions = [m for m in self.layers.values() if isinstance(m, _ConvolutionBase)]
        layout.set_weight_layout(convolutions, nhwc)
        self.channels_last = any(m.channels_last for m in convolutions)
        return self.channels_last

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (behind ``.to()``, ``.cuda()``, ...), then the layout of a
        net that follows its device."""
        super()._apply(fn, recurse)
        if self._layout_choice is None:
            self.use_channels_last(None)
        return self

    # -- construction helpers ---------------------------------------------------------
    def _top_shapes(self, layer: CaffeLayer, type_: str, bottom_shapes: list[Shape],
                    tops: list[str], overrides: dict[str, Shape]) -> list[Shape]:
        if type_ == "Input" and any(t in overrides for t in tops):
            declared = layer.infer_shapes(bottom_shapes)
            return [overrides.get(t, s) for t, s in zip(tops, declared)]
        try:
            shapes = layer.infer_shapes(bottom_shapes)
        except NetError:
            raise
        except Exception as exc:  # shape errors from torch ops: name the layer and shapes
            raise layer.error(f"cannot compute its output for bottom shapes "
                              f"{[list(s) for s in bottom_shapes]}: {exc}") from None
        if len(shapes) != len(tops):
            raise layer.error(f"produced {len(shapes)} top blob(s), the prototxt names {len(tops)}")
        return shapes

    def _loss_weights(self, layer: CaffeLayer, tops: list[str]) -> list[float]:
        weights = list(layer.param.loss_weight)
        if not weights:
            if layer.is_loss and len(tops) == 1:  # LossLayer::LayerSetUp: saved models show it
                layer.param.loss_weight.append(1.0)
            return [1.0 if (layer.is_loss and i == 0) else 0.0 for i in range(len(tops))]
        if len(weights) != len(tops):
            raise layer.error(f"loss_weight must be unspecified or given once per top blob: "
                              f"{len(weights)} weight(s) for {len(tops)} top(s)")
        return weights

    def _propagate_down(self, layer: CaffeLayer, bottoms: list[str]) -> list[bool]:
        flags = list(layer.param.propagate_down)
        if not flags:
            return [True] * len(bottoms)
        if len(flags) != len(bottoms):
            raise layer.error(f"propagate_down must be unspecified or given once per bottom: "
                              f"{len(flags)} value(s) for {len(bottoms)} bottom(s)")
        return flags

    def _share_params(self, layer: CaffeLayer,
                      owners: dict[str, tuple[nn.Parameter, int, caffe_pb2.ParamSpec]]) -> None:
        """Caffe's ``Net::AppendParam``: sharing by ``param { name }`` and learnable params."""
        specs = layer.param.param
        for i in range(len(layer.blobs)):
            spec = specs[i] if i < len(specs) else caffe_pb2.ParamSpec()
            if not spec.name or spec.name not in owners:
                entry = LearnableParam(layer.blobs[i], spec.lr_mult, spec.decay_mult,
                                       layer.layer_name, i,
                                       {f for f in ("lr_mult", "decay_mult") if spec.HasField(f)})
                if spec.name:
                    owners[spec.name] = (layer.blobs[i], len(self.learnable), spec)
                self.learnable.append(entry)
                continue
            owner, index, owner_spec = owners[spec.name]
            mine = tuple(layer.blobs[i].shape)
            if owner_spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE or \
                    spec.share_mode == caffe_pb2.ParamSpec.PERMISSIVE:
                if owner.numel() != math.prod(mine):
                    raise layer.error(f"cannot share param '{spec.name}' (PERMISSIVE): owner has "
                                      f"count {owner.numel()}, this blob {i} has shape {list(mine)}")
            elif tuple(owner.shape) != mine:
                raise layer.error(f"cannot share param '{spec.name}' (STRICT): owner shape "
                                  f"{list(owner.shape)}, this blob {i} expects {list(mine)}; "
                                  "use share_mode: PERMISSIVE to share by count")
            self._check_shared_mult(layer, spec, index)
            if tuple(owner.shape) == mine:
                layer.blobs[i] = owner
            else:
                layer.blobs[i] = owner
                nn.utils.parametrize.register_parametrization(layer.blobs, str(i), _ReshapeTo(mine),
                                                              unsafe=True)

    def _check_shared_mult(self, layer: CaffeLayer, spec: caffe_pb2.ParamSpec, index: int) -> None:
        entry = self.learnable[index]
        for name in ("lr_mult", "decay_mult"):
            if not spec.HasField(name):
                continue
            value = getattr(spec, name)
            if name in entry.explicit and getattr(entry, name) != value:
                raise layer.error(f"shared param '{spec.name}' has mismatched {name}: "
                                  f"{value} vs {getattr(entry, name)}")
            setattr(entry, name, value)
            entry.explicit.add(name)

    def _liveness(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for blob in step.bottoms:
                last[blob] = i
        for blob in self.output_names:
            last[blob] = len(self.steps)
        return last

    # -- running ----------------------------------------------------------------------
    def layer_index(self, name: str) -> int:
        """Index of the (last) step of layer ``name``, as pycaffe's ``start``/``end``."""
        for i in range(len(self.steps) - 1, -1, -1):
            if self.steps[i].name == name:
                return i
        raise NetError(f"no layer named '{name}' in net '{self.name}'")

    def run(self, blobs: dict[str, torch.Tensor], *, start: int = 0, end: int | None = None,
            keep_all: bool = True,
            observer: Callable[[Step, tuple[torch.Tensor, ...]], None] | None = None
            ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Run steps ``start..end`` (inclusive) over ``blobs``; returns (blobs, weighted loss).

        ``blobs`` supplies the Input tops and any blob read before ``start``. With
        ``keep_all`` false, blobs no later step reads are dropped as soon as possible.
        """
        env = dict(blobs)
        steps, layers, last_use = self.steps, self.layers, self._last_use
        last = len(steps) - 1 if end is None else end
        loss: torch.Tensor | None = None
        fast = self._fast_paths(observer is not None, keep_all)
        fused = -1  # the Scale step whose output the BatchNorm step before it computed
        for i in range(start, last + 1):
            step = steps[i]
            if step.is_input:
                missing = [t for t in step.tops if t not in env]
                if missing:
                    raise NetError(f"input blob(s) {missing} not given; the net's inputs are "
                                   f"{self.input_names}", layer=step.name, layer_type="Input")
                outs = tuple(env[t] for t in step.tops)
            elif i != fused:  # a fused Scale's output is already bound to its (in-place) top
                try:
                    args = [env[blob] for blob in step.bottoms]
                except KeyError as exc:
                    raise NetError(f"bottom blob '{exc.args[0]}' has no value (was it produced "
                                   f"before step {start}?)", layer=step.name,
                                   layer_type=step.type) from None
                if False in step.propagate_down:
                    args = [a if down else a.detach() for a, down in zip(args, step.propagate_down)]
                layer = layers[step.key]
                path = fast.get(i)
                out = None if path is None else path.call(i, layer, args, steps, layers,
                                                          start, last)
                if out is None:
                    out = layer(*args)
                elif path.kind == fusion.BN_SCALE:
                    fused = i + 1
                outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
                if not args:  # data layers read on the CPU side
                    where = self._device_marker.device
                    outs = tuple(o.to(where, non_blocking=True) for o in outs)
                for blob, value in zip(step.tops, outs):
                    env[blob] = value
            if step.has_loss:
                for value, weight in zip(outs, step.loss_weights):
                    if weight:
                        term = value.sum() * weight
                        loss = term if loss is None else loss + term
            if observer is not None:
                observer(step, outs)
            if not keep_all:
                for blob in step.bottoms:
                    if last_use.get(blob, -1) <= i:
                        env.pop(blob, None)
        return env, loss

    def _fast_paths(self, observed: bool, keep_all: bool) -> dict[int, fusion.FastPath]:
        """The fast paths (:mod:`caffe2torch.fusion`) a run of this kind may take."""
        if not self.fuse:
            return {}
        if not (observed or keep_all):
            return self._fast
        grad = torch.is_grad_enabled()
        return {i: p for i, p in self._fast.items() if p.allowed(observed, keep_all, grad)}

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        if len(args) > len(self.input_names):
            raise NetError(f"net '{self.name}' takes {len(self.input_names)} input(s) "
                           f"{self.input_names}, got {len(args)}")
        feed = dict(zip(self.input_names, args))
        for name, value in kwargs.items():
            if name not in self.input_names:
                raise NetError(f"'{name}' is not an input of net '{self.name}' "
                               f"(inputs: {self.input_names})")
            feed[name] = value
        env, _ = self.run(feed, keep_all=False)
        if len(self.output_names) == 1:
            return env[self.output_names[0]]
        return {name: env[name] for name in self.output_names}

    def forward_loss(self, *args: torch.Tensor, **kwargs: torch.Tensor):
        """Run the net; return ``(loss, outputs)`` where loss is Caffe's weighted sum."""
        feed = dict(zip(self.input_names, args))
        feed.update(kwargs)
        env, loss = self.run(feed, keep_all=False)
        return loss, {name: env[name] for name in self.output_names}

    def layer_params(self) -> list[tuple[str, CaffeLayer]]:
        """(Caffe name, module) of every layer that has blobs, in net order (pycaffe's params)."""
        return [(s.name, self.layers[s.key]) for s in self.steps if len(self.layers[s.key].blobs)]
