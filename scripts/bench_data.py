"""Images per second of caffe2torch's Data layer, against the anchors of shared/perf/anchors.md.

The set-up of the anchors: ~2000 encoded 256x256 JPEGs (mean ~20.7 kB) in an LMDB made by
convert_imageset (ours here), a Data layer with crop 224, mirror and three mean values, batch
64, 2 threads for everything. Caffe's own speed is placed on this machine through the plain
single-process Python loop of the anchors (lmdb + cv2.imdecode + numpy crop/mirror/mean):
Caffe's time per batch is 0.84 times that loop's. The goal is at least 2x Caffe.

Each contender runs alone (fresh net, warm-up past its prefetch queue), in rounds that
alternate the contenders; the table shows medians over rounds and blocks. Run:
    python scripts/bench_data.py [--images 2000] [--rounds 2] [--blocks 5]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import lmdb
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import caffe2torch as caffe  # noqa: E402
from caffe2torch.data import set_workers  # noqa: E402
from caffe2torch.dataset_tools import convert_imageset  # noqa: E402
from caffe2torch.proto import caffe_pb2  # noqa: E402

CAFFE_OVER_PLAIN = 0.84     # anchors.md: Caffe 46 ms per batch, the plain loop 55 ms
CROP, BATCH = 224, 64
MEAN = np.array([104, 117, 123], np.float32)
NET = """
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ crop_size: {crop} mirror: true
                    mean_value: 104 mean_value: 117 mean_value: 123 }}
  data_param {{ source: "{db}" batch_size: {batch} backend: LMDB }} }}
"""


def make_dataset(folder: Path, count: int) -> tuple[Path, float]:
    """Smooth random scenes with noise, saved as JPEG (quality 90, ~20 kB), converted with our
    convert_imageset --encoded; returns the LMDB and the conversion's images/s."""
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir()
    lines = []
    for i in range(count):
        base = cv2.resize(rng.integers(0, 256, (8, 8, 3), np.uint8), (256, 256),
                          interpolation=cv2.INTER_CUBIC).astype(np.float32)
        noisy = np.clip(base + rng.normal(0, 7.5, base.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(images / f"{i:05d}.jpg"), noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"{i:05d}.jpg {i % 1000}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    convert_imageset(f"{images}/", folder / "list.txt", folder / "lmdb", encoded=True)
    return folder / "lmdb", count / (time.perf_counter() - start)


def plain_loop(db: Path) -> Callable[[], None]:
    """The anchors' baseline: one process, one record at a time, numpy for the transform."""
    env = lmdb.open(str(db), readonly=True, lock=False)
    cursor = env.begin().cursor()
    cursor.first()
    rng = np.random.default_rng(0)

    def batch() -> None:
        data, labels = [], []
        for _ in range(BATCH):
            datum = caffe_pb2.Datum.FromString(cursor.value())
            if not cursor.next():
                cursor.first()
            image = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_COLOR)
            top = rng.integers(image.shape[0] - CROP + 1)
            left = rng.integers(image.shape[1] - CROP + 1)
            crop = image[top:top + CROP, left:left + CROP]
            if rng.integers(2):
                crop = crop[:, ::-1]
            data.append((crop.astype(np.float32) - MEAN).transpose(2, 0, 1))
            labels.append(datum.label)
        torch.from_numpy(np.stack(data)), torch.tensor(labels, dtype=torch.float32)

    batch.close = env.close  # type: ignore[attr-defined]
    return batch


def data_layer(db: Path, folder: Path, workers: int) -> Callable[[], None]:
    """A net holding only the Data layer (as ``caffe time`` measured Caffe), run by forward()."""
    set_workers(workers)
    model = folder / f"data_w{workers}.prototxt"
    model.write_text(NET.format(crop=CROP, db=db, batch=BATCH))
    net = caffe.Net(str(model), caffe.TRAIN)
    set_workers(None)

    def batch() -> None:
        net.forward()

    batch.close = net.layers[0].module._prefetch.close  # type: ignore[attr-defined]
    return batch


def time_blocks(step: Callable[[], None], blocks: int, per_block: int, warmup: int
                ) -> list[float]:
    """Milliseconds per batch of each timed block."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            step()
        times.append((time.perf_counter() - start) * 1000 / per_block)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--per-block", type=int, default=8, help="batches per timed block")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    cv2.setNumThreads(2)
    with tempfile.TemporaryDirectory(prefix="bench_data.") as tmp:
        folder = Path(tmp)
        db, write_rate = make_dataset(folder, args.images)
        size = sum(p.stat().st_size for p in (folder / "images").iterdir()) / args.images
        print(f"dataset: {args.images} JPEGs 256x256, mean {size / 1000:.1f} kB; "
              f"convert_imageset --encoded wrote {write_rate:.0f} images/s "
              f"(Caffe in anchors.md: 1639)")
        contenders: dict[str, Callable[[], Callable[[], None]]] = {
            "plain Python loop": lambda: plain_loop(db)}
        for w in args.workers:
            contenders[f"Data layer, {w} worker(s)"] = lambda w=w: data_layer(db, folder, w)
        results: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, make in contenders.items():
                step = make()
                results[name] += time_blocks(step, args.blocks, args.per_block, warmup=6)
                step.close()
                del step
                gc.collect()
    plain = statistics.median(results["plain Python loop"])
    caffe_ms = plain * CAFFE_OVER_PLAIN
    print(f"\nbatch {BATCH}, crop {CROP}, mirror, mean values; {os.cpu_count()} CPU(s) visible, "
          f"torch/cv2 threads 2; medians of {args.rounds} rounds x {args.blocks} blocks of "
          f"{args.per_block} batches; Caffe = {CAFFE_OVER_PLAIN} x the plain loop "
          f"({caffe_ms:.1f} ms/batch here)")
    print(f"{'contender':<28}{'ms/batch':>10}{'images/s':>10}{'x plain':>9}{'x Caffe':>9}")
    for name, times in results.items():
        ms = statistics.median(times)
        print(f"{name:<28}{ms:>10.1f}{BATCH * 1000 / ms:>10.0f}{plain / ms:>9.2f}"
              f"{caffe_ms / ms:>9.2f}")


if __name__ == "__main__":
    main()
