"""Caffemodel I/O throughput on a synthetic VGG-16-shaped model (~550 MB).

Writes the model with caffe2torch, then times (medians of --repeat runs, file in the page
cache): our save (atomic with fsync, and the same bytes written without fsync, to show what
the disk costs), our load (wire scan: arrays are views where aligned), our load plus a
full copy of every blob into fresh numpy arrays, and the python-protobuf baselines
(ParseFromString alone, and ParseFromString plus numpy conversion, as most converters do).

    python scripts/bench_io.py [--repeat 3] [--scale 1.0] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from caffe2torch.formats import read_caffemodel, write_caffemodel
from caffe2torch.formats.caffemodel import caffemodel_chunks
from caffe2torch.proto import caffe_pb2

# VGG-16: (layer, weight shape); every layer also has a bias of shape (num_output,).
VGG16 = [("conv1_1", (64, 3, 3, 3)), ("conv1_2", (64, 64, 3, 3)),
         ("conv2_1", (128, 64, 3, 3)), ("conv2_2", (128, 128, 3, 3)),
         ("conv3_1", (256, 128, 3, 3)), ("conv3_2", (256, 256, 3, 3)),
         ("conv3_3", (256, 256, 3, 3)), ("conv4_1", (512, 256, 3, 3)),
         ("conv4_2", (512, 512, 3, 3)), ("conv4_3", (512, 512, 3, 3)),
         ("conv5_1", (512, 512, 3, 3)), ("conv5_2", (512, 512, 3, 3)),
         ("conv5_3", (512, 512, 3, 3)), ("fc6", (4096, 25088)), ("fc7", (4096, 4096)),
         ("fc8", (1000, 4096))]


def build(scale: float) -> tuple[caffe_pb2.NetParameter, list[list[np.ndarray]]]:
    """The net (layers without blobs) and random float32 blobs; ``scale`` shrinks fc6/fc7."""
    rng = np.random.default_rng(0)
    net = caffe_pb2.NetParameter(name="VGG_ILSVRC_16_layers")
    blobs = []
    bottom = "data"
    for name, shape in VGG16:
        if name in ("fc6", "fc7"):
            shape = (max(1, int(shape[0] * scale)), shape[1])
        kind = "InnerProduct" if name.startswith("fc") else "Convolution"
        layer = net.layer.add(name=name, type=kind, bottom=[bottom], top=[name])
        (layer.inner_product_param if kind == "InnerProduct"
         else layer.convolution_param).num_output = shape[0]
        blobs.append([rng.standard_normal(shape, dtype=np.float32),
                      rng.standard_normal(shape[:1], dtype=np.float32)])
        bottom = name
    return net, blobs


def median_time(action: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``action`` over ``repeat`` runs, after one warm-up run."""
    action()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="fc6/fc7 size factor")
    parser.add_argument("--dir", default=None, help="where to write the temporary model")
    args = parser.parse_args()

    net, blobs = build(args.scale)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "vgg16_synthetic.caffemodel"
        save = median_time(lambda: write_caffemodel(path, net, blobs), args.repeat)
        megabytes = path.stat().st_size / 1e6

        def save_no_sync() -> None:
            with open(Path(tmp) / "plain.caffemodel", "wb") as handle:
                handle.writelines(caffemodel_chunks(net, blobs))

        def load_and_copy() -> None:
            for record in read_caffemodel(path):
                for blob in record.blobs:
                    np.array(blob.data)

        def protobuf_parse() -> caffe_pb2.NetParameter:
            message = caffe_pb2.NetParameter()
            message.ParseFromString(path.read_bytes())
            return message

        def protobuf_numpy() -> None:
            for layer in protobuf_parse().layer:
                for blob in layer.blobs:
                    np.asarray(blob.data, dtype=np.float32)

        rows = [("save: write_caffemodel (atomic, fsync)", save),
                ("save, same bytes, plain write (no fsync)",
                 median_time(save_no_sync, args.repeat)),
                ("load: read_caffemodel", median_time(lambda: read_caffemodel(path), args.repeat)),
                ("load + copy every blob into numpy", median_time(load_and_copy, args.repeat)),
                ("baseline: protobuf read + ParseFromString",
                 median_time(protobuf_parse, args.repeat)),
                ("baseline: protobuf ParseFromString + numpy",
                 median_time(protobuf_numpy, args.repeat))]
    print(f"synthetic VGG-16 caffemodel: {megabytes:.0f} MB, median of {args.repeat} "
          "(file in the page cache)")
    print(f"| {'operation':<44} | {'seconds':>8} | {'MB/s':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|")
    for label, seconds in rows:
        print(f"| {label:<44} | {seconds:8.3f} | {megabytes / seconds:8.0f} |")


if __name__ == "__main__":
    main()
