"""Prototxt text <-> messages, with errors that name the file, line, column and token."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

from google.protobuf import message as _message
from google.protobuf import text_format

from ..errors import FormatError, Location

M = TypeVar("M", bound=_message.Message)

_ERROR_POS = re.compile(r"^(\d+):(\d+) : (.*)$", re.S)
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[A-Za-z_][\w.]*|[{}<>]|\n|.', re.S)


def read_text(path: str | Path) -> str:
    """The file's text; a missing, unreadable or binary file is a clear error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FormatError(path, "no such file") from None
    except IsADirectoryError:
        raise FormatError(path, "is a directory, expected a prototxt file") from None
    except OSError as exc:
        raise FormatError(path, f"cannot be read ({exc.strerror})") from None
    if not raw.strip():
        raise FormatError(path, "is empty, expected a prototxt text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(path, "is not a text file (is it a binary .caffemodel or .binaryproto? "
                                "expected a prototxt)") from None


def parse_text(text: str, message: M, path: str | Path | None = None) -> M:
    """Merge prototxt ``text`` into ``message``; syntax errors name file, line, column, token."""
    try:
        text_format.Merge(text, message, allow_unknown_extension=False)
    except text_format.ParseError as exc:
        raise _located_error(text, exc, message, path) from None
    return message


def _located_error(text: str, exc: text_format.ParseError, message: _message.Message,
                   path: str | Path | None) -> FormatError:
    line, column, detail = exc.GetLine(), exc.GetColumn(), str(exc)
    match = _ERROR_POS.match(detail)
    if match:
        line, column, detail = int(match.group(1)), int(match.group(2)), match.group(3)
    token = ""
    if line:
        lines = text.splitlines()
        if 0 < line <= len(lines):
            rest = lines[line - 1][max(column - 1, 0):]
            token = rest.split()[0] if rest.split() else ""
    where = Location(None if path is None else str(path), line or None, column or None)
    what = message.DESCRIPTOR.name
    extra = f" (at '{token}')" if token else ""
    return FormatError(path, f"cannot parse as {what}: {detail}{extra}", location=where)


def read_message(path: str | Path, message: M) -> M:
    """Read a prototxt file into ``message``."""
    return parse_text(read_text(path), message, path)


def layer_lines(text: str) -> list[int]:
    """1-based line of each top-level ``layer``/``layers`` block, in file order.

    Used to point errors at the prototxt line of a layer; protobuf's parser keeps no
    positions, so this scans tokens (skipping strings and comments) and tracks depth.
    """
    lines: list[int] = []
    depth, line = 0, 1
    pending: int | None = None
    for token in _TOKEN.findall(text):
        if token == "\n":
            line += 1
            continue
        if token[0] in "\"'":
            line += token.count("\n")
            pending = None
            continue
        if token[0] == "#" or token.isspace() or token == ":":
            continue
        if token in "{<":
            if pending is not None and depth == 0:
                lines.append(pending)
            depth += 1
            pending = None
        elif token in "}>":
            depth -= 1
            pending = None
        else:
            pending = line if depth == 0 and token in ("layer", "layers") else None
    return lines


def to_text(message: _message.Message) -> str:
    """Prototxt text of ``message`` in Caffe's layout."""
    return text_format.MessageToString(message)
