"""Fast paths of :meth:`CaffeNet.run` that change how some steps compute, never what they give.

* BatchNorm + Scale: a BatchNorm with global statistics whose top is read only by the next
  step, a ``bias_term`` or plain Scale with one learned value per channel (axis 1) working in
  place on that top, runs as one ``batch_norm`` with the Scale's blobs as its affine. The
  blob then holds the Scale's output, as in Caffe; the normalised value in between is never
  visible (Caffe overwrites it in place too). Both layers keep their own parameters, read at
  every call, so net surgery and sharing take effect. Batch statistics (TRAIN) are not fused.
* In-place ReLU: a ReLU that Caffe runs in place (top == bottom) overwrites its bottom when
  that bottom is a new tensor made in this run by a layer whose backward does not read it
  (``_FRESH``), and no other step read it.
* In-place Eltwise SUM (unit coefficients): in a run that shows no blob to an observer and
  drops dead blobs (the module's forward), the sum is accumulated into bottom 0 or 1 when
  that bottom is such a new tensor and no other step reads it, before or after.

* Shared Split tops: in such a run a Split returns its bottom itself as every top instead of
  one view per top, so autograd adds the tops' gradients into one buffer in place (views
  share storage, which forces a new tensor per sum). No in-place path ever writes a Split
  top: a Split does not make new tensors.

An observer (the pycaffe view, the solvers) sees every top and keeps the first tensor bound to
a name for its diff, so with one the BatchNorm must be in place too, and ReLUs run in place
only without autograd. A fast path is skipped when a layer involved has hooks.
``CaffeNet.fuse = False`` (or ``CAFFE2TORCH_FUSE=0`` in the environment before import) runs
every layer as written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .layers.activation import ReLU
from .layers.conv import Convolution, Deconvolution
from .layers.eltwise import Eltwise
from .layers.input import Split
from .layers.inner_product import InnerProduct
from .layers.normalization import BatchNorm
from .layers.pooling import Pooling
from .layers.scale_bias import Bias, Scale
from .proto import caffe_pb2

ENABLED = os.environ.get("CAFFE2TORCH_FUSE", "1") != "0"

# Layers that return new tensors and do not save them for their backward.
_FRESH = (Convolution, Deconvolution, InnerProduct, BatchNorm, Scale, Bias, Pooling)

BN_SCALE, RELU, SUM, SPLIT = "BatchNorm+Scale", "in-place ReLU", "in-place SUM", "shared Split"


@dataclass(frozen=True)
class FastPath:
    """How step ``i`` of a plan may run: ``other`` is the Scale step (BN_SCALE), the step
    that wrote the bottom to overwrite (RELU, SUM) or ``i`` itself (SPLIT); ``into`` that
    bottom (SUM); ``in_place``: the BatchNorm's top is its bottom (BN_SCALE)."""

    kind: str
    other: int
    into: int = 0
    in_place: bool = False

    def allowed(self, observed: bool, keep_all: bool, grad: bool) -> bool:
        """Whether a run with (or without) an observer, keeping all blobs, may use it."""
        if self.kind == BN_SCALE:
            return self.in_place or not observed
        if self.kind == RELU:
            return not (observed and grad)
        return not (observed or keep_all)  # SUM, SPLIT

    def call(self, i: int, layer: nn.Module, args: list[torch.Tensor], steps: Sequence,
             layers: Mapping[str, nn.Module], start: int, last: int) -> torch.Tensor | None:
        """Step ``i``'s top by this path, or None where it does not apply to this run."""
        other = layers[steps[self.other].key]
        if hooked(layer) or hooked(other):
            return None
        if self.kind == SPLIT:
            return (args[0],) * layer.num_tops
        if self.kind == BN_SCALE:
            if i < last and layer.use_global_stats:
                return batch_norm_scale(layer, other, args[0])
            return None
        if self.other < start:  # not made in this run: the caller's tensor
            return None
        if self.kind == RELU:
            return layer(args[0], inplace=True)
        return layer(*args, into=self.into)


def hooked(module: nn.Module) -> bool:
    """Whether ``module`` has hooks, which could see a tensor overwritten or a layer skipped."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def batch_norm_scale(bn: BatchNorm, scale: Scale, x: torch.Tensor) -> torch.Tensor:
    """The BatchNorm (global statistics) and the Scale after it, as one ``batch_norm``."""
    mean, var = bn.global_stats()
    blobs = scale.blobs
    bias = blobs[1] if scale.bias_term else None
    return torch.batch_norm(x, blobs[0], bias, mean, var, False, 0.0, bn.eps,
                            torch.backends.cudnn.enabled)


def plan(steps: Sequence, layers: Mapping[str, nn.Module],
         last_use: Mapping[str, int]) -> dict[int, FastPath]:
    """The fast paths a net's steps may take, by step index."""
    writers = _sole_writers(steps, layers)
    found: dict[int, FastPath] = {}
    for i, step in enumerate(steps):
        layer = layers[step.key]
        if isinstance(layer, BatchNorm) and i + 1 < len(steps):
            scale = steps[i + 1]
            top, sc = step.tops[0], layers[scale.key]
            if (isinstance(sc, Scale) and scale.bottoms == [top] and scale.tops == [top]
                    and sc.axis == 1 and sc.blobs[0].shape == layer.blobs[0].shape
                    and all(scale.propagate_down)
                    and not any(step.loss_weights) and not any(scale.loss_weights)):
                found[i] = FastPath(BN_SCALE, i + 1, in_place=step.bottoms == step.tops)
        elif isinstance(layer, ReLU):
            if (layer.negative_slope >= 0 and step.tops == step.bottoms
                    and all(step.propagate_down) and writers[i][0] is not None):
                found[i] = FastPath(RELU, writers[i][0])
        elif isinstance(layer, Split):
            found[i] = FastPath(SPLIT, i)
        elif isinstance(layer, Eltwise):
            if (layer.op == caffe_pb2.EltwiseParameter.SUM and all(step.propagate_down)
                    and all(c == 1.0 for c in layer.coeffs)):
                for k in (0, 1):  # b0 + b1 == b1 + b0; later bottoms keep their order
                    if writers[i][k] is not None and last_use.get(step.bottoms[k]) == i:
                        found[i] = FastPath(SUM, writers[i][k], into=k)
                        break
    return found


def _fresh(layer: nn.Module) -> bool:
    if isinstance(layer, Eltwise):  # PROD may save its top for the backward
        return layer.op != caffe_pb2.EltwiseParameter.PROD
    return isinstance(layer, _FRESH)


def _sole_writers(steps: Sequence, layers: Mapping[str, nn.Module]) -> list[list[int | None]]:
    """Per step and bottom: the step that wrote the value, where that step makes new tensors
    (``_fresh``) and this step is the value's first and only reader so far."""
    found: list[list[int | None]] = []
    writer: dict[str, int] = {}
    read: set[str] = set()  # blobs read since their last write
    for i, step in enumerate(steps):
        row = []
        for blob in step.bottoms:
            j = writer.get(blob)
            sole = (j is not None and blob not in read and step.bottoms.count(blob) == 1
                    and _fresh(layers[steps[j].key]) and not any(steps[j].loss_weights))
            row.append(j if sole else None)
        found.append(row)
        read.update(step.bottoms)
        for top in step.tops:
            writer[top] = i
            read.discard(top)
    return found
