"""Caffe's data pipeline: record databases, the DataTransformer and background prefetching.

The layers built on it (Data, ImageData, MemoryData, WindowData) live in
``caffe2torch.layers.data``; ``convert_imageset`` and ``compute_image_mean`` in
``caffe2torch.dataset_tools``.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import CaffeError


class DataError(CaffeError, ValueError):
    """A data source is missing, unreadable or does not fit the net; names the file or record."""


def seeded_rng() -> np.random.Generator:
    """A numpy Generator drawn from torch's global generator.

    ``caffe2torch.set_random_seed`` (or a solver's ``random_seed``) therefore makes every
    shuffle, crop and mirror repeat run to run, while each layer still gets its own stream.
    """
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))


from .prefetch import set_workers, workers  # noqa: E402  (prefetch imports DataError)

__all__ = ["DataError", "seeded_rng", "set_workers", "workers"]
