"""pycaffe's ``caffe.net_spec``: write nets in Python, get the NetParameter pycaffe would.

``layers.Convolution(bottom, kernel_size=3, ...)`` returns a :class:`Top` (or a tuple of
``ntop`` tops, or the :class:`Function` itself for ``ntop=0``); ``NetSpec`` names tops by
attribute assignment; ``to_proto`` walks the graph depth-first from the requested tops.
Names, order and field assignment follow BVLC's net_spec.py exactly, so prototxts generated
for Caffe's examples come out the same:

* unnamed tops get ``<Type><n>`` (a counter per type); a layer is named after its first top;
* ``in_place=True`` makes the tops the bottoms; ``ntop`` sets the number of tops;
* a keyword ending in ``param`` sets that LayerParameter field; others go to the type's
  ``<type>_param`` message when it has the field, else to the LayerParameter;
* dicts become messages, lists repeated fields, and a scalar for a repeated field a list
  of one (``loss_weight=1``, ``include=dict(phase=caffe.TRAIN)``).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Callable

from .proto import caffe_pb2

Names = dict[Any, str]


def param_name_dict() -> dict[str, str]:
    """Layer type -> its parameter field stem (``"InnerProduct"`` -> ``"inner_product"``),
    from the ``*_param`` fields of LayerParameter, as pycaffe derives it."""
    result = {}
    for field in caffe_pb2.LayerParameter.DESCRIPTOR.fields:
        if field.name.endswith("_param") and field.message_type is not None:
            type_name = field.message_type.name
            if type_name.endswith("Parameter"):
                result[type_name[:-len("Parameter")]] = field.name[:-len("_param")]
    return result


def to_proto(*tops: "Top") -> caffe_pb2.NetParameter:
    """A NetParameter with every layer needed to compute ``tops``."""
    layers: OrderedDict[Function, caffe_pb2.LayerParameter] = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def assign_proto(proto: Any, name: str, val: Any) -> None:
    """Assign a Python value to field ``name`` of ``proto``: dicts recurse into messages,
    lists extend repeated fields (dicts add messages), scalars for repeated fields are
    wrapped in a list."""
    is_repeated_field = hasattr(getattr(proto, name), "extend")
    if is_repeated_field and not isinstance(val, list):
        val = [val]
    if isinstance(val, list):
        if val and isinstance(val[0], dict):
            for item in val:
                proto_item = getattr(proto, name).add()
                for k, v in item.items():
                    assign_proto(proto_item, k, v)
        else:
            getattr(proto, name).extend(val)
    elif isinstance(val, dict):
        for k, v in val.items():
            assign_proto(getattr(proto, name), k, v)
    else:
        setattr(proto, name, val)


class Top:
    """One output blob of a layer (output ``n`` of ``fn``)."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> caffe_pb2.NetParameter:
        """A NetParameter with every layer needed to compute this top."""
        return to_proto(self)

    def _to_proto(self, layers, names: Names, autonames: Counter) -> None:
        self.fn._to_proto(layers, names, autonames)


class Function:
    """One layer: its type, its input tops and its parameters."""

    def __init__(self, type_name: str, inputs: tuple[Top, ...], params: dict[str, Any]):
        self.type_name = type_name
        self.inputs = inputs
        self.params = dict(params)
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names: Names, autonames: Counter) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top: Top, names: Names, autonames: Counter) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _to_proto(self, layers, names: Names, autonames: Counter) -> None:
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        for k, v in self.params.items():
            if k.endswith("param"):  # generic *_param (and 'param') fields of the layer
                assign_proto(layer, k, v)
                continue
            try:
                assign_proto(getattr(layer, _param_names[self.type_name] + "_param"), k, v)
            except (AttributeError, KeyError):
                assign_proto(layer, k, v)
        layers[self] = layer


class NetSpec:
    """Named tops: ``n.conv1 = layers.Convolution(n.data, ...)``; ``n.to_proto()`` names
    each assigned top (and the layer producing it) by its attribute name."""

    def __init__(self) -> None:
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value: Top | Function) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str) -> Top | Function:
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value: Top | Function) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str) -> Top | Function:
        return self.tops[item]

    def __delitem__(self, name: str) -> None:
        del self.tops[name]

    def keys(self) -> list[str]:
        return list(self.tops)

    def vals(self) -> list[Top | Function]:
        return list(self.tops.values())

    def to_proto(self) -> caffe_pb2.NetParameter:
        names: Names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: OrderedDict[Function, caffe_pb2.LayerParameter] = OrderedDict()
        for top in self.tops.values():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``layers.AnyType(*bottoms, **params)``: a layer of Caffe type ``AnyType``."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args: Top, **kwargs: Any):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        return layer_fn


class Parameters:
    """``params.Pooling.MAX``: enum values of ``<Type>Parameter`` messages."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        message = getattr(caffe_pb2, name + "Parameter")

        class Param:
            def __getattr__(self, param_name: str) -> Any:
                return getattr(message, param_name)
        return Param()


_param_names = param_name_dict()
layers = Layers()
params = Parameters()

__all__ = ["Function", "Layers", "NetSpec", "Parameters", "Top", "assign_proto", "layers",
           "param_name_dict", "params", "to_proto"]
