"""Net assembly rules of Caffe's net.cpp and insert_splits.cpp, on messages.

Takes an upgraded ``NetParameter`` and a ``NetState`` and produces the exact list
of layers Caffe would instantiate: filtered by include/exclude rules, with Split
layers inserted under Caffe's names, plus the bookkeeping the compiler needs
(which blob each bottom reads, in-place rebinding, net inputs and outputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .errors import Location, NetError
from .proto import caffe_pb2


def make_state(phase: int, level: int = 0, stages: Iterable[str] = (),
               base: caffe_pb2.NetState | None = None) -> caffe_pb2.NetState:
    """The NetState Caffe's ``Net(file, phase, level, stages)`` builds: file state + given."""
    state = caffe_pb2.NetState()
    if base is not None:
        state.CopyFrom(base)
    state.phase = phase
    state.level = level
    state.stage.extend(s for s in stages if s not in state.stage)
    return state


def state_meets_rule(state: caffe_pb2.NetState, rule: caffe_pb2.NetStateRule) -> bool:
    """Caffe's ``Net::StateMeetsRule``."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    return not any(s in stages for s in rule.not_stage)


def layer_included(layer: caffe_pb2.LayerParameter, state: caffe_pb2.NetState) -> bool:
    """Caffe's ``Net::FilterNet`` rule for one layer."""
    if layer.include and layer.exclude:
        raise NetError("specify either include rules or exclude rules, not both",
                       layer=layer.name, layer_type=layer.type)
    if layer.include:
        return any(state_meets_rule(state, r) for r in layer.include)
    return not any(state_meets_rule(state, r) for r in layer.exclude)


@dataclass
class LayerNode:
    """One layer as Caffe instantiates it (after filtering and split insertion)."""

    param: caffe_pb2.LayerParameter
    location: Location | None
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.param.name

    @property
    def type(self) -> str:
        return self.param.type


@dataclass
class NetGraph:
    """The layers of a net in execution order, with its inputs and outputs."""

    name: str
    state: caffe_pb2.NetState
    force_backward: bool
    nodes: list[LayerNode]
    inputs: list[str]
    outputs: list[str]
    blob_names: list[str]


def _split_layer_name(layer: str, blob: str, idx: int) -> str:
    return f"{blob}_{layer}_{idx}_split"


def _split_blob_name(layer: str, blob: str, idx: int, k: int) -> str:
    return f"{blob}_{layer}_{idx}_split_{k}"


def insert_splits(layers: Sequence[tuple[caffe_pb2.LayerParameter, Location | None]]
                  ) -> list[tuple[caffe_pb2.LayerParameter, Location | None]]:
    """Caffe's ``InsertSplits``: give every multiply-consumed top its own Split layer.

    A top with a non-zero explicit ``loss_weight`` counts as one more consumer and its
    weight moves to the Split's first output, as in Caffe.
    """
    last_top: dict[str, tuple[int, int]] = {}
    source_of: dict[tuple[int, int], tuple[int, int]] = {}
    consumers: dict[tuple[int, int], int] = {}
    loss_weight: dict[tuple[int, int], float] = {}
    for i, (lp, loc) in enumerate(layers):
        for j, blob in enumerate(lp.bottom):
            if blob not in last_top:
                raise NetError(f"unknown bottom blob '{blob}' (bottom index {j}); no earlier "
                               "layer produces it", layer=lp.name, layer_type=lp.type, location=loc)
            top_idx = last_top[blob]
            source_of[(i, j)] = top_idx
            consumers[top_idx] = consumers.get(top_idx, 0) + 1
        for j, blob in enumerate(lp.top):
            last_top[blob] = (i, j)
        for j in range(min(len(lp.loss_weight), len(lp.top))):
            loss_weight[(i, j)] = lp.loss_weight[j]
            if lp.loss_weight[j]:
                consumers[(i, j)] = consumers.get((i, j), 0) + 1

    out: list[tuple[caffe_pb2.LayerParameter, Location | None]] = []
    next_split: dict[tuple[int, int], int] = {}
    for i, (lp, loc) in enumerate(layers):
        lp = _copy(lp)
        out.append((lp, loc))
        for j, blob in enumerate(lp.bottom):
            top_idx = source_of[(i, j)]
            if consumers.get(top_idx, 0) > 1:
                producer = layers[top_idx[0]][0].name
                k = next_split.get(top_idx, 0)
                next_split[top_idx] = k + 1
                lp.bottom[j] = _split_blob_name(producer, blob, top_idx[1], k)
        for j, blob in enumerate(lp.top):
            count = consumers.get((i, j), 0)
            if count <= 1:
                continue
            weight = loss_weight.get((i, j), 0.0)
            split = caffe_pb2.LayerParameter(name=_split_layer_name(lp.name, blob, j), type="Split")
            split.bottom.append(blob)
            split.top.extend(_split_blob_name(lp.name, blob, j, k) for k in range(count))
            if weight:
                split.loss_weight.extend([weight] + [0.0] * (count - 1))
                lp.ClearField("loss_weight")
                next_split[(i, j)] = next_split.get((i, j), 0) + 1
            out.append((split, loc))
    return out


def _copy(lp: caffe_pb2.LayerParameter) -> caffe_pb2.LayerParameter:
    new = caffe_pb2.LayerParameter()
    new.CopyFrom(lp)
    return new


def build_graph(net: caffe_pb2.NetParameter, state: caffe_pb2.NetState,
                locations: Sequence[Location | None] | None = None) -> NetGraph:
    """Filter ``net`` for ``state``, insert splits and check blob wiring like ``Net::Init``."""
    if net.layers:
        raise NetError("net still uses V1 'layers' fields; upgrade it first "
                       "(caffe2torch.formats.upgrade_net)")
    locs = list(locations) if locations is not None else [None] * len(net.layer)
    kept = [(lp, locs[i] if i < len(locs) else None)
            for i, lp in enumerate(net.layer) if layer_included(lp, state)]
    with_splits = insert_splits(kept)

    nodes: list[LayerNode] = []
    producers: dict[str, str] = {}
    available: dict[str, None] = {}
    blob_names: list[str] = []
    inputs: list[str] = []
    for lp, loc in with_splits:
        if not lp.HasField("phase"):
            lp.phase = state.phase
        node = LayerNode(lp, loc, list(lp.bottom), list(lp.top))
        for blob in lp.bottom:
            available.pop(blob, None)
        for j, blob in enumerate(lp.top):
            in_place = j < len(lp.bottom) and lp.bottom[j] == blob
            if blob in producers and not in_place:
                raise NetError(f"top blob '{blob}' is produced by multiple sources: layer "
                               f"'{producers[blob]}' and this one (only in-place reuse, top j == "
                               "bottom j, may repeat a name)", layer=lp.name, layer_type=lp.type,
                               location=loc)
            if blob not in producers:
                blob_names.append(blob)
            producers[blob] = lp.name
            available[blob] = None
            if lp.type == "Input":
                inputs.append(blob)
        nodes.append(node)
    # Net::Init keeps the available blobs in a std::set: outputs come in name order.
    return NetGraph(name=net.name, state=state, force_backward=net.force_backward, nodes=nodes,
                    inputs=inputs, outputs=sorted(available), blob_names=blob_names)
