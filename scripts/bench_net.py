"""Inference and training-step speed of compiled nets against hand-written PyTorch, and Caffe.

For LeNet (batch 64), CIFAR10-quick (100), AlexNet (8), GoogLeNet (8), ResNet-50 (4) and
MobileNet v1 (8) -- the batches of <shared>/perf/anchors.md, <shared> being
$CAFFE2TORCH_SHARED or else ../shared beside the repository -- this times

* c2t: the golden prototxt (<shared>/golden/nets/<name>/net.prototxt, TEST phase, batch
  resized) compiled by caffe2torch, called as the ``nn.Module`` that ``caffe2torch.load`` gives;
* hand: the same net written idiomatically in plain ``nn`` ops (below): torchvision style,
  in-place ReLU, BatchNorm+Scale as one ``BatchNorm2d(affine=True)``, LRN by
  ``nn.LocalResponseNorm``, in eval mode,

with the same weights (LeNet/CIFAR10-quick: the golden caffemodels; the others: random He
weights and BatchNorm statistics written into the compiled net, then copied over). Before
timing, the two nets' outputs must agree within 1e-4 (and the first layer's weight gradient
within 1e-3 of its scale).

* fwd: ``net(x)`` under ``torch.no_grad()``;
* fwd+bwd: grads set to None, ``net(x).backward(g)`` for a fixed random top diff ``g`` into
  the softmax output (all parameters learn; the input needs no gradient), as a training step.

Timing: --threads threads (2, as in anchors.md), glibc's allocator pinned (GLIBC_TUNABLES,
set by re-executing itself), c2t and hand blocks interleaved (A B B A ...) after a warm-up,
medians of --blocks blocks of --iters iterations. ratio = c2t / hand (goal <= 1.03).
The spread printed is (max - min) / median of each series and the range of the per-pair
ratios: the noise of this run.

Peak memory: the highest total of live CPU allocations made during one iteration, from the
torch profiler's allocator records (every c10 CPU allocation and free, kernel workspaces such
as im2col buffers included; the weights and the input batch, already alive, are not
counted). It is exact per call, unlike RSS, which glibc's caching makes meaningless here;
the median of 5 calls is printed, since a backward's peak varies by up to 10% between calls.

Caffe (est.): anchors.md gives Caffe's time over a hand-written eager module's on the same
kind of machine (Caffe fwd / torch eager fwd, and the same for fwd+bwd); the speed-up of
caffe2torch over real Caffe is that ratio * t_hand / t_c2t.

    python scripts/bench_net.py [--nets lenet,resnet50] [--blocks 7] [--iters N]
                                [--threads 2] [--clock wall] [--quick] [--no-memory] [--variants]
                                [--device cpu|cuda] [--batch N]

On the CPU c2t runs its 2-D convolutions channels-last (caffe2torch.layout); the
hand-written modules stay NCHW, the idiomatic eager form anchors.md timed.
``--device cuda`` times both on the GPU instead, where c2t's default layout is NCHW (each
timed block ends with a synchronize; peak memory from torch.cuda's allocator statistics,
same definition; the Caffe column, whose anchors are CPU times, is left out).
``--batch`` replaces every net's batch (the Caffe column then assumes the anchors' ratio).
``--variants`` adds diagnostic contenders, each with its ratio over hand: c2t in the other
layout (NCHW on the CPU, channels-last on CUDA: ``use_channels_last(False/True)``), the
hand-written module channels-last
(``.to(memory_format=torch.channels_last)``, NCHW input; with its peak memory) and, in
forward+backward, c2t with the convolution weight gradients summed image by image in Caffe's
order (``set_exact_weight_grads(True)``).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_timing import (TUNABLES, add_timing_args, exact_weight_grads,  # noqa: E402
                          pin_allocator, timing_clock)
from caffe2torch.compiler import CaffeNet  # noqa: E402
from caffe2torch.net import compile_net  # noqa: E402
from caffe2torch.weights import copy_weights  # noqa: E402

GOLDEN = Path(os.environ.get("CAFFE2TORCH_SHARED", Path(__file__).resolve().parents[2] / "shared"),
              "golden", "nets")

# anchors.md: (Caffe fwd, torch eager fwd, Caffe fwd+bwd, torch eager fwd+bwd), ms per batch.
ANCHORS = {"lenet": (7.5, 5.3, 19.5, 14.7), "cifar10_quick": (56.9, 27.9, 162.8, 65.9),
           "alexnet": (143.4, 112.6, 388.1, 333.0), "googlenet": (425.5, 299.2, 932.7, 713.6),
           "resnet50": (417.7, 192.0, 1056.3, 570.1),
           "mobilenet_v1": (335.2, 76.2, 890.4, 292.2)}


# -- hand-written nets -----------------------------------------------------------------------
def relu() -> nn.Module:
    return nn.ReLU(inplace=True)


def lrn() -> nn.Module:
    return nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)


class LeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2, 2)
        x = F.max_pool2d(self.conv2(x), 2, 2)
        return F.softmax(self.ip2(F.relu(self.ip1(x.flatten(1)), inplace=True)), 1)


class Cifar10Quick(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.ip1, self.ip2 = nn.Linear(1024, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True), inplace=True)
        x = F.avg_pool2d(F.relu(self.conv2(x), inplace=True), 3, 2, ceil_mode=True)
        x = F.avg_pool2d(F.relu(self.conv3(x), inplace=True), 3, 2, ceil_mode=True)
        return F.softmax(self.ip2(self.ip1(x.flatten(1))), 1)


class AlexNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, 11, 4), relu(), lrn(), nn.MaxPool2d(3, 2),
            nn.Conv2d(96, 256, 5, padding=2, groups=2), relu(), lrn(), nn.MaxPool2d(3, 2),
            nn.Conv2d(256, 384, 3, padding=1), relu(),
            nn.Conv2d(384, 384, 3, padding=1, groups=2), relu(),
            nn.Conv2d(384, 256, 3, padding=1, groups=2), relu(), nn.MaxPool2d(3, 2))
        self.classifier = nn.Sequential(
            nn.Linear(9216, 4096), relu(), nn.Dropout(), nn.Linear(4096, 4096), relu(),
            nn.Dropout(), nn.Linear(4096, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.classifier(self.features(x).flatten(1)), 1)


def conv_relu(cin: int, cout: int, k: int, s: int = 1, p: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, p), relu())


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = conv_relu(cin, c1, 1)
        self.b3 = nn.Sequential(conv_relu(cin, c3r, 1), conv_relu(c3r, c3, 3, p=1))
        self.b5 = nn.Sequential(conv_relu(cin, c5r, 1), conv_relu(c5r, c5, 5, p=2))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_relu(cin, cp, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.net = nn.Sequential(
            conv_relu(3, 64, 7, 2, 3), pool(), lrn(),
            conv_relu(64, 64, 1), conv_relu(64, 192, 3, p=1), lrn(), pool(),
            Inception(192, 64, 96, 128, 16, 32, 32), Inception(256, 128, 128, 192, 32, 96, 64),
            pool(),
            Inception(480, 192, 96, 208, 16, 48, 64), Inception(512, 160, 112, 224, 24, 64, 64),
            Inception(512, 128, 128, 256, 24, 64, 64), Inception(512, 112, 144, 288, 32, 64, 64),
            Inception(528, 256, 160, 320, 32, 128, 128), pool(),
            Inception(832, 256, 160, 320, 32, 128, 128),
            Inception(832, 384, 192, 384, 48, 128, 128),
            nn.AvgPool2d(7, 1), nn.Dropout(0.4), nn.Flatten(), nn.Linear(1024, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(x), 1)


def conv_bn(cin: int, cout: int, k: int, s: int = 1, p: int = 0, groups: int = 1,
            act: bool = True, bias: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, p, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, relu()) if act else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        # Caffe's ResNet order: branch1 (projection) first, stride on the first 1x1.
        self.short = conv_bn(cin, cout, 1, stride, act=False) if cin != cout else None
        self.a, self.b = conv_bn(cin, mid, 1, stride), conv_bn(mid, mid, 3, p=1)
        self.c = conv_bn(mid, cout, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.short is None else self.short(x)  # computed first, as the prototxt
        out = self.c(self.b(self.a(x)))                      # orders it (moves the backward's
        out += short                                         # peak memory by ~4 MB)
        return F.relu(out, inplace=True)


class ResNet50(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        blocks, cin = [], 64
        for mid, n, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(n):
                blocks.append(Bottleneck(cin, mid, 4 * mid, stride if i == 0 else 1))
                cin = 4 * mid
        self.net = nn.Sequential(conv_bn(3, 64, 7, 2, 3, bias=True),
                                 nn.MaxPool2d(3, 2, ceil_mode=True), *blocks,
                                 nn.AvgPool2d(7, 1), nn.Flatten(), nn.Linear(2048, 1000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.net(x), 1)


class MobileNetV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers = [conv_bn(3, 32, 3, 2, 1)]
        for cin, cout, s in ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2),
                             (256, 256, 1), (256, 512, 2), *[(512, 512, 1)] * 5,
                             (512, 1024, 2), (1024, 1024, 1)):
            layers += [conv_bn(cin, cin, 3, s, 1, groups=cin), conv_bn(cin, cout, 1)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(1024, 1000)  # Caffe's fc7 is a 1x1 Convolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)), 1)


# name: (hand-written class, input shape, default iterations per block)
NETS: dict[str, tuple[type[nn.Module], tuple[int, ...], int]] = {
    "lenet": (LeNet, (64, 1, 28, 28), 20),
    "cifar10_quick": (Cifar10Quick, (100, 3, 32, 32), 8),
    "alexnet": (AlexNet, (8, 3, 227, 227), 3),
    "googlenet": (GoogLeNet, (8, 3, 224, 224), 2),
    "resnet50": (ResNet50, (4, 3, 224, 224), 2),
    "mobilenet_v1": (MobileNetV1, (8, 3, 224, 224), 3),
}


# -- weights ---------------------------------------------------------------------------------
def caffe_units(net: CaffeNet) -> list[tuple[str, list[torch.Tensor]]]:
    """Parameter-holding layers in net order; a BatchNorm and its Scale form one unit."""
    units: list[tuple[str, list[torch.Tensor]]] = []
    for step in net.steps:
        blobs = list(net.layers[step.key].blobs)
        if not blobs:
            continue
        if step.type == "Scale":
            assert units and units[-1][0] == "BatchNorm", f"{step.name}: Scale without BatchNorm"
            units[-1] = ("BatchNorm+Scale", units[-1][1] + blobs)
        else:
            units.append((step.type, blobs))
    return units


@torch.no_grad()
def randomize(net: CaffeNet, seed: int = 0) -> None:
    """He-scaled random weights, small biases, plausible BatchNorm statistics and affines."""
    gen = torch.Generator().manual_seed(seed)
    for kind, blobs in caffe_units(net):
        if kind.startswith("BatchNorm"):
            c = blobs[0].numel()
            factor = 2.0  # Caffe stores sums scaled by a moving-average factor
            blobs[0].copy_(factor * 0.1 * torch.randn(c, generator=gen))
            blobs[1].copy_(factor * (0.5 + torch.rand(c, generator=gen)))
            blobs[2].fill_(factor)
            if len(blobs) > 3:
                blobs[3].copy_(0.5 + 0.5 * torch.rand(c, generator=gen))
            if len(blobs) > 4:
                blobs[4].copy_(0.1 * torch.randn(c, generator=gen))
            continue
        weight = blobs[0]
        fan_in = weight[0].numel()
        weight.copy_(torch.randn(weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
        for bias in blobs[1:]:
            bias.copy_(0.01 * torch.randn(bias.shape, generator=gen))


@torch.no_grad()
def copy_to_hand(net: CaffeNet, model: nn.Module) -> None:
    """Copy the compiled net's weights into the hand-written module, layer by layer in order."""
    mine = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))]
    units = caffe_units(net)
    assert len(mine) == len(units), f"{len(mine)} hand-written layers vs {len(units)} Caffe ones"
    for module, (kind, blobs) in zip(mine, units):
        if isinstance(module, nn.BatchNorm2d):
            assert kind == "BatchNorm+Scale" and len(blobs) == 5, kind
            scale = 0.0 if blobs[2].item() == 0 else 1.0 / blobs[2].item()
            module.running_mean.copy_(blobs[0] * scale)
            module.running_var.copy_(blobs[1] * scale)
            module.weight.copy_(blobs[3])
            module.bias.copy_(blobs[4])
            module.eps = float(net.layers[[s.key for s in net.steps
                                            if s.type == "BatchNorm"][0]].eps)
            continue
        assert kind in ("Convolution", "InnerProduct"), kind
        assert module.weight.numel() == blobs[0].numel(), (module, blobs[0].shape)
        module.weight.copy_(blobs[0].reshape(module.weight.shape))
        assert (module.bias is None) == (len(blobs) == 1), module
        if module.bias is not None:
            module.bias.copy_(blobs[1])


