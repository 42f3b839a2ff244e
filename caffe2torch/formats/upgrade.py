"""Caffe's upgrade_proto.cpp: old net and solver messages to the current format.

``upgrade_net`` is ``UpgradeNetAsNeeded``: V0 -> V1 (``padding`` layers folded into the
next conv/pool first), the data-transform fields, V1 -> V2, the legacy ``input`` fields ->
an ``Input`` layer, and the BatchNorm ``param`` fix, in that order. The result equals what
Caffe's ``upgrade_net_proto_text``/``_binary`` write. Where Caffe only logs (a V0 setting
that has no place on that layer type) we log a warning and drop it too; where Caffe dies
(an unknown V0 type or V1 enum, a bad padding layer) we raise a FormatError naming the
file and the layer.
"""
from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import message as _message
from google.protobuf.unknown_fields import UnknownFieldSet

from ..errors import FormatError
from ..proto import caffe_pb2

log = logging.getLogger(__name__)

V0Layer = caffe_pb2.V0LayerParameter
V1Layer = caffe_pb2.V1LayerParameter

# UpgradeV0LayerType: V0 type string -> V1 enum name.
_V0_TYPES = {
    "accuracy": "ACCURACY", "bnll": "BNLL", "concat": "CONCAT", "conv": "CONVOLUTION",
    "data": "DATA", "dropout": "DROPOUT", "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN", "hdf5_data": "HDF5_DATA", "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL", "images": "IMAGE_DATA", "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT", "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS", "pool": "POOLING",
    "relu": "RELU", "sigmoid": "SIGMOID", "softmax": "SOFTMAX", "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT", "tanh": "TANH", "window_data": "WINDOW_DATA",
}

# UpgradeV1LayerType: V1 enum name -> V2 type string.
V1_TYPES = {
    "NONE": "", "ABSVAL": "AbsVal", "ACCURACY": "Accuracy", "ARGMAX": "ArgMax", "BNLL": "BNLL",
    "CONCAT": "Concat", "CONTRASTIVE_LOSS": "ContrastiveLoss", "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution", "DATA": "Data", "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData", "EUCLIDEAN_LOSS": "EuclideanLoss", "ELTWISE": "Eltwise",
    "EXP": "Exp", "FLATTEN": "Flatten", "HDF5_DATA": "HDF5Data", "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss", "IM2COL": "Im2col", "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss", "INNER_PRODUCT": "InnerProduct", "LRN": "LRN",
    "MEMORY_DATA": "MemoryData", "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN", "POOLING": "Pooling", "POWER": "Power", "RELU": "ReLU", "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss", "SILENCE": "Silence",
    "SOFTMAX": "Softmax", "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "SLICE": "Slice",
    "TANH": "TanH", "WINDOW_DATA": "WindowData", "THRESHOLD": "Threshold",
}

_CONV, _IP, _POOL = "convolution_param", "inner_product_param", "pooling_param"
_DATA, _HDF5, _IMAGES, _WINDOW = ("data_param", "hdf5_data_param", "image_data_param",
                                  "window_data_param")

# UpgradeV0LayerParameter: V0 field -> {V0 type: (V1 sub-message, field)}.
_V0_FIELDS: dict[str, dict[str | None, tuple[str, str]]] = {
    "num_output": {"conv": (_CONV, "num_output"), "innerproduct": (_IP, "num_output")},
    "biasterm": {"conv": (_CONV, "bias_term"), "innerproduct": (_IP, "bias_term")},
    "weight_filler": {"conv": (_CONV, "weight_filler"), "innerproduct": (_IP, "weight_filler")},
    "bias_filler": {"conv": (_CONV, "bias_filler"), "innerproduct": (_IP, "bias_filler")},
    "pad": {"conv": (_CONV, "pad"), "pool": (_POOL, "pad")},
    "kernelsize": {"conv": (_CONV, "kernel_size"), "pool": (_POOL, "kernel_size")},
    "group": {"conv": (_CONV, "group")},
    "stride": {"conv": (_CONV, "stride"), "pool": (_POOL, "stride")},
    "pool": {"pool": (_POOL, "pool")},
    "dropout_ratio": {"dropout": ("dropout_param", "dropout_ratio")},
    **{f: {"lrn": ("lrn_param", f)} for f in ("local_size", "alpha", "beta", "k")},
    "source": {"data": (_DATA, "source"), "hdf5_data": (_HDF5, "source"),
               "images": (_IMAGES, "source"), "window_data": (_WINDOW, "source"),
               "infogain_loss": ("infogain_loss_param", "source")},
    "scale": {None: ("transform_param", "scale")},
    "meanfile": {None: ("transform_param", "mean_file")},
    "batchsize": {"data": (_DATA, "batch_size"), "hdf5_data": (_HDF5, "batch_size"),
                  "images": (_IMAGES, "batch_size"), "window_data": (_WINDOW, "batch_size")},
    "cropsize": {None: ("transform_param", "crop_size")},
    "mirror": {None: ("transform_param", "mirror")},
    "rand_skip": {"data": (_DATA, "rand_skip"), "images": (_IMAGES, "rand_skip")},
    "shuffle_images": {"images": (_IMAGES, "shuffle")},
    "new_height": {"images": (_IMAGES, "new_height")},
    "new_width": {"images": (_IMAGES, "new_width")},
    "concat_dim": {"concat": ("concat_param", "concat_dim")},
    "det_fg_threshold": {"window_data": (_WINDOW, "fg_threshold")},
    "det_bg_threshold": {"window_data": (_WINDOW, "bg_threshold")},
    "det_fg_fraction": {"window_data": (_WINDOW, "fg_fraction")},
    "det_context_pad": {"window_data": (_WINDOW, "context_pad")},
    "det_crop_mode": {"window_data": (_WINDOW, "crop_mode")},
    "hdf5_output_param": {"hdf5_output": ("hdf5_output_param", "")},
}

