"""Write a small synthetic VOC-style detection set: coloured rectangles on noise.

``python make_dataset.py ROOT [--count 36] [--size 64] [--seed 0]`` writes
``ROOT/JPEGImages/*.jpg``, ``ROOT/Annotations/*.xml`` (VOC format, 1-based pixels) and
``ROOT/list.txt`` (one annotation path per line, as given by ROOT), like the course's
voc2007.txt.
"""
import argparse
from pathlib import Path

import cv2
import numpy as np

COLOURS = {"red": (40, 40, 220), "green": (40, 200, 40), "blue": (220, 60, 40)}  # BGR

XML = """<annotation>
  <folder>synthetic</folder>
  <filename>{filename}</filename>
  <size><width>{size}</width><height>{size}</height><depth>3</depth></size>
{objects}</annotation>
"""
OBJECT = """  <object>
    <name>{name}</name>
    <difficult>0</difficult>
    <bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox>
  </object>
"""


def make_dataset(root, count=36, size=64, seed=0):
    """Write the set under ``root``; returns the list file's path."""
    root = Path(root)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    lines = []
    for index in range(1, count + 1):
        image = rng.randint(90, 140, size=(size, size, 3)).astype(np.uint8)
        objects = []
        for _ in range(rng.randint(1, 3)):
            w, h = rng.randint(size // 4, size * 5 // 8, size=2)
            x1, y1 = rng.randint(0, size - w), rng.randint(0, size - h)
            name = list(COLOURS)[rng.randint(len(COLOURS))]
            cv2.rectangle(image, (int(x1), int(y1)), (int(x1 + w - 1), int(y1 + h - 1)),
                          COLOURS[name], thickness=-1)
            objects.append(OBJECT.format(name=name, x1=x1 + 1, y1=y1 + 1, x2=x1 + w, y2=y1 + h))
        filename = f"{index:06d}.jpg"
        cv2.imwrite(str(root / "JPEGImages" / filename), image,
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        xml = root / "Annotations" / f"{index:06d}.xml"
        xml.write_text(XML.format(filename=filename, size=size, objects="".join(objects)))
        lines.append(str(xml))
    listing = root / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root")
    parser.add_argument("--count", type=int, default=36)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_dataset(args.root, args.count, args.size, args.seed))
