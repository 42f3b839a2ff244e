"""Build the digits LMDBs: scikit-learn's handwritten digits (1797 8x8 images, shipped
inside the package, so no download) scaled to 0..255, resized to 28x28 like MNIST, written
as PNGs plus Caffe list files, then converted by our own ``convert_imageset --gray``.

    python examples/digits/make_data.py [OUT_DIR]      # default: this script's folder

Creates OUT_DIR/images/{train,test}/*.png, OUT_DIR/{train,test}.txt and
OUT_DIR/digits_{train,test}_lmdb (fixed split: train_test_split(test_size=0.25,
random_state=0, stratified) -> 1347 train, 450 test).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def main(out: Path) -> None:
    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    index = np.arange(len(images))
    train, test = train_test_split(index, test_size=0.25, random_state=0,
                                   stratify=digits.target)
    for split, ids in (("train", train), ("test", test)):
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for i in ids:
            big = cv2.resize(images[i], (28, 28), interpolation=cv2.INTER_LINEAR)
            name = f"{split}/{i:04d}.png"
            cv2.imwrite(str(out / "images" / name), big)
            lines.append(f"{name} {digits.target[i]}\n")
        (out / f"{split}.txt").write_text("".join(lines))
        db = out / f"digits_{split}_lmdb"
        if db.exists():
            shutil.rmtree(db)                       # convert_imageset never overwrites
        subprocess.run([sys.executable, "-m", "caffe2torch.cli", "convert_imageset", "--gray",
                        f"{out / 'images'}/", str(out / f"{split}.txt"), str(db)], check=True)
        print(f"{split}: {len(ids)} images -> {db}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
