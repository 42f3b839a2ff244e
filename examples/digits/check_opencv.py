"""Classify the held-out digits with a trained snapshot in caffe2torch and in OpenCV's dnn
(cv2.dnn.readNetFromCaffe) and check that both give the same predictions.

    python examples/digits/check_opencv.py [WEIGHTS] [DEPLOY] [DATA_DIR]

Defaults: examples/digits/lenet_iter_600.caffemodel, examples/digits/lenet_deploy.prototxt,
and the folder make_data.py wrote (this script's folder). Exits 1 if the predictions differ.
"""
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

import caffe2torch


def main(weights: str, deploy: str, data: Path) -> int:
    names, labels = zip(*(line.split() for line in (data / "test.txt").read_text().splitlines()))
    labels = np.array([int(label) for label in labels])
    images = np.stack([cv2.imread(str(data / "images" / name), cv2.IMREAD_GRAYSCALE)
                       for name in names]).astype(np.float32) * 0.00390625   # Caffe's scale
    batch = images[:, None]                                          # N x 1 x 28 x 28

    # The deploy net declares 1x1x28x28; both readers take the whole test set as one batch.
    model = caffe2torch.load(deploy, weights).eval()
    with torch.no_grad():
        ours = model(torch.from_numpy(batch)).reshape(len(batch), -1).numpy()   # 'prob'

    cv_net = cv2.dnn.readNetFromCaffe(deploy, weights)
    cv_net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cv_net.setInput(batch)
    theirs = cv_net.forward().reshape(len(batch), -1)

    pred_ours, pred_cv = ours.argmax(1), theirs.argmax(1)
    agree = int((pred_ours == pred_cv).sum())
    print(f"caffe2torch accuracy: {(pred_ours == labels).mean():.4f} on {len(labels)} images")
    print(f"OpenCV dnn accuracy:  {(pred_cv == labels).mean():.4f} on {len(labels)} images")
    print(f"predictions agree: {agree}/{len(labels)}; "
          f"max |prob difference| = {np.abs(ours - theirs).max():.2e}")
    return 0 if agree == len(labels) else 1


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    argv = sys.argv[1:]
    sys.exit(main(argv[0] if argv else "examples/digits/lenet_iter_600.caffemodel",
                  argv[1] if len(argv) > 1 else "examples/digits/lenet_deploy.prototxt",
                  Path(argv[2]) if len(argv) > 2 else here))