# V1 data layers whose own scale/mean_file/crop_size/mirror moved to transform_param.
_DATA_TRANSFORM = {"DATA": _DATA, "IMAGE_DATA": _IMAGES, "WINDOW_DATA": _WINDOW}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")

# Every V1 *_param message is carried over to the V2 field of the same name.
_V1_PARAMS = tuple(f.name for f in V1Layer.DESCRIPTOR.fields
                   if f.name.endswith("_param") and f.message_type is not None)

_SOLVER_TYPES = {"SGD": "SGD", "NESTEROV": "Nesterov", "ADAGRAD": "AdaGrad",
                 "RMSPROP": "RMSProp", "ADADELTA": "AdaDelta", "ADAM": "Adam"}


def _error(path: str | Path | None, layer: str, message: str) -> FormatError:
    return FormatError(path, f"layer '{layer}': {message}")


def upgrade_net(net: caffe_pb2.NetParameter, path: str | Path | None = None
                ) -> caffe_pb2.NetParameter:
    """Upgrade ``net`` in place to the current format and return it (``path`` names errors)."""
    if net.layer and net.layers:
        # Caffe keeps only the V1 'layers' and silently loses the others (BVLC/caffe#3381).
        raise FormatError(path, f"mixes {len(net.layer)} new 'layer' and {len(net.layers)} "
                                "V1 'layers' entries; Caffe would drop the 'layer' ones. "
                                "Use one form (upgrade the V1 part with 'caffe2torch upgrade-net')")
    if any(conn.HasField("layer") for conn in net.layers):
        _upgrade_v0(net, path)
    _upgrade_data_transform(net)
    if net.layers:
        _upgrade_v1(net, path)
    _upgrade_input(net)
    _upgrade_batch_norm(net)
    return net


def _upgrade_v0(net: caffe_pb2.NetParameter, path: str | Path | None) -> None:
    """UpgradeV0Net: only name, layers, input, input_dim and force_backward survive."""
    layers = _fold_padding(net, path)
    out = caffe_pb2.NetParameter()
    if net.HasField("name"):
        out.name = net.name
    for conn in layers:
        _v0_to_v1(conn, out.layers.add(), path)
    out.input.extend(net.input)
    out.input_dim.extend(net.input_dim)
    if net.HasField("force_backward"):
        out.force_backward = net.force_backward
    net.CopyFrom(out)


def _fold_padding(net: caffe_pb2.NetParameter, path: str | Path | None) -> list[V1Layer]:
    """UpgradeV0PaddingLayers: drop 'padding' layers, giving their pad to the conv/pool after."""
    last_top: dict[str, int] = {name: -1 for name in net.input}
    kept: list[V1Layer] = []
    for i, conn in enumerate(net.layers):
        if conn.layer.type != "padding":
            kept.append(V1Layer())
            kept[-1].CopyFrom(conn)
        for j, bottom in enumerate(conn.bottom):
            if bottom not in last_top:
                raise _error(path, conn.layer.name, f"unknown bottom blob '{bottom}'")
            source = net.layers[last_top[bottom]] if last_top[bottom] >= 0 else None
            if source is None or source.layer.type != "padding":
                continue
            if conn.layer.type not in ("conv", "pool"):
                raise _error(path, conn.layer.name, "a padding layer feeds a layer of type "
                                                    f"'{conn.layer.type}' (only conv or pool)")
            if len(conn.bottom) != 1 or len(source.bottom) != 1 or len(source.top) != 1:
                raise _error(path, source.layer.name, "a padding layer and the conv/pool it "
                                                      "feeds must have one bottom and one top")
            kept[-1].layer.pad = source.layer.pad
            kept[-1].bottom[j] = source.bottom[0]
        for top in conn.top:
            last_top[top] = i
    return kept


def _v0_to_v1(conn: V1Layer, out: V1Layer, path: str | Path | None) -> None:
    """UpgradeV0LayerParameter: the flat V0 settings into the V1 sub-messages."""
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return
    v0 = conn.layer
    if v0.HasField("name"):
        out.name = v0.name
    if v0.HasField("type"):
        if v0.type not in _V0_TYPES:
            raise _error(path, v0.name, f"unknown V0 layer type '{v0.type}'")
        out.type = V1Layer.LayerType.Value(_V0_TYPES[v0.type])
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for field, targets in _V0_FIELDS.items():
        if not v0.HasField(field):
            continue
        target = targets.get(None) or targets.get(v0.type)
        if target is None:
            log.warning("%s: layer '%s': V0 setting '%s' has no meaning for type '%s'; dropped "
                        "(as Caffe does)", path or "<net>", v0.name, field, v0.type)
            continue
        value = getattr(v0, field)
        if field == "pool":
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(V0Layer.PoolMethod.Name(value))
        _put(getattr(out, target[0]), target[1], value)


