"""Tiny prototxt builders, and a forward runner, shared by the layer tests."""
from __future__ import annotations

import numpy as np

import caffe2torch as caffe


def inputs(**shapes: tuple[int, ...]) -> str:
    """Input layers, one per keyword, with those shapes."""
    return "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in shape) + " } } }\n"
        for name, shape in shapes.items())


def layer(type_: str, bottoms: list[str], tops: list[str], extra: str = "", name: str = "L") -> str:
    """One layer message with the given bottoms, tops and extra fields."""
    return (f'layer {{ name: "{name}" type: "{type_}" '
            + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
            + " ".join(f'top: "{t}"' for t in tops) + f" {extra} }}\n")


def forward(net: caffe.Net, feed: dict[str, np.ndarray], top: str = "y") -> np.ndarray:
    """Reshape and fill the inputs in ``feed``, run the net, return a copy of ``top``."""
    for name, value in feed.items():
        net.blobs[name].reshape(*value.shape)
        net.blobs[name].data[...] = value
    net.reshape()
    net.forward()
    return net.blobs[top].data.copy()
