"""Real-weight nets give the same outputs as OpenCV's dnn module, an independent reader.

OpenCV (opencv-python-headless<5) implements Caffe's layers separately from Caffe and
from us, so agreement within 1e-4 checks both our import of the weights and our layers.
"""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

import caffe2torch as caffe
from conftest import shared_dir

# Every golden net with real (stored) weights that OpenCV can read; pvanet_caffe_materials is
# not listed because OpenCV's importer rejects its prototxt (a layer reads a "label" blob no
# layer produces in the deploy form).
REAL = ["cifar10_full", "cifar10_quick", "lenet", "mtcnn_det1_pnet", "mtcnn_det2_rnet",
        "mtcnn_det3_onet", "mtcnn_det4_lnet", "open_nsfw_resnet50_1by2", "squeezenet_v1_0",
        "squeezenet_v1_1", "vanilla_cnn"]


@pytest.mark.parametrize("case", REAL)
def test_matches_opencv(case: str) -> None:
    case_dir = shared_dir() / "golden" / "nets" / case
    spec = json.loads((case_dir / "case.json").read_text())
    model, weights = str(case_dir / spec["model"]), str(case_dir / spec["weights"])
    net = caffe.Net(model, caffe.TEST, weights=weights)
    rng = np.random.default_rng(7)
    inputs = {name: rng.standard_normal(net.blobs[name].shape).astype(np.float32)
              for name in net.inputs}
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    ours = net.forward()

    cv_net = cv2.dnn.readNetFromCaffe(model, weights)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for name, value in inputs.items():
        cv_net.setInput(value, name)
    producers = {top: step.name for step in net.module.steps for top in step.tops}
    names = [producers[o] for o in net.outputs]
    theirs = cv_net.forward(names)
    for output, value in zip(net.outputs, theirs):
        np.testing.assert_allclose(ours[output], value.reshape(ours[output].shape),
                                   rtol=1e-4, atol=1e-4, err_msg=f"{case}: {output}")
