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


TRAIN_NETS = {
    # name: (image side, channels, batch, layers after the data layer, Caffe-style)
    "lenet": (28, 1, 64, """
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 20 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 50 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""),
    "cifar10_quick": (32, 3, 100, """
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 32 pad: 2 kernel_size: 5 weight_filler {{ type: "gaussian" std: 0.0001 }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 32 pad: 2 kernel_size: 5 weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 }} }}
layer {{ name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3"
  convolution_param {{ num_output: 64 pad: 2 kernel_size: 5 weight_filler {{ type: "gaussian" std: 0.01 }} }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }}
layer {{ name: "pool3" type: "Pooling" bottom: "conv3" top: "pool3"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool3" top: "ip1"
  inner_product_param {{ num_output: 64 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param {{ num_output: 10 weight_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""),
}


def data_wait_share(folder: Path, name: str, iterations: int) -> tuple[float, float]:
    """Train ``name`` from an LMDB through the solver; returns (ms per iteration, share of the
    iteration spent in the Data layer's forward, i.e. waiting for the prefetched batch)."""
    side, channels, batch, body = TRAIN_NETS[name]
    rng = np.random.default_rng(1)
    images = folder / f"{name}_images"
    images.mkdir()
    lines = []
    for i in range(500):
        cv2.imwrite(str(images / f"{i:04d}.png"),
                    rng.integers(0, 256, (side, side, channels), np.uint8))
        lines.append(f"{i:04d}.png {i % 10}")
    (folder / f"{name}_list.txt").write_text("\n".join(lines) + "\n")
    db = folder / f"{name}_lmdb"
    convert_imageset(f"{images}/", folder / f"{name}_list.txt", db, gray=channels == 1)
    data = (f'layer {{{{ name: "data" type: "Data" top: "data" top: "label" '
            f'transform_param {{{{ scale: 0.00390625 }}}} '
            f'data_param {{{{ source: "{db}" batch_size: {batch} backend: LMDB }}}} }}}}\n')
    (folder / f"{name}.prototxt").write_text((data + body).format())
    solver = folder / f"{name}_solver.prototxt"
    solver.write_text(f'net: "{folder / name}.prototxt" base_lr: 0.001 momentum: 0.9 '
                      f'lr_policy: "fixed" max_iter: {iterations} display: 0 '
                      f'snapshot_after_train: false solver_mode: CPU')
    trainer = caffe.get_solver(str(solver))
    layer = trainer.net.layers[0].module
    waited = [0.0]
    started: list[float] = []
    layer.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    layer.register_forward_hook(
        lambda *_: waited.__setitem__(0, waited[0] + time.perf_counter() - started.pop()))
    trainer.step(5)                      # warm-up: fills the prefetch queue
    waited[0] = 0.0
    start = time.perf_counter()
    trainer.step(iterations)
    total = time.perf_counter() - start
    return total * 1000 / iterations, waited[0] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--per-block", type=int, default=8, help="batches per timed block")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-iters", type=int, default=40,
                        help="iterations per net for the data-wait share (0: skip)")
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
    if args.train_iters:
        print("\ntraining from an LMDB through the solver (default workers): share of each "
              "iteration spent waiting for data (goal < 5%)")
        with tempfile.TemporaryDirectory(prefix="bench_data_train.") as tmp:
            for name in TRAIN_NETS:
                ms, share = data_wait_share(Path(tmp), name, args.train_iters)
                print(f"{name:<16}{ms:>8.1f} ms/iter   waiting for data {100 * share:5.1f}%")


if __name__ == "__main__":
    main()
