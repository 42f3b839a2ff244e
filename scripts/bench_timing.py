"""Timing set-up shared by bench_net.py and bench_train.py: glibc's allocator pinned at
process start, ``--threads`` and ``--clock``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import torch

TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=8589934592"


def pin_allocator() -> None:
    """Re-execute this process with GLIBC_TUNABLES set: the allocator reads it only at start,
    and without it freed buffers go back to the OS and every iteration pays page faults."""
    if os.environ.get("GLIBC_TUNABLES") != TUNABLES:
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "GLIBC_TUNABLES": TUNABLES})


def add_timing_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter (anchors.md's measure); cpu: the process's CPU "
                             "time, which other processes' load barely moves (use with "
                             "--threads 1, where no thread spins waiting for another)")


def timing_clock(args: argparse.Namespace) -> Callable[[], float]:
    """Apply ``--threads``; the clock ``--clock`` names."""
    torch.set_num_threads(args.threads)
    return time.perf_counter if args.clock == "wall" else time.process_time


def exact_weight_grads(action: Callable[[], None]) -> Callable[[], None]:
    """``action`` with the conv weight gradients summed image by image in Caffe's order
    (``set_exact_weight_grads(True)``), oneDNN's default restored afterwards."""
    from caffe2torch.layers.conv import set_exact_weight_grads

    def run() -> None:
        set_exact_weight_grads(True)
        try:
            action()
        finally:
            set_exact_weight_grads(False)
    return run
