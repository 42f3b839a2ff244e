"""Replay of real Caffe's data layers and dataset tools (golden/data, golden/tools).

Data cases: build the net in the case's phase, call forward() ``forward_passes`` times and
compare every recorded blob of every pass. Tool cases: rerun each ``convert_imageset`` /
``compute_image_mean`` line of a case's command.txt with our command line, writing only into
a temporary folder, and compare the database records byte for byte and the mean within 1e-6.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_dir
from golden import cases

GOLDEN = shared_dir() / "golden"


def _records(path: Path) -> list[tuple[bytes, bytes]]:
    from caffe2torch.data.db import RecordReader

    return list(RecordReader(path))


def _tool_lines(case_dir: Path) -> list[list[str]]:
    """``[tool, arg, ...]`` for each line of command.txt: ``cd <case dir> && GLOG_...=1 tool
    args > log 2>&1   # exit status 0``."""
    lines = []
    for line in (case_dir / "command.txt").read_text().splitlines():
        if "&&" in line:
            words = shlex.split(line.split("&&", 1)[1].split(" > ", 1)[0])
            lines.append([w for w in words if not w.startswith("GLOG_")])
    return lines


def _tool_cases() -> list[tuple[str, int]]:
    found = []
    for group in ("data", "tools"):
        for name in cases(group):
            case_dir = GOLDEN / group / name
            if (case_dir / "command.txt").is_file():
                for i, words in enumerate(_tool_lines(case_dir)):
                    if words[0] in ("convert_imageset", "compute_image_mean"):
                        found.append((f"{group}/{name}", i))
    return found


@pytest.mark.parametrize("name", cases("data"))
def test_golden_data_layer(name: str) -> None:
    import caffe2torch as caffe

    case_dir = GOLDEN / "data" / name
    spec = json.loads((case_dir / "case.json").read_text())
    phase = caffe.TRAIN if spec["phase"] == "TRAIN" else caffe.TEST
    net = caffe.Net(str(case_dir / spec["model"]), phase)
    for layer in net.layers:   # Caffe's RNG cannot be replayed: the cases must not draw
        transformer = getattr(layer.module, "transformer", None)
        assert transformer is None or not transformer.needs_rand, f"{name}: random transform"
    blobs = np.load(case_dir / "blobs.npz")
    passes = spec.get("forward_passes", 1)
    compared = 0
    for k in range(passes):
        net.forward()
        for key in blobs.files:
            kind, _, rest = key.partition("/")
            if kind != "data":
                continue
            blob, step = rest.rsplit("/", 1) if passes > 1 else (rest, str(k))
            if int(step) != k:
                continue
            ours, theirs = net.blobs[blob].data, blobs[key]
            assert ours.shape == theirs.shape, f"{key}: shape {ours.shape}, Caffe {theirs.shape}"
            np.testing.assert_allclose(ours, theirs, rtol=spec["rtol"], atol=spec["atol"],
                                       err_msg=key)
            compared += 1
    assert compared == len([k for k in blobs.files if k.startswith("data/")])


@pytest.mark.parametrize("case,line", _tool_cases(), ids=lambda v: str(v))
def test_golden_dataset_tool(case: str, line: int, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    from caffe2torch.cli import main

    case_dir = GOLDEN / case
    tool, *args = _tool_lines(case_dir)[line]
    monkeypatch.chdir(case_dir)          # the command's relative inputs, read only
    if tool == "convert_imageset":
        out = tmp_path / "lmdb"
        assert main([tool, *args[:-1], str(out)]) == 0
        ours, theirs = _records(out), _records(case_dir / args[-1])
        assert [k for k, _ in ours] == [k for k, _ in theirs]
        for (key, mine), (_, caffe) in zip(ours, theirs):
            assert mine == caffe, f"record {key!r} differs from Caffe's"
    else:
        out = tmp_path / "mean.binaryproto"
        assert main([tool, *args[:-1], str(out)]) == 0
        from caffe2torch.formats import read_blobproto

        expected = read_blobproto(case_dir / args[-1])
        np.testing.assert_allclose(read_blobproto(out), expected, rtol=0, atol=1e-6)
        if (case_dir / "mean.npy").is_file():
            np.testing.assert_allclose(read_blobproto(out), np.load(case_dir / "mean.npy"),
                                       rtol=0, atol=1e-6)
