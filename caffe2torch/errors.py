"""Errors that tell a Caffe user exactly what is wrong and where.

Every error raised for bad user input derives from :class:`CaffeError`, so callers
(and the CLI) can catch one type and print a message that names the file, line,
layer and blob involved instead of a bare traceback.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Location:
    """Where a thing was defined: a file and (optionally) a 1-based line and column."""

    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.file or "<string>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


class CaffeError(Exception):
    """Base class of every user-facing caffe2torch error."""


class FormatError(CaffeError, ValueError):
    """A file is missing, truncated, corrupt or not of the expected kind."""

    def __init__(self, path: str | Path | None, message: str, location: Location | None = None):
        self.path = None if path is None else str(path)
        self.location = location
        where = str(location) if location is not None else (self.path or "<string>")
        super().__init__(f"{where}: {message}")


class NetError(CaffeError, ValueError):
    """A net definition is inconsistent: names the layer, its type and where it was defined."""

    def __init__(self, message: str, layer: str | None = None, layer_type: str | None = None,
                 location: Location | None = None):
        self.layer = layer
        self.layer_type = layer_type
        self.location = location
        prefix = ""
        if location is not None:
            prefix += f"{location}: "
        if layer is not None:
            prefix += f"layer '{layer}'" + (f" ({layer_type})" if layer_type else "") + ": "
        super().__init__(prefix + message)
