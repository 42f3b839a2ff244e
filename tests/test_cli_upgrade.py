"""``caffe2torch upgrade-net`` / ``upgrade-solver`` against real Caffe's upgraded files,
and the command line's shared behaviour (gflags spellings, one-line errors)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

from caffe2torch.cli import COMMANDS, Command, main, normalise_argv
from caffe2torch.proto import caffe_pb2
from conftest import REPO_ROOT
from golden import cases, shared_root

_COMMAND = {"upgrade_net_proto_text": "upgrade-net", "upgrade_net_proto_binary": "upgrade-net",
            "upgrade_solver_proto_text": "upgrade-solver"}


def _case(case: str) -> tuple[Path, dict]:
    folder = shared_root() / "golden" / "formats" / case
    return folder, json.loads((folder / "case.json").read_text())


def _assert_matches_caffe(out: Path, folder: Path, spec: dict) -> None:
    expected = folder / spec["upgraded"]
    if spec["tool"].endswith("binary"):
        assert out.read_bytes() == expected.read_bytes()
        return
    kind = caffe_pb2.SolverParameter if "solver" in spec["tool"] else caffe_pb2.NetParameter
    assert text_format.Parse(out.read_text(), kind()) == text_format.Parse(expected.read_text(),
                                                                           kind())


@pytest.mark.parametrize("case", cases("formats"))
def test_upgrade_command_matches_caffe(case: str, tmp_path: Path, capsys) -> None:
    folder, spec = _case(case)
    out = tmp_path / ("out.caffemodel" if spec["tool"].endswith("binary") else "out.prototxt")
    assert main([_COMMAND[spec["tool"]], str(folder / spec["input"]), str(out)]) == 0
    assert "->" in capsys.readouterr().err
    _assert_matches_caffe(out, folder, spec)


@pytest.mark.parametrize("tool", sorted(_COMMAND))
def test_caffe_tool_names(tool: str, tmp_path: Path) -> None:
    """Caffe's own tool names are subcommands too."""
    case = {"upgrade_net_proto_text": "v0_lenet_train",
            "upgrade_net_proto_binary": "bin_v1_everpeace_lenet_iter_10000",
            "upgrade_solver_proto_text": "solver_enet_adam_enum"}[tool]
    folder, spec = _case(case)
    assert spec["tool"] == tool
    out = tmp_path / "out"
    assert main([tool, str(folder / spec["input"]), str(out)]) == 0
    _assert_matches_caffe(out, folder, spec)


def test_wrong_kind_for_caffe_tool_name(tmp_path: Path, capsys) -> None:
    folder, spec = _case("bin_v1_everpeace_lenet_iter_10000")
    assert main(["upgrade_net_proto_text", str(folder / spec["input"]), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("caffe2torch: error: ") and "expected a prototxt" in err
    assert not (tmp_path / "o").exists()


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    """Through the real entry point: exit status 1 and one line on stderr."""
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer {\n  pool: MAXX\n}\n")
    for args in (["upgrade-net", str(bad), str(tmp_path / "o")],
                 ["upgrade-solver", str(tmp_path / "missing.prototxt"), str(tmp_path / "o")]):
        done = subprocess.run([sys.executable, "-m", "caffe2torch.cli", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("caffe2torch: error: "), done.stderr
        assert "Traceback" not in done.stderr


def test_normalise_argv() -> None:
    assert normalise_argv(["train", "-solver", "s.prototxt", "-weights=a.caffemodel,b"]) == \
        ["train", "--solver", "s.prototxt", "--weights=a.caffemodel,b"]
    assert normalise_argv(["--sigint-effect=stop", "-gpu", "all", "-h", "--level", "-1"]) == \
        ["--sigint_effect=stop", "--gpu", "all", "-h", "--level", "-1"]
    assert normalise_argv(["test", "--", "-model"]) == ["test", "--", "-model"]


def test_gflags_spelling_reaches_a_command(tmp_path: Path, monkeypatch) -> None:
    """A subcommand flag given Caffe's way parses like the GNU way."""
    seen = {}

    def arguments(parser) -> None:
        parser.add_argument("--solver")
        parser.add_argument("--sigint_effect", default="stop")

    def run(args) -> int:
        seen.update(vars(args))
        return 0

    monkeypatch.setitem(COMMANDS, "probe", Command("probe", arguments, run))
    assert main(["probe", "-solver", "s.prototxt", "-sigint_effect=snapshot"]) == 0
    assert (seen["solver"], seen["sigint_effect"]) == ("s.prototxt", "snapshot")
    assert main(["probe", "--solver=t.prototxt", "--sigint-effect", "none"]) == 0
    assert (seen["solver"], seen["sigint_effect"]) == ("t.prototxt", "none")
