"""pycaffe's ``caffe.draw``: a NetParameter as a Graphviz graph (layers as boxes, blobs as
octagons, in-place layers green), rendered to PNG/SVG/PDF by Graphviz's ``dot``.

Needs the ``pydot`` package, and the Graphviz ``dot`` program to render images; ``ext``
``"dot"`` (or a ``.dot``/``.gv`` file) writes the graph source with pydot alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .graph import layer_included
from .proto import caffe_pb2

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}
_TYPE_COLORS = {"Convolution": "#FF5050", "Deconvolution": "#FF5050", "Pooling": "#FF9900",
                "InnerProduct": "#CC33FF"}
_SOURCE_FORMATS = ("dot", "gv", "raw")


def _pydot() -> Any:
    try:
        import pydot
    except ImportError:
        raise ImportError("caffe2torch.draw needs the 'pydot' package (pip install pydot), and "
                          "Graphviz's 'dot' program to render images (apt-get install "
                          "graphviz)") from None
    return pydot


def choose_color_by_layertype(layertype: str) -> str:
    return _TYPE_COLORS.get(layertype, LAYER_STYLE_DEFAULT["fillcolor"])


def get_edge_label(layer: caffe_pb2.LayerParameter) -> str:
    """Batch size for Data layers, output count for conv/deconv/inner-product layers."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def get_layer_lr_mult(layer: caffe_pb2.LayerParameter) -> str:
    """``lr mult`` text for layers with parameters (pycaffe's ``display_lrm``)."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct", "BatchNorm", "Scale",
                          "PReLU", "Embed", "Bias"):
        return ""
    mults = [spec.lr_mult for spec in layer.param] or [1.0]
    return "lr mult: " + ", ".join(f"{m:g}" for m in mults)


def _first(values: Any, default: int) -> int:
    return values[0] if len(values) else default


def get_layer_label(layer: caffe_pb2.LayerParameter, rankdir: str,
                    display_lrm: bool = False) -> str:
    """``name (type)`` plus kernel/stride/pad for convolutions and pooling."""
    separator = " " if rankdir in ("TB", "BT") else "\n"
    parts = [layer.name, f"({layer.type})"]
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        parts.append(f"kernel size: {_first(p.kernel_size, 1)}")
        parts.append(f"stride: {_first(p.stride, 1)}")
        parts.append(f"pad: {_first(p.pad, 0)}")
    elif layer.type == "Pooling":
        p = layer.pooling_param
        parts.append(f"pool type: {caffe_pb2.PoolingParameter.PoolMethod.Name(p.pool)}")
        parts.append(f"kernel size: {p.kernel_size}")
        parts.append(f"stride: {p.stride}")
        parts.append(f"pad: {p.pad}")
    if display_lrm:
        lrm = get_layer_lr_mult(layer)
        if lrm:
            parts.append(lrm)
    return separator.join(parts)


def get_pydot_graph(caffe_net: caffe_pb2.NetParameter, rankdir: str, label_edges: bool = True,
                    phase: int | None = None, display_lrm: bool = False) -> Any:
    """The pydot graph of the net; with ``phase``, only the layers that phase includes."""
    pydot = _pydot()
    graph = pydot.Dot(caffe_net.name or "Net", graph_type="digraph", rankdir=rankdir)
    state = caffe_pb2.NetState(phase=phase) if phase is not None else None
    nodes: dict[str, Any] = {}
    edges: list[tuple[str, str, str]] = []
    for index, layer in enumerate(caffe_net.layer):
        if state is not None and not layer_included(layer, state):
            continue
        key = f"layer{index}"
        in_place = list(layer.bottom) == list(layer.top) and len(layer.top) == 1
        style = NEURON_LAYER_STYLE if in_place else \
            {**LAYER_STYLE_DEFAULT, "fillcolor": choose_color_by_layertype(layer.type)}
        nodes[key] = pydot.Node(key, label=_quote(get_layer_label(layer, rankdir, display_lrm)),
                                **style)
        for bottom in layer.bottom:
            nodes.setdefault(f"blob_{bottom}", pydot.Node(f"blob_{bottom}", label=_quote(bottom),
                                                          **BLOB_STYLE))
            edges.append((f"blob_{bottom}", key, ""))
        for top in layer.top:
            nodes.setdefault(f"blob_{top}", pydot.Node(f"blob_{top}", label=_quote(top),
                                                       **BLOB_STYLE))
            edges.append((key, f"blob_{top}", get_edge_label(layer) if label_edges else ""))
    for node in nodes.values():
        graph.add_node(node)
    for src, dst, label in edges:
        graph.add_edge(pydot.Edge(nodes[src], nodes[dst], label=_quote(label)))
    return graph


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def draw_net(caffe_net: caffe_pb2.NetParameter, rankdir: str, ext: str = "png",
             phase: int | None = None, display_lrm: bool = False) -> bytes:
    """The drawing in format ``ext`` (any Graphviz output format; ``dot`` for the source)."""
    graph = get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm)
    if ext in _SOURCE_FORMATS:
        return graph.to_string().encode()
    try:
        return graph.create(format=ext)
    except FileNotFoundError as exc:
        raise RuntimeError(f"drawing a net as {ext} needs Graphviz's 'dot' program on PATH "
                           "(apt-get install graphviz); ext='dot' writes the graph source "
                           "without it") from exc


def draw_net_to_file(caffe_net: caffe_pb2.NetParameter, filename: str | Path,
                     rankdir: str = "LR", phase: int | None = None,
                     display_lrm: bool = False) -> None:
    """Draw to ``filename`` in the format its extension names."""
    ext = Path(filename).suffix[1:] or "png"
    data = draw_net(caffe_net, rankdir, ext, phase, display_lrm)
    Path(filename).write_bytes(data)