def build(name: str, batch: int | None = None
          ) -> tuple[CaffeNet, nn.Module, torch.Tensor, torch.Tensor]:
    """The compiled net, the hand-written one with the same weights, an input and a top diff."""
    cls, shape, _ = NETS[name]
    shape = shape if batch is None else (batch, *shape[1:])
    folder = GOLDEN / name
    net = compile_net(folder / "net.prototxt", "test", input_shapes={net_input(folder): shape})
    if (folder / "weights.caffemodel").exists():
        copy_weights(net, folder / "weights.caffemodel")
    else:
        randomize(net)
    model = cls().eval()
    copy_to_hand(net, model)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen) if name == "lenet" else torch.randn(shape, generator=gen)
    g = torch.randn((shape[0], net.blob_shapes[net.output_names[0]][1]), generator=gen)
    return net, model, x, g


def net_input(folder: Path) -> str:
    return compile_net(folder / "net.prototxt", "test").input_names[0]


def check_agree(name: str, net: CaffeNet, model: nn.Module, x: torch.Tensor,
                g: torch.Tensor) -> tuple[float, float]:
    """Max |output difference|, and the first layer's weight-gradient error ||a - b|| / ||b||.

    The gradient check is loose (1e-2): where a max-pool window holds (near-)ties, a 1e-7
    difference in its input moves the whole gradient of that window to another position
    (AlexNet's pool1 after LRN: about 1e-3), as it would between Caffe and either net.
    """
    outs, grads = [], []
    for module, weight in ((net, caffe_units(net)[0][1][0]), (model, first_weight(model))):
        weight.grad = None
        out = module(x)
        out.backward(g.reshape(out.shape))
        outs.append(out.detach().reshape(g.shape))
        grads.append(weight.grad.reshape(-1).clone())
        zero_grads(module)
    out_err = (outs[0] - outs[1]).abs().max().item()
    grad_err = ((grads[0] - grads[1]).norm() / grads[1].norm().clamp_min(1e-30)).item()
    assert out_err <= 1e-4, f"{name}: outputs differ by {out_err:.3g} (> 1e-4)"
    assert grad_err <= 1e-2, f"{name}: first-layer weight gradients differ by {grad_err:.3g}"
    return out_err, grad_err


