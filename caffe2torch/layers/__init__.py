"""Caffe layer implementations, one small module per layer or family.

Every module in this package registers its classes with :func:`register` when
imported; importing the package imports them all, so the registry is complete.

The package doubles as pycaffe's ``caffe.layers`` (net_spec's layer factory, as in
``from caffe import layers as L``): any other public name, e.g. ``layers.Convolution``,
is :data:`caffe2torch.net_spec.layers`'s function for that layer type.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import CaffeLayer, LayerSpec
from .registry import get_layer_class, layer_type_list, register

__all__ = ["CaffeLayer", "LayerSpec", "get_layer_class", "layer_type_list", "register"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    """pycaffe's ``layers.<Type>(...)`` for names this package does not define."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from ..net_spec import layers
    return getattr(layers, name)
