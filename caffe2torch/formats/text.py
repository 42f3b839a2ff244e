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
_CONTROL = re.compile(rb"[\x00-\x08\x0e-\x1f\x7f]")
_ERROR_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|[^\s{}<>:;,\[\]"\']+|[^\s]')
_COMMENT = re.compile(r"#[^\n]*")
_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[A-Za-z_][\w.]*|[{}<>]|\n|.', re.S)


def looks_like_text(head: bytes) -> bool:
    """Whether the first bytes of a file hold no control characters, as text does.

    Binary protobuf files (.caffemodel, .binaryproto, .solverstate) start with field keys
    and lengths such as 0x08, 0x12 or 0xa2 0x06, so they show one within a few bytes.
    """
    return not _CONTROL.search(head)


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
    if not looks_like_text(raw[:4096]):
        raise FormatError(path, "is a binary file (a .caffemodel, .binaryproto or "
                                ".solverstate?), expected a prototxt text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")    # e.g. GBK comments: Caffe's parser takes any bytes


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
    lines = text.split("\n")
    if line and 0 < line <= len(lines):
        source = lines[line - 1]
        for quoted in (source, source.rstrip("\r")):     # protobuf quotes the line in some errors
            if detail.startswith(f"'{quoted}': "):
                detail = detail[len(quoted) + 4:]
                break
        offset = sum(len(text_line) + 1 for text_line in lines[:line - 1]) + max(column - 1, 0)
        found = _ERROR_TOKEN.search(text, offset)
        if found:
            rest = _COMMENT.sub("", text[found.end():])
            eof = not rest.strip() and detail.startswith("Expected")
            token = "end of file" if eof else f"'{found.group(0)}'"
    where = Location(None if path is None else str(path), line or None, column or None)
    what = message.DESCRIPTOR.name
    extra = f" (at {token})" if token else ""
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