def _put(message: _message.Message, field: str, value) -> None:
    """Set (or append to, for repeated fields) ``message.field``; '' means the message itself."""
    if not field:
        message.CopyFrom(value)
    elif message.DESCRIPTOR.fields_by_name[field].message_type is not None:
        getattr(message, field).CopyFrom(value)
    elif message.DESCRIPTOR.fields_by_name[field].is_repeated:
        getattr(message, field).append(value)
    else:
        setattr(message, field, value)


def _upgrade_data_transform(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetDataTransformation: V1 data layers' transform settings to transform_param.

    As in Caffe, once any layer needs it, every data layer gets both messages (maybe empty).
    """
    data_layers = [(conn, _DATA_TRANSFORM[V1Layer.LayerType.Name(conn.type)])
                   for conn in net.layers if V1Layer.LayerType.Name(conn.type) in _DATA_TRANSFORM]
    if not any(getattr(conn, field).HasField(name) for conn, field in data_layers
               for name in _TRANSFORM_FIELDS):
        return
    for conn, field in data_layers:
        params = getattr(conn, field)
        params.SetInParent()
        conn.transform_param.SetInParent()
        for name in _TRANSFORM_FIELDS:
            if params.HasField(name):
                setattr(conn.transform_param, name, getattr(params, name))
                params.ClearField(name)


def _upgrade_v1(net: caffe_pb2.NetParameter, path: str | Path | None) -> None:
    """UpgradeV1Net: every ``layers`` entry becomes a ``layer``; other net fields are kept."""
    layers = [_v1_to_v2(conn, path) for conn in net.layers]
    net.ClearField("layers")
    net.layer.extend(layers)


def _v1_to_v2(v1: V1Layer, path: str | Path | None) -> caffe_pb2.LayerParameter:
    """UpgradeV1LayerParameter."""
    layer = caffe_pb2.LayerParameter()
    layer.bottom.extend(v1.bottom)
    layer.top.extend(v1.top)
    if v1.HasField("name"):
        layer.name = v1.name
    layer.include.extend(v1.include)
    layer.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        enum = V1Layer.LayerType.Name(v1.type)
        if enum not in V1_TYPES:
            raise _error(path, v1.name, f"unknown V1 layer type {enum}")
        layer.type = V1_TYPES[enum]
    else:   # a binary file's enum number that the schema lacks lands among unknown fields
        for unknown in UnknownFieldSet(v1):
            if unknown.field_number == V1Layer.DESCRIPTOR.fields_by_name["type"].number:
                raise _error(path, v1.name, f"unknown V1 layer type number {unknown.data}")
    layer.blobs.extend(v1.blobs)

    def spec(i: int) -> caffe_pb2.ParamSpec:
        while len(layer.param) <= i:
            layer.param.add()
        return layer.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(
            V1Layer.DimCheckMode.Name(mode))
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    layer.loss_weight.extend(v1.loss_weight)
    for field in _V1_PARAMS:
        if v1.HasField(field):
            getattr(layer, field).CopyFrom(getattr(v1, field))
    if v1.HasField("layer"):
        log.warning("%s: layer '%s' holds a V0 layer as well; ignored (as Caffe does)",
                    path or "<net>", v1.name)
    return layer


def _upgrade_input(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetInput: legacy inputs become one leading Input layer named 'input'.

    A bare ``input:`` without shapes or dims is only dropped, as in Caffe.
    """
    if not net.input:
        return
    if net.input_shape or net.input_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        layer.top.extend(net.input)
        for i in range(len(net.input)):
            shape = layer.input_param.shape.add()
            if net.input_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layers = [layer, *net.layer]
        net.ClearField("layer")
        net.layer.extend(layers)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def _upgrade_batch_norm(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetBatchNorm: the old 3-param BatchNorm form gets lr_mult = decay_mult = 0."""
    for layer in net.layer:
        if layer.type == "BatchNorm" and len(layer.param) == 3:
            for spec in layer.param:
                spec.lr_mult = 0
                spec.decay_mult = 0


def upgrade_solver(solver: caffe_pb2.SolverParameter, path: str | Path | None = None
                   ) -> caffe_pb2.SolverParameter:
    """Upgrade ``solver`` in place: the deprecated ``solver_type`` enum becomes ``type``."""
    if not solver.HasField("solver_type"):
        return solver
    if solver.HasField("type"):
        raise FormatError(path, "sets both the old 'solver_type' (enum) and the new 'type' "
                                "(string); keep only 'type'")
    solver.type = _SOLVER_TYPES[caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)]
    solver.ClearField("solver_type")
    return solver
