"""The one registry that maps Caffe layer type names to PyTorch modules.

Built-in layers register themselves with :func:`register`; users add their own the
same way, so a prototxt naming a custom type compiles without touching caffe2torch.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from ..errors import NetError

_REGISTRY: dict[str, type] = {}
# The V2 type names (aliases such as V1 enum names like "CONVOLUTION" are not listed).
_TYPE_NAMES: set[str] = set()

T = TypeVar("T", bound=type)


def register(type_name: str, *aliases: str, replace: bool = False) -> Callable[[T], T]:
    """Class decorator: make ``cls`` the implementation of Caffe type ``type_name``.

    ``aliases`` are extra spellings (V1 enum names, fork spellings). A second
    registration of the same name is an error unless ``replace`` is true, so a
    typo cannot silently shadow a built-in layer.
    """

    def decorate(cls: T) -> T:
        for name in (type_name, *aliases):
            if name in _REGISTRY and not replace and _REGISTRY[name] is not cls:
                raise ValueError(f"layer type '{name}' is already registered "
                                 f"({_REGISTRY[name].__qualname__}); pass replace=True to override")
            _REGISTRY[name] = cls
        _TYPE_NAMES.add(type_name)
        cls.caffe_type = type_name
        return cls

    return decorate


def get_layer_class(type_name: str, *, layer: str | None = None, location=None) -> type:
    """The module class for ``type_name``; a clear error says how to add a missing one."""
    try:
        return _REGISTRY[type_name]
    except KeyError:
        raise NetError(
            f"unknown layer type '{type_name}'. Register an implementation with "
            f"@caffe2torch.layers.register('{type_name}') on a caffe2torch.layers.CaffeLayer "
            f"subclass before loading the net",
            layer=layer, layer_type=type_name, location=location) from None


def layer_type_list() -> list[str]:
    """Registered V2 type names, sorted (pycaffe's ``caffe.layer_type_list()``)."""
    return sorted(_TYPE_NAMES)
