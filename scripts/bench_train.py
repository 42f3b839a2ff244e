"""Training speed: caffe2torch's solver against a hand-written PyTorch loop, and against Caffe.

For LeNet (batch 64) and CIFAR10-quick (batch 100), with one batch held in memory:

* caffe2torch: ``SGDSolver.step(n)`` on the Caffe net with Input layers (the batch written
  into ``solver.net.blobs``), momentum 0.9, weight decay, lr_mult 1/2 as in Caffe's examples;
* hand-written: the same net as plain ``nn`` ops, the same weights, the same Caffe update
  (``caffe2torch.solvers.SGD`` with the same param groups), ``zero_grad; forward;
  loss.backward(); step`` plus ``loss.item()`` per iteration, as a training loop logs it.
  NCHW, in eager mode: the idiomatic form anchors.md timed. caffe2torch runs its
  convolutions channels-last (caffe2torch.layout); variants show it kept NCHW and with
  Caffe-order conv weight gradients.

The goal is caffe2torch <= 1.05x the hand-written time. Caffe's own time on this machine is
estimated from /work/shared/perf/anchors.md ("Training loop": Caffe ``caffe train`` over
hand-written eager PyTorch, measured on the same kind of 2-core machine): the hand-written
time here times that ratio. Then the update alone: caffe2torch's SGD (foreach) against
``torch.optim.SGD(foreach=True)`` on LeNet's parameters.

Timing: --threads threads (2, as in anchors.md), glibc's allocator pinned (GLIBC_TUNABLES, set
by re-executing itself), caffe2torch and hand-written blocks interleaved, medians of --blocks
blocks; --clock cpu times the process's CPU time instead of the wall clock, for a loaded machine
(with --threads 1).

    python scripts/bench_train.py [--blocks 7] [--iters 20] [--threads 2] [--clock wall] [--gpu]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_timing import (TUNABLES, add_timing_args, exact_weight_grads,  # noqa: E402
                          pin_allocator, timing_clock)
from caffe2torch.mode import device, set_mode_gpu  # noqa: E402
from caffe2torch.solver import SGDSolver  # noqa: E402
from caffe2torch.solvers import SGD  # noqa: E402


# Caffe's `caffe train` time over hand-written eager PyTorch (anchors.md, "Training loop").
CAFFE_OVER_EAGER = {"lenet": 24.1 / 12.2, "cifar10_quick": 174.8 / 45.1}

PARAMS = ('param { lr_mult: 1 } param { lr_mult: 2 }')
GAUSS = 'weight_filler { type: "gaussian" std: 0.01 } bias_filler { type: "constant" }'

LENET = f"""
name: "LeNet"
layer {{ name: "data" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: 64 dim: 1 dim: 28 dim: 28 }} shape {{ dim: 64 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {PARAMS}
  convolution_param {{ num_output: 20 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" {PARAMS}
  convolution_param {{ num_output: 50 kernel_size: 5 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" {PARAMS}
  inner_product_param {{ num_output: 500 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" {PARAMS}
  inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

CIFAR10_QUICK = f"""
name: "CIFAR10_quick"
layer {{ name: "data" type: "Input" top: "data" top: "label"
  input_param {{ shape {{ dim: 100 dim: 3 dim: 32 dim: 32 }} shape {{ dim: 100 }} }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {PARAMS}
  convolution_param {{ num_output: 32 pad: 2 kernel_size: 5 stride: 1 {GAUSS} }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" {PARAMS}
  convolution_param {{ num_output: 32 pad: 2 kernel_size: 5 stride: 1 {GAUSS} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 }} }}
layer {{ name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3" {PARAMS}
  convolution_param {{ num_output: 64 pad: 2 kernel_size: 5 stride: 1 {GAUSS} }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }}
layer {{ name: "pool3" type: "Pooling" bottom: "conv3" top: "pool3"
  pooling_param {{ pool: AVE kernel_size: 3 stride: 2 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "pool3" top: "ip1" {PARAMS}
  inner_product_param {{ num_output: 64 {GAUSS} }} }}
layer {{ name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" {PARAMS}
  inner_product_param {{ num_output: 10 {GAUSS} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }}
"""

SOLVER = """net: "{net}"
base_lr: 0.001 momentum: 0.9 weight_decay: 0.004 lr_policy: "fixed"
max_iter: 1000000 display: 0 snapshot_after_train: false solver_mode: CPU random_seed: 1
"""


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
        return self.ip2(F.relu(self.ip1(x.flatten(1))))


class Cifar10Quick(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.ip1, self.ip2 = nn.Linear(1024, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
        return self.ip2(self.ip1(x.flatten(1)))


NETS = {"lenet": (LENET, LeNet, (64, 1, 28, 28)),
        "cifar10_quick": (CIFAR10_QUICK, Cifar10Quick, (100, 3, 32, 32))}


def make_pair(name: str, folder: Path
              ) -> tuple[Callable[[int], None], SGDSolver, SGDSolver]:
    """The hand-written loop (``n`` iterations), caffe2torch's solver on the same batch, and
    a twin solver whose net is kept NCHW (``use_channels_last(False)``)."""
    prototxt, module_class, shape = NETS[name]
    (folder / f"{name}.prototxt").write_text(prototxt)
    (folder / f"{name}_solver.prototxt").write_text(SOLVER.format(net=folder / f"{name}.prototxt"))
    rng = np.random.default_rng(0)
    data = rng.random(shape, dtype=np.float32)
    label = rng.integers(0, 10, shape[0]).astype(np.float32)
    solver, nchw = (SGDSolver(folder / f"{name}_solver.prototxt") for _ in range(2))
    nchw.net.module.use_channels_last(False)
    for twin in (solver, nchw):
        twin.net.blobs["data"].data[...] = data
        twin.net.blobs["label"].data[...] = label
    for name_, blobs in solver.net.params.items():
        for mine, theirs in zip(blobs, nchw.net.params[name_]):
            theirs.data[...] = mine.data

    model = module_class().to(device())
    caffe_params = [blob for blobs in solver.net.params.values() for blob in blobs]
    with torch.no_grad():
        for mine, theirs in zip(model.parameters(), caffe_params):
            mine.copy_(torch.from_numpy(np.array(theirs.data).reshape(mine.shape)))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    p = solver.param
    optimizer = SGD([{"params": weights}, {"params": biases, "lr_mult": 2.0}], p.base_lr,
                    momentum=p.momentum, weight_decay=p.weight_decay)
    x, y = torch.from_numpy(data).to(device()), torch.from_numpy(label).long().to(device())
    same = solver.net.forward()["loss"].item(), F.cross_entropy(model(x), y).item()
    assert np.isclose(*same, rtol=1e-5), f"{name}: the two nets disagree: loss {same}"

    def hand_written(n: int) -> None:
        for _ in range(n):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            loss.item()
            optimizer.step()

    return hand_written, solver, nchw


def interleaved(actions: list[Callable[[], object]], blocks: int,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Median seconds of each action, run A B C A B C ... after one warm-up each."""
    sync = torch.cuda.synchronize if device().type == "cuda" else (lambda: None)
    for action in actions:
        action()
    times: list[list[float]] = [[] for _ in actions]
    for _ in range(blocks):
        for action, out in zip(actions, times):
            sync()
            start = clock()
            action()
            sync()
            out.append(clock() - start)
    return [statistics.median(t) for t in times]


def timed_step(solver: SGDSolver, iters: int) -> Callable[[], None]:
    return lambda: solver.step(iters)


def net_loop(solver: SGDSolver, iters: int) -> Callable[[], None]:
    """The compiled net in a plain loop with the solver's optimizer: what the solver driver
    costs on top of the net is ``step`` over this."""
    module, optimizer = solver.net.module, solver.optimizer
    feed = {name: solver.net.blobs[name]._data for name in module.input_names}

    def run() -> None:
        for _ in range(iters):
            optimizer.zero_grad()
            _, loss = module.run(feed, keep_all=False)
            loss.backward()
            loss.item()
            optimizer.step()
    return run


def main() -> None:
    pin_allocator()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per contender")
    parser.add_argument("--iters", type=int, default=20, help="iterations per block")
    parser.add_argument("--gpu", action="store_true", help="train on CUDA (no Caffe estimate)")
    add_timing_args(parser)
    args = parser.parse_args()
    if args.gpu:
        set_mode_gpu()
    clock = timing_clock(args)
    logging.getLogger("caffe2torch").setLevel(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in NETS:
            hand_loop, solver, nchw = make_pair(name, Path(tmp))
            times = interleaved([lambda: hand_loop(args.iters),
                                 timed_step(solver, args.iters),
                                 timed_step(nchw, args.iters),
                                 exact_weight_grads(timed_step(solver, args.iters)),
                                 net_loop(solver, args.iters)], args.blocks, clock)
            hand, *others = (1000 * t / args.iters for t in times)
            caffe = hand * CAFFE_OVER_EAGER[name] if device().type == "cpu" else float("nan")
            rows.append((name, hand, *others, caffe))
            if name == "lenet":
                update = update_rows(solver, args.blocks, clock)

    print(f"device {device()}, threads {args.threads}, {args.clock} clock, "
          f"GLIBC_TUNABLES={TUNABLES}, medians of {args.blocks} interleaved blocks of "
          f"{args.iters} iterations, torch {torch.__version__}")
    print("ms per iteration. c2t: SGDSolver.step, ratio: over the hand-written loop (NCHW). "
          "NCHW: the net kept NCHW\n(use_channels_last(False)). exact: the conv weight gradients "
          "summed image by image in Caffe's order\n(set_exact_weight_grads(True)). net loop: the "
          "compiled net in a plain loop, so driver = c2t / net loop.\nCaffe est.: hand-written x "
          "the anchors' Caffe/eager training ratio.")
    print(f"{'net':<14} {'hand':>7} {'c2t':>7} {'ratio':>6} {'NCHW':>7} {'ratio':>6} "
          f"{'exact':>7} {'ratio':>6} {'net loop':>8} {'driver':>6} {'Caffe est.':>10} "
          f"{'c2t vs Caffe':>12}")
    for name, hand, ours, nchw, exact, bare, caffe in rows:
        print(f"{name:<14} {hand:>7.2f} {ours:>7.2f} {ours / hand:>6.3f} {nchw:>7.2f} "
              f"{nchw / hand:>6.3f} {exact:>7.2f} {exact / hand:>6.3f} {bare:>8.2f} "
              f"{ours / bare:>6.3f} {caffe:>10.2f} {caffe / ours:>11.2f}x")
    print(f"\nupdate alone on LeNet's {update[0]} param blobs (431k values), us per step:")
    print(f"  caffe2torch SGD (foreach, Caffe's math)   {update[1]:8.1f}")
    print(f"  solver.apply_update() (rate, clip, step)  {update[2]:8.1f}")
    print(f"  torch.optim.SGD(foreach=True)             {update[3]:8.1f}")


def update_rows(solver: SGDSolver, blocks: int, clock: Callable[[], float] = time.perf_counter
                ) -> tuple[int, float, float, float]:
    """Microseconds per update: our optimizer, the solver's whole ApplyUpdate, torch's SGD."""
    params = [lp.param.detach().clone().requires_grad_(True)
              for lp in solver.net.module.learnable]
    for param in params:
        param.grad = torch.randn_like(param)
    p = solver.param
    ours = SGD(params, p.base_lr, momentum=p.momentum, weight_decay=p.weight_decay)
    torch_sgd = torch.optim.SGD(params, lr=p.base_lr, momentum=p.momentum,
                                weight_decay=p.weight_decay, foreach=True)
    steps = 200
    t_ours, t_torch, t_apply = interleaved(
        [lambda: [ours.step() for _ in range(steps)],
         lambda: [torch_sgd.step() for _ in range(steps)],
         lambda: [solver.apply_update() for _ in range(steps)]], blocks, clock)
    return len(params), 1e6 * t_ours / steps, 1e6 * t_apply / steps, 1e6 * t_torch / steps


if __name__ == "__main__":
    main()
