"""Python data layer: VOC-style XML annotations -> an image batch and its ground-truth boxes.

``param_str`` (JSON): ``source`` (a list file, one annotation XML path per line),
``img_dir`` (where each XML's ``<filename>`` lives), ``mean`` (BGR, subtracted),
``base_size`` (one size or a list: each batch is warped to a square of one of them,
picked at random in TRAIN), optional ``batch_size`` (default 1), ``classes`` (names; the
label's class index) and ``seed``. Relative paths are read from the working directory, as
Caffe does.

Tops: ``data`` (N x 3 x S x S, BGR minus mean) and ``label`` (K x 6 rows
``[image index, x1, y1, x2, y2, class]`` in the warped image's pixels).
"""
import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

import caffe


def parse_voc(xml_path):
    """(image file name, [(name, x1, y1, x2, y2)]) of a VOC annotation; VOC pixels are
    1-based, boxes here 0-based with exclusive ends."""
    root = ET.parse(xml_path).getroot()
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        x1, y1, x2, y2 = (float(box.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
        objects.append((obj.find("name").text, x1 - 1, y1 - 1, x2, y2))
    return root.find("filename").text, objects


class ODDataLayer(caffe.Layer):
    def setup(self, bottom, top):
        if bottom:
            raise ValueError("ODDataLayer takes no bottoms")
        params = json.loads(self.param_str)
        with open(params["source"]) as handle:
            self.items = [line.strip() for line in handle if line.strip()]
        self.img_dir = Path(params["img_dir"])
        self.mean = np.array(params.get("mean", [0, 0, 0]), np.float32).reshape(3, 1, 1)
        sizes = params.get("base_size", 64)
        self.sizes = sizes if isinstance(sizes, list) else [sizes]
        self.batch_size = int(params.get("batch_size", 1))
        self.classes = params.get("classes", [])
        self.rng = random.Random(params.get("seed", 0))
        self.train = self.phase == caffe.TRAIN
        self.order, self.cursor = list(range(len(self.items))), len(self.items)
        size = self.sizes[0]
        top[0].reshape(self.batch_size, 3, size, size)
        top[1].reshape(1, 6)

    def reshape(self, bottom, top):
        pass  # the batch decides the shapes: forward reshapes the tops

    def _next_item(self):
        if self.cursor >= len(self.order):
            if self.train:
                self.rng.shuffle(self.order)
            self.cursor = 0
        self.cursor += 1
        return self.items[self.order[self.cursor - 1]]

    def forward(self, bottom, top):
        size = self.rng.choice(self.sizes) if self.train else self.sizes[0]
        images, labels = [], []
        for index in range(self.batch_size):
            filename, objects = parse_voc(self._next_item())
            image = cv2.imread(str(self.img_dir / filename), cv2.IMREAD_COLOR)
            sy, sx = size / image.shape[0], size / image.shape[1]
            image = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
            images.append(image.transpose(2, 0, 1).astype(np.float32) - self.mean)
            for name, x1, y1, x2, y2 in objects:
                cls = self.classes.index(name) if name in self.classes else 0
                labels.append([index, x1 * sx, y1 * sy, x2 * sx, y2 * sy, cls])
        top[0].reshape(self.batch_size, 3, size, size)
        top[0].data[...] = np.stack(images)
        label = np.array(labels, np.float32).reshape(-1, 6)
        top[1].reshape(*label.shape)
        top[1].data[...] = label

    def backward(self, top, propagate_down, bottom):
        pass
