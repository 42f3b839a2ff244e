"""Every layer case recorded by the SSD fork of Caffe replays: forward, params, backward.

Covers the whole ``golden/layers_ssd`` folder, so the fork layers implemented in other
modules (Upsample, Resize, Pad, ...) are checked here too. Cases recorded by the fork
(``"caffe": "ssd-fork"``) are built with the SSD fork's numbers selected
(:mod:`caffe2torch.forks`), which changes only the BVLC layers whose results differ.
"""
import json

import numpy as np
import pytest

from caffe2torch.forks import using_fork
from golden import cases, replay, shared_root


def _fork(case: str) -> str | None:
    spec = json.loads((shared_root() / "golden" / "layers_ssd" / case / "case.json").read_text())
    return "ssd" if spec.get("caffe") == "ssd-fork" else None


@pytest.mark.parametrize("case", [c for c in cases("layers_ssd") if c != "multibox_loss_l2_nomining"])
def test_layer_ssd_case(case: str) -> None:
    with using_fork(_fork(case)):
        replay("layers_ssd", case)


def test_layer_ssd_case_multibox_loss_l2_nomining() -> None:
    """Everything replays except one recorded Caffe defect, which caffe2torch does not copy.

    Without mining, MultiBoxLoss calls ``bottom[1]->ShareDiff(conf_pred_)``, which cuts the
    diff that the Parameter layer feeding it shares with its blob at setup: Caffe records a
    zero param_diff for mbox_conf although diff/mbox_conf is not zero. caffe2torch passes the
    gradient on, as Caffe itself does for producers that share diffs in Backward (Concat,
    Flatten), so the parameter gets exactly the blob's recorded diff.
    """
    case = "multibox_loss_l2_nomining"
    with using_fork(_fork(case)):
        net = replay("layers_ssd", case, diverging=frozenset({"param_diff/mbox_conf/0"}))
    blobs = np.load(shared_root() / "golden" / "layers_ssd" / case / "blobs.npz")
    assert not blobs["param_diff/mbox_conf/0"].any() and blobs["diff/mbox_conf"].any()
    np.testing.assert_allclose(net.params["mbox_conf"][0].diff, blobs["diff/mbox_conf"],
                               rtol=1e-4, atol=1e-5)