def first_weight(model: nn.Module) -> torch.Tensor:
    return next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))).weight


def zero_grads(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


# -- timing ----------------------------------------------------------------------------------
def step_fns(module: nn.Module, x: torch.Tensor, g: torch.Tensor
             ) -> tuple[Callable[[], None], Callable[[], None]]:
    params = [p for p in module.parameters() if p.requires_grad]

    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        out = module(x)
        out.backward(g.reshape(out.shape))

    return fwd, fwd_bwd


def interleaved(actions: list[Callable[[], None]], blocks: int, iters: int,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds per iteration of each action for every block; order alternates A B, B A, ..."""
    for action in actions:  # warm-up (allocator, oneDNN primitive caches)
        action()
        action()
    times: list[list[float]] = [[] for _ in actions]
    order = list(range(len(actions)))
    for _ in range(blocks):
        for i in order:
            start = clock()
            for _ in range(iters):
                actions[i]()
            times[i].append((clock() - start) / iters)
        order.reverse()
    return times


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def peak_mb(action: Callable[[], None], calls: int = 5, cuda: bool = False) -> float:
    """Peak MB of memory allocated during one call, from the profiler's allocator records
    (CPU) or torch.cuda's statistics: the median over ``calls`` calls (a CPU backward's
    peak moves by up to 10% from call to call with the order in which the threads
    allocate and free)."""
    from torch.profiler import ProfilerActivity, profile
    action()
    peaks = []
    for _ in range(calls):
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            action()
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
            continue
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            action()
        records = sorted((e.start_ns(), e.nbytes())
                         for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
        live = peak = 0
        for _, nbytes in records:
            live += nbytes
            peak = max(peak, live)
        peaks.append(peak / 2 ** 20)
    return statistics.median(peaks)


def main() -> None:
    pin_allocator()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", default=",".join(NETS),
                        help=f"comma-separated, from {','.join(NETS)}")
    parser.add_argument("--iters", type=int, default=None,
                        help="iterations per timed block (default: per net, ~0.2-1 s a block)")
    parser.add_argument("--blocks", type=int, default=7, help="timed blocks per contender")
    parser.add_argument("--quick", action="store_true",
                        help="5 blocks and half the iterations (at least 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--variants", action="store_true",
                        help="also time c2t in the other layout, the hand-written module "
                             "channels-last, and c2t with Caffe-order conv weight gradients")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every net (default: anchors.md's, per net)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both nets run (cuda: the first GPU)")
    add_timing_args(parser)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    names = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in names if n not in NETS]
    if unknown:
        parser.error(f"unknown nets {unknown}; choose from {list(NETS)}")
    blocks = 5 if args.quick else max(args.blocks, 1)
    clock = timing_clock(args)
    if cuda:
        host_clock = clock

        def clock() -> float:  # a block's time includes its queued kernels
            torch.cuda.synchronize()
            return host_clock()
    logging.getLogger("caffe2torch").setLevel(logging.WARNING)
    logging.getLogger("torch.profiler").setLevel(logging.ERROR)

    rows, notes = [], []
    for name in names:
        iters = args.iters or NETS[name][2]
        if args.quick:
            iters = max(1, iters // 2)
        net, model, x, g = (t.to(args.device) for t in build(name, args.batch))
        out_err, grad_err = check_agree(name, net, model, x, g)
        notes.append(f"{name}: outputs agree to {out_err:.1e}, first-layer weight grad to "
                     f"{grad_err:.1e} (relative L2); {iters} iterations per block")
        (c_fwd, c_fb), (h_fwd, h_fb) = step_fns(net, x, g), step_fns(model, x, g)
        fwd_actions, fb_actions = [c_fwd, h_fwd], [c_fb, h_fb]
        if args.variants:
            other = copy.deepcopy(net)
            other.use_channels_last(cuda)
            n_fwd, n_fb = step_fns(other, x, g)
            hand_nhwc = copy.deepcopy(model).to(memory_format=torch.channels_last)
            l_fwd, l_fb = step_fns(hand_nhwc, x, g)
            fwd_actions += [n_fwd, l_fwd]
            fb_actions += [n_fb, l_fb] + ([] if cuda else [exact_weight_grads(c_fb)])
        fwd_times = interleaved(fwd_actions, blocks, iters, clock)
        fb_times = interleaved(fb_actions, blocks, iters, clock)
        mem = [float("nan")] * 4
        if not args.no_memory:
            mem = [peak_mb(a, cuda=cuda) for a in (c_fwd, h_fwd, c_fb, h_fb)]
            if args.variants:
                notes.append(f"{name}: peak MB of the hand-written module channels-last: fwd "
                             f"{peak_mb(l_fwd, cuda=cuda):.1f}, "
                             f"fwd+bwd {peak_mb(l_fb, cuda=cuda):.1f}")
        rows.append((name, fwd_times, fb_times, mem))
        zero_grads(net)
        zero_grads(model)
        print(f"... {name} done", file=sys.stderr, flush=True)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"torch {torch.__version__} on {where}, {args.threads} threads, {args.clock} clock, "
          f"GLIBC_TUNABLES={TUNABLES}; load average now {load} on {os.cpu_count()} CPUs;\n"
          f"medians of {blocks} interleaved blocks; ms per batch; ratio = c2t / hand "
          f"(goal <= 1.03);\nspread = (max-min)/median per series, and [min-max] of the "
          f"per-block-pair ratios; peak MB = {args.device} allocations live at once during one "
          f"call;\nvs Caffe = anchors' Caffe/eager ratio x hand / c2t "
          f"(> 1: caffe2torch is faster than real Caffe; the anchors' ratios are for 2 threads).")
    for label, index in (("fwd (no_grad)", 1), ("fwd+bwd", 2)):
        print(f"\n{label}")
        extra = ""
        if args.variants:
            extra = (f"   c2t {'NHWC' if cuda else 'NCHW'}  ratio  hand NHWC  ratio"
                     + ("  exact wgrad  ratio" if index == 2 and not cuda else ""))
        print(f"{'net':<13} {'batch':>5} {'c2t':>8} {'hand':>8} {'ratio':>6} {'pair ratios':>13} "
              f"{'spread c2t/hand':>16} {'peak MB c2t':>11} {'hand':>7} {'vs Caffe':>8}{extra}")
        for name, fwd_times, fb_times, mem in rows:
            times = fwd_times if index == 1 else fb_times
            c, h = (1000 * statistics.median(t) for t in times[:2])
            pairs = [a / b for a, b in zip(times[0], times[1])]
            anchor = ANCHORS[name]
            caffe_ratio = anchor[0] / anchor[1] if index == 1 else anchor[2] / anchor[3]
            mc, mh = mem[:2] if index == 1 else mem[2:]
            line = (f"{name:<13} {args.batch or NETS[name][1][0]:>5} {c:>8.2f} {h:>8.2f} {c / h:>6.3f} "
                    f"{min(pairs):>6.3f}-{max(pairs):<6.3f} "
                    f"{100 * spread(times[0]):>7.1f}%/{100 * spread(times[1]):>4.1f}% "
                    f"{mc:>11.1f} {mh:>7.1f} "
                    + ("     n/a" if cuda else f"{caffe_ratio * h / c:>7.2f}x"))
            for variant in times[2:]:
                v = 1000 * statistics.median(variant)
                line += f"  {v:>9.2f} {v / h:>6.3f}"
            print(line)
    print()
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
