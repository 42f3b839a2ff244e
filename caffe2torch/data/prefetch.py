"""Batches built ahead on worker threads and handed out in order (Caffe's prefetch thread).

Threads suffice because the slow steps, OpenCV's decoding and resizing and numpy's pixel
arithmetic, release the GIL. The split into ``plan`` and ``build`` keeps results independent
of the number of workers: ``plan`` runs on the caller's thread, in order, and does everything
sequential (advancing cursors, shuffling, drawing random numbers); ``build`` does the rest.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Sequence, TypeVar

import numpy as np
import torch

P = TypeVar("P")
R = TypeVar("R")

WORKERS_ENV = "CAFFE2TORCH_DATA_WORKERS"
_setting: dict[str, int | None] = {"workers": None}


def set_workers(count: int | None) -> None:
    """Worker threads for data layers built from now on (0: build batches inside forward;
    None: back to the default)."""
    if count is not None and count < 0:
        raise ValueError(f"worker count must be >= 0, got {count}")
    _setting["workers"] = count


def workers() -> int:
    """:func:`set_workers`' value, else ``$CAFFE2TORCH_DATA_WORKERS``, else min(2, CPU cores)."""
    if _setting["workers"] is not None:
        return _setting["workers"]
    raw = os.environ.get(WORKERS_ENV)
    if raw is not None:
        try:
            return max(int(raw), 0)
        except ValueError:
            raise ValueError(f"${WORKERS_ENV} must be a whole number, got {raw!r}") from None
    return min(2, os.cpu_count() or 1)


def new_batch(shape: Sequence[int]) -> torch.Tensor:
    """An uninitialised float32 batch; page-locked when CUDA is there, so that the copy to
    the GPU (``non_blocking``) overlaps with compute."""
    return torch.empty(tuple(shape), dtype=torch.float32, pin_memory=torch.cuda.is_available())


class BufferPool:
    """Float32 batch buffers, each reused once no tensor uses it any more.

    A batch is tens of MB: glibc hands such blocks back to the kernel when freed, so a fresh
    one page-faults all its memory again, which costs as much as a tenth of the decoding. A
    buffer is free when its reference count is back to what a bare buffer has: every tensor
    sharing it (views, ``detach()``, numpy views of those) keeps one reference through its
    storage. With CUDA there, batches come from :func:`new_batch` (torch caches page-locked
    blocks itself).
    """

    def __init__(self, keep: int):
        self._keep = keep
        self._buffers: list[np.ndarray] = [np.empty(0, np.float32)]
        self._free_refs = sys.getrefcount(self._buffers[0])   # same expression as in take()
        self._buffers.clear()
        self._lock = threading.Lock()

    def take(self, shape: Sequence[int]) -> torch.Tensor:
        """An uninitialised batch of ``shape``."""
        shape = tuple(shape)
        if torch.cuda.is_available():
            return new_batch(shape)
        with self._lock:   # the check and the tensor's reference must not be split by a thread
            for i in range(len(self._buffers)):
                if self._buffers[i].shape == shape and \
                        sys.getrefcount(self._buffers[i]) == self._free_refs:
                    return torch.from_numpy(self._buffers[i])
            buffer = np.empty(shape, np.float32)
            if len(self._buffers) < self._keep:
                self._buffers.append(buffer)
            return torch.from_numpy(buffer)


class Prefetcher(Generic[P, R]):
    """Runs ``build(plan())`` for successive plans, ``depth`` batches ahead, results in order."""

    def __init__(self, plan: Callable[[], P], build: Callable[[P], R], workers: int, depth: int):
        self._plan, self._build = plan, build
        self.workers = workers
        self._depth = max(depth, workers, 1)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[R]] = deque()

    def next(self) -> R:
        """The next batch (errors in building it are raised here)."""
        if not self.workers:
            return self._build(self._plan())
        if self._pool is None:   # started lazily: building a net alone reads nothing ahead
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="caffe2torch-data")
        while len(self._pending) <= self._depth:
            self._pending.append(self._pool.submit(self._build, self._plan()))
        return self._pending.popleft().result()

    def close(self) -> None:
        """Stop the workers (waiting for the batches being built); the rest are dropped."""
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
