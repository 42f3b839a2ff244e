"""Caffe layer implementations, one small module per layer or family.

Every module in this package registers its classes with :func:`register` when
imported; importing the package imports them all, so the registry is complete.
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
