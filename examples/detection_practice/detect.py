"""Detect rectangles with a trained practice net: decode per-cell boxes, then NMS.

``caffe2torch pyrun detect.py IMAGE --weights W.caffemodel [--model net.prototxt]
[--out boxes.jpg]`` prints one ``x1 y1 x2 y2 score`` line per detection.
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

import caffe
from od_boxes import decode, nms

HERE = Path(__file__).resolve().parent


def detect(net, image, mean=(104, 117, 123), size=64, stride=8, threshold=0.5, overlap=0.3):
    """(x1, y1, x2, y2, score) rows for a BGR uint8 image, in its own pixels."""
    sy, sx = image.shape[0] / size, image.shape[1] / size
    data = cv2.resize(image, (size, size)).transpose(2, 0, 1).astype(np.float32)
    data -= np.array(mean, np.float32).reshape(3, 1, 1)
    net.blobs["data"].reshape(1, 3, size, size)
    net.reshape()
    net.blobs["data"].data[...] = data
    out = net.forward()
    dets = decode(out["bbox"][0], out["obj_score"][0], stride, threshold)
    dets = dets[nms(dets, overlap)]
    return dets * np.array([sx, sy, sx, sy, 1], np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", default=str(HERE / "net.prototxt"))
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--out")
    args = parser.parse_args()
    net = caffe.Net(args.model, caffe.TEST, weights=args.weights)
    image = cv2.imread(args.image, cv2.IMREAD_COLOR)
    dets = detect(net, image, threshold=args.threshold)
    for x1, y1, x2, y2, score in dets:
        print(f"{x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f} {score:.3f}")
        cv2.rectangle(image, (int(x1), int(y1)), (int(x2), int(y2)), (0, 255, 255), 1)
    if args.out:
        cv2.imwrite(args.out, image)


if __name__ == "__main__":
    main()
