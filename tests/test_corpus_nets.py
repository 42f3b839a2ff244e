"""Every real corpus net compiles; every BVLC-only net runs forward at its declared shape.

Nets that need fork layers are covered by the fork-layer work; nets whose inputs come
from data files that are not in the corpus must fail with an error naming that file.
"""
from __future__ import annotations

import csv

import pytest
import torch

import caffe2torch as caffe
from caffe2torch import NetError
from conftest import shared_dir

DATA_STYLES = ("data-layer(",)


def _rows() -> list[dict[str, str]]:
    with open(shared_dir() / "corpus" / "nets.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _bvlc_rows() -> list[dict[str, str]]:
    return [r for r in _rows() if not r["custom_types"] and not r["python_layers"]]


def _first_of_each_arch(rows: list[dict[str, str]]) -> set[str]:
    seen: dict[str, str] = {}
    for row in rows:
        seen.setdefault(row["arch_id"], row["path"])
    return set(seen.values())


ROWS = _bvlc_rows()
FORWARD = _first_of_each_arch([r for r in ROWS if not r["input_style"].startswith(DATA_STYLES)])


@pytest.mark.parametrize("row", ROWS, ids=[r["path"] for r in ROWS])
def test_bvlc_corpus_net(row: dict[str, str]) -> None:
    path = shared_dir() / "corpus" / row["path"]
    phase = caffe.TRAIN if row["kind"] == "train_val" else caffe.TEST
    if row["input_style"].startswith(DATA_STYLES):
        # Data files of these nets are not in the corpus: the error must name the file.
        try:
            caffe.Net(str(path), phase)
        except NetError as exc:
            assert "does not exist" in str(exc) or "not implemented yet" in str(exc), str(exc)
        return
    if row["input_style"] == "input:(no dims)":
        # Caffe's upgrade drops a legacy input without dims, so its consumer has no bottom.
        with pytest.raises(NetError, match="unknown bottom blob"):
            caffe.Net(str(path), phase)
        return
    net = caffe.Net(str(path), phase)
    assert net.inputs, f"{row['path']}: no inputs"
    if row["path"] not in FORWARD or any(0 in net.blobs[i].shape or not net.blobs[i].shape
                                         for i in net.inputs):
        return
    torch.manual_seed(0)
    for name in net.inputs:
        net.blobs[name].data[...] = torch.randn(net.blobs[name].shape).numpy()
    with torch.no_grad():
        out = net.forward()
    for name, value in out.items():
        assert value.shape == net.blobs[name].shape
