"""``import caffe`` without Caffe: caffe2torch installed under pycaffe's module names.

Three ways in:

* ``caffe2torch pyrun script.py ARGS``: runs an unchanged pycaffe script (``import caffe``)
  as ``__main__`` with ``sys.argv = [script.py, ARGS...]`` and the script's folder first on
  ``sys.path``, as ``python script.py ARGS`` would.
* :func:`install_caffe_alias` for embedding: after it, ``import caffe``,
  ``from caffe.proto import caffe_pb2``, ``import caffe.io`` etc. give caffe2torch.
* Automatically when a net with a ``Python`` layer is built, so the layer's module can say
  ``import caffe``; that path leaves an already imported ``caffe`` alone.

The alias is caffe2torch itself: ``caffe`` is the ``caffe2torch`` package and ``caffe.X`` is
``caffe2torch.X`` for every loaded submodule (``caffe.proto.caffe_pb2``, ``caffe.io``,
``caffe.net_spec``, ``caffe.draw``, ...), plus ``caffe.pycaffe`` and ``caffe._caffe`` (where
pycaffe defines ``Net`` and the solvers) as the package. One module object per name, so
protobuf classes and ``isinstance`` checks agree whichever name a script uses.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Sequence

from .errors import FormatError

_PACKAGE_ALIASES = ("caffe", "caffe.pycaffe", "caffe._caffe")


def install_caffe_alias(replace: bool = True) -> None:
    """Make ``import caffe`` (and its submodules) import caffe2torch.

    ``replace=False`` leaves an already imported ``caffe`` module in place (the Python-layer
    path); by default an earlier ``caffe`` (e.g. the real pycaffe) is replaced for later
    imports.
    """
    import caffe2torch

    current = sys.modules.get("caffe")
    if current is caffe2torch or (current is not None and not replace):
        return
    for name in list(sys.modules):
        if name.startswith("caffe.") or name == "caffe":
            del sys.modules[name]
    for alias in _PACKAGE_ALIASES:
        sys.modules[alias] = caffe2torch
    prefix = "caffe2torch."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and module is not None:
            sys.modules["caffe." + name[len(prefix):]] = module


def run_script(script: str | Path, args: Sequence[str] = ()) -> None:
    """Run a pycaffe script unchanged, as ``python script ARGS`` with ``caffe`` = caffe2torch."""
    path = Path(script)
    if not path.is_file():
        raise FormatError(path, "no such script")
    install_caffe_alias()
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
