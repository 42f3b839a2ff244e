"""Every real corpus net compiles, and runs forward at its declared shape (batch 1).

Walks ``corpus/nets.tsv``. Allowed exceptions, each asserted to fail with a clear error:
nets whose inputs come from data files the corpus does not ship (the error names the
file), nets built on Python layers whose modules the corpus does not ship, and any layer
type the registry lacks (none today; README, "Corpus coverage"). A net whose definition is
broken in Caffe too (a legacy ``input:`` without dims, which Caffe's upgrade drops) must
fail the way Caffe does.
"""
from __future__ import annotations

import csv

import pytest
import torch

import caffe2torch as caffe
from caffe2torch import CaffeError, NetError
from caffe2torch.forks import using_fork
from caffe2torch.layers.registry import _REGISTRY
from conftest import shared_dir

# Nets whose layers reproduce a fork only under that fork's switch (README, "Fork types").
FORK_OF = {"repos/sfzhang15__FaceBoxes/models/faceboxes/deploy.prototxt": "faceboxes"}


def _rows() -> list[dict[str, str]]:
    with open(shared_dir() / "corpus" / "nets.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


ROWS = _rows()
_FIRST: dict[str, str] = {}
for _row in ROWS:
    _FIRST.setdefault(_row["arch_id"], _row["path"])
FORWARD = set(_FIRST.values())


# The clear errors allowed for nets that cannot run from the corpus alone.
MISSING_FILES = "does not exist"
PYTHON_MODULES = "python_param module|No module named"
NOT_IMPLEMENTED = "unknown layer type|is not supported"
# Files that are not runnable nets as shipped (README, "Corpus coverage").
NOT_NETS = {
    # MobileNet-SSD's generator fills placeholders such as `num_output: cls3x` in these.
    "repos/chuanqi305__MobileNet-SSD/template/MobileNetSSD_deploy_template.prototxt":
        "Couldn't parse integer: cls3x",
    "repos/chuanqi305__MobileNet-SSD/template/MobileNetSSD_test_template.prototxt":
        "Couldn't parse integer: cls3x",
    "repos/chuanqi305__MobileNet-SSD/template/MobileNetSSD_train_template.prototxt":
        "Couldn't parse integer: cls3x",
    # OpenCV test nets that only run with OpenCV's own extensions or run-time shapes.
    "repos/opencv__opencv_extra/testdata/dnn/faster_rcnn_zf.prototxt":
        "must hold boxes and variances",
    "repos/opencv__opencv_extra/testdata/dnn/layers/net_faster_rcnn_proposal.prototxt":
        "got shapes \\[\\], \\[\\], \\[\\]",
    # A legacy `input:` without dims: Caffe's upgrade drops it and Caffe fails the same way.
    "repos/opencv__opencv_extra/testdata/dnn/layers/reshape_and_slice_routines.prototxt":
        "unknown bottom blob 'input'",
}


def _expected_failure(row: dict[str, str]) -> str | None:
    """Why this net cannot run from the corpus alone (a regex the error must match), or None."""
    if row["path"] in NOT_NETS:
        return NOT_NETS[row["path"]]
    types = set(filter(None, row["custom_types"].split(","))) | set(row["types_used"].split(","))
    reasons = []
    if any(t not in _REGISTRY for t in types):
        reasons.append(NOT_IMPLEMENTED)
    if row["python_layers"]:
        reasons.append(PYTHON_MODULES)
    if "data-layer" in row["input_style"]:
        reasons.append(MISSING_FILES)
    return "|".join(reasons) or None


def _build(path) -> caffe.Net:
    """The net as a user would run it: at TEST, or at TRAIN when its inputs exist only there,
    under its fork's switch where it needs one."""
    with using_fork(FORK_OF.get(path.relative_to(shared_dir() / "corpus").as_posix())):
        try:
            return caffe.Net(str(path), caffe.TEST)
        except NetError as exc:
            if "unknown bottom blob" not in str(exc):
                raise
            return caffe.Net(str(path), caffe.TRAIN)


@pytest.mark.parametrize("row", ROWS, ids=[r["path"] for r in ROWS])
def test_corpus_net(row: dict[str, str]) -> None:
    path = shared_dir() / "corpus" / row["path"]
    expected = _expected_failure(row)
    if expected is not None:
        with pytest.raises(CaffeError, match=expected):
            _build(path)
        return
    net = _build(path)
    assert net.inputs, f"{row['path']}: no inputs"
    if row["path"] not in FORWARD:
        return
    # The declared shape with batch 1 keeps CI fast; nets whose Reshape layers hard-code the
    # batch size run at the declared batch.
    declared = {name: net.blobs[name].shape for name in net.inputs}
    try:
        _forward(net, {n: (1, *s[1:]) if s and n != "rois" else s for n, s in declared.items()})
    except NetError:
        _forward(net, declared)


def _forward(net: caffe.Net, shapes: dict[str, tuple[int, ...]]) -> None:
    torch.manual_seed(0)
    for name, shape in shapes.items():
        net.blobs[name].reshape(*shape)
        net.blobs[name].data[...] = torch.randn(net.blobs[name].shape).numpy()
        if name == "rois":      # Fast R-CNN: (image index 0, x1, y1, x2, y2) boxes
            net.blobs[name].data[...] = [0, 8, 8, 64, 64]
        elif name == "im_info":
            net.blobs[name].data[...] = [*net.blobs[net.inputs[0]].shape[2:4], 1.0]
    net.reshape()
    with torch.no_grad():
        out = net.forward()
    for name, value in out.items():
        assert value.shape == net.blobs[name].shape
