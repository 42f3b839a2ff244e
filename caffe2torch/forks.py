"""Which Caffe fork's numbers a layer reproduces where forks and BVLC disagree.

A few layers exist in BVLC Caffe and in a fork with the same type name, the same
prototxt fields and different results (e.g. the SSD fork's ``Accuracy`` breaks score
ties by class index). BVLC's behaviour is the default; a fork's is selected here, for
nets built while the setting is in effect:

* ``caffe2torch.forks.set_fork("ssd")`` (``None`` goes back to BVLC),
* ``with caffe2torch.forks.using_fork("ssd"): net = caffe.Net(...)``,
* the environment variable ``CAFFE2TORCH_FORK=ssd`` (read when no fork was set).

Layers read the setting once, when they are built, so a compiled net keeps the
numbers it was built for. Layers that only a fork has (PriorBox, ...) need no switch,
unless two forks disagree on them: ``"faceboxes"`` gives FaceBoxes' PriorBox (dense
anchors for min_size 32 and 64, half-pixel-smaller boxes) instead of SSD's.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

ENV_VAR = "CAFFE2TORCH_FORK"
KNOWN_FORKS = ("ssd", "faceboxes")

_UNSET = object()
_selected: object = _UNSET


def _check(name: str | None) -> str | None:
    if name is not None and name not in KNOWN_FORKS:
        raise ValueError(f"unknown Caffe fork {name!r}: expected one of {list(KNOWN_FORKS)} "
                         f"or None (BVLC)")
    return name


def set_fork(name: str | None) -> None:
    """Make layers built from now on reproduce fork ``name`` (None: BVLC Caffe)."""
    global _selected
    _selected = _check(name)


def current_fork() -> str | None:
    """The fork selected by :func:`set_fork`, else by $CAFFE2TORCH_FORK, else None (BVLC)."""
    if _selected is not _UNSET:
        return _selected  # type: ignore[return-value]
    return _check(os.environ.get(ENV_VAR) or None)


@contextmanager
def using_fork(name: str | None) -> Iterator[None]:
    """Select fork ``name`` for the nets built inside the ``with`` block."""
    global _selected
    previous = _selected
    set_fork(name)
    try:
        yield
    finally:
        _selected = previous
