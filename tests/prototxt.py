"""Tiny prototxt builders shared by the layer tests."""
from __future__ import annotations


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
