"""The ``caffe2torch`` command line: Caffe's tools as subcommands.

Each subcommand is one entry of :data:`COMMANDS`: a help line, a function that declares its
arguments and a function that runs it; add a tool by adding an entry. Caffe's gflags
spellings work next to GNU ones: ``-solver x``, ``-solver=x``, ``--solver x`` and
``--solver=x`` are the same (see :func:`normalise_argv`); declare flags with Caffe's
underscore names (``--sigint_effect``), and ``--sigint-effect`` works too.

A :class:`~caffe2torch.errors.CaffeError` ends the command with one line
``caffe2torch: error: <message>`` on stderr and exit status 1, without a traceback.
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from .caffe_alias import run_script
from .caffe_tool import COMMANDS as CAFFE_COMMANDS
from .dataset_tools import COMMANDS as DATASET_COMMANDS
from .errors import CaffeError
from .formats import read_message, to_text, upgrade_net, upgrade_solver
from .formats.atomic import atomic_write_bytes
from .formats.caffemodel import map_file, parse_net_binary
from .formats.text import looks_like_text
from .proto import caffe_pb2

PROG = "caffe2torch"
_LONG_FLAG = re.compile(r"^--?([A-Za-z][A-Za-z0-9_-]+)(=.*)?$", re.S)


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its argument declarations and what it runs.

    ``passthrough``: everything after the command's first argument belongs to someone else
    (the script ``pyrun`` runs) and is not rewritten by :func:`normalise_argv`.
    """

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    passthrough: bool = False


def normalise_argv(argv: Sequence[str]) -> list[str]:
    """Rewrite gflags-style ``-name[=value]`` to ``--name[=value]`` and ``-`` in flag names
    to ``_``, so argparse sees one spelling. Single letters (``-h``), negative numbers and
    everything after ``--`` are left alone."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        match = _LONG_FLAG.match(arg)
        if match:
            arg = "--" + match.group(1).replace("-", "_") + (match.group(2) or "")
        out.append(arg)
    return out


def _in_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="file to read")
    parser.add_argument("output", help="file to write (atomically)")


def _report(args: argparse.Namespace, old: object, new: object) -> None:
    state = "upgraded" if old != new else "already in the latest format; re-wrote"
    print(f"{PROG}: {args.input}: {state} -> {args.output}", file=sys.stderr)


def upgrade_net_command(args: argparse.Namespace, binary: bool | None = None) -> int:
    """Caffe's upgrade_net_proto_text / _binary: text in, text out; binary in, binary out
    (``binary`` None: decided by the input's content)."""
    if binary is None:
        binary = not looks_like_text(bytes(map_file(args.input, "a net prototxt or "
                                                                 ".caffemodel")[:4096]))
    if binary:
        raw = bytes(map_file(args.input, "a binary .caffemodel"))
        net = parse_net_binary(raw, args.input)
        old = net.SerializeToString()
        atomic_write_bytes(args.output, upgrade_net(net, args.input).SerializeToString())
        _report(args, old, net.SerializeToString())
    else:
        net = read_message(args.input, caffe_pb2.NetParameter())
        old = to_text(net)
        atomic_write_bytes(args.output, to_text(upgrade_net(net, args.input)).encode())
        _report(args, old, to_text(net))
    return 0


def upgrade_solver_command(args: argparse.Namespace) -> int:
    """Caffe's upgrade_solver_proto_text: the solver_type enum becomes the type string."""
    solver = read_message(args.input, caffe_pb2.SolverParameter())
    old = to_text(solver)
    atomic_write_bytes(args.output, to_text(upgrade_solver(solver, args.input)).encode())
    _report(args, old, to_text(solver))
    return 0


def _pyrun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("script", help="a pycaffe script (it may 'import caffe')")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")


def pyrun_command(args: argparse.Namespace) -> int:
    """Run an unchanged pycaffe script with ``caffe`` = caffe2torch (see caffe_alias)."""
    run_script(args.script, args.args)
    return 0


COMMANDS: dict[str, Command] = {
    "upgrade-net": Command("upgrade an old (V0/V1, legacy input) net: a prototxt to a "
                           "prototxt, a binary .caffemodel to a .caffemodel",
                           _in_out, upgrade_net_command),
    "upgrade_net_proto_text": Command("upgrade an old net prototxt (Caffe's tool name)",
                                      _in_out, partial(upgrade_net_command, binary=False)),
    "upgrade_net_proto_binary": Command("upgrade an old binary .caffemodel (Caffe's tool name)",
                                        _in_out, partial(upgrade_net_command, binary=True)),
    "upgrade-solver": Command("upgrade an old solver prototxt (solver_type enum -> type)",
                              _in_out, upgrade_solver_command),
    "upgrade_solver_proto_text": Command("upgrade an old solver prototxt (Caffe's tool name)",
                                         _in_out, upgrade_solver_command),
    "pyrun": Command("run a pycaffe script unchanged: 'import caffe' gives caffe2torch "
                     "(pyrun script.py ARGS...)", _pyrun_arguments, pyrun_command,
                     passthrough=True),
    **{name: Command(*spec) for name, spec in CAFFE_COMMANDS.items()},
    **{name: Command(*spec) for name, spec in DATASET_COMMANDS.items()},
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog=PROG, description="Caffe's tools on PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        child = sub.add_parser(name, help=command.help, description=command.help)
        command.arguments(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0]) if argv else None
    keep = 2 if command is not None and command.passthrough else len(argv)
    args = build_parser().parse_args(normalise_argv(argv[:keep]) + argv[keep:])
    try:
        return int(args.run(args) or 0)
    except CaffeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
