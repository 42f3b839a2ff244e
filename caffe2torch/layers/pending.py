"""Caffe data layers that caffe2torch recognises but does not implement yet.

Each gets a placeholder whose constructor raises a clear error, so a prototxt using
one fails with "not implemented yet" instead of "unknown layer type". A type that a
real implementation already registers is left alone: the sibling modules are imported
first, so module order cannot make a placeholder shadow the real layer.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from .base import CaffeLayer, LayerSpec
from .registry import layer_type_list, register

# type name -> V1 enum name (None: no V1 spelling)
_PENDING: dict[str, str | None] = {
    "Python": None,
}


class PendingLayer(CaffeLayer):
    """Placeholder for a recognised Caffe layer type without an implementation yet."""

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        raise self.error(
            f"the {self.caffe_type} layer is recognised but not implemented yet in caffe2torch; "
            f"feed its top blob(s) through an Input layer (net inputs) instead, or register an "
            f"implementation with @caffe2torch.layers.register('{self.caffe_type}', replace=True)")


def _register_placeholders() -> None:
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in ("base", "registry", "pending"):
            importlib.import_module(f"{package}.{module.name}")
    implemented = set(layer_type_list())
    for type_name, alias in _PENDING.items():
        if type_name not in implemented:
            cls = type(f"Pending{type_name}", (PendingLayer,),
                       {"__doc__": f"Placeholder: Caffe's {type_name} layer is not implemented yet."})
            register(type_name, *([alias] if alias else []))(cls)


_register_placeholders()
