"""HDF5Data and HDF5Output: Caffe's HDF5 readers and writers (hdf5_data_layer.cpp)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from ..formats.atomic import atomic_open
from .base import CaffeLayer, LayerSpec, Shape
from .registry import register


@register("HDF5Data", "HDF5_DATA")
class HDF5Data(CaffeLayer):
    """Reads rows of the datasets named by its tops from a list of .h5 files, in order.

    Rows are taken one at a time across file boundaries, wrapping around at the end of
    the list, exactly as Caffe's ``Next()``; ``shuffle`` permutes files and rows.
    """

    min_tops = 1

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.hdf5_data_param
        if p.batch_size <= 0:
            raise self.error(f"hdf5_data_param.batch_size must be positive, got {p.batch_size}")
        self.batch_size = int(p.batch_size)
        self.shuffle = p.shuffle
        source = self.resolve_path(p.source, "hdf5_data_param.source list")
        lines = [ln.strip() for ln in source.read_text().splitlines() if ln.strip()]
        if not lines:
            raise self.error(f"hdf5_data_param.source '{source}' lists no .h5 files")
        self.files = [self._resolve_h5(line, source.parent) for line in lines]
        self.file_order = list(range(len(self.files)))
        if self.shuffle:
            random.shuffle(self.file_order)
        self.current_file = 0
        self._load(self.files[self.file_order[0]])
        self.current_row = 0

    def _resolve_h5(self, name: str, list_dir: Path) -> Path:
        path = Path(name)
        for candidate in (path, list_dir / path):
            if candidate.exists():
                return candidate
        if self.base_dir is not None and (self.base_dir / path).exists():
            return self.base_dir / path
        raise self.error(f"HDF5 file '{name}' listed in hdf5_data_param.source does not exist")

    def _load(self, path: Path) -> None:
        import h5py

        arrays = []
        with h5py.File(path, "r") as handle:
            for top in self.param.top:
                if top not in handle:
                    raise self.error(f"HDF5 file '{path}' has no dataset '{top}' (the top's name); "
                                     f"it has {sorted(handle.keys())}")
                array = np.asarray(handle[top], dtype=np.float32)
                if array.ndim == 0:
                    raise self.error(f"dataset '{top}' in '{path}' is a scalar; expected rows")
                arrays.append(array)
        rows = {a.shape[0] for a in arrays}
        if len(rows) != 1:
            raise self.error(f"datasets in '{path}' have different row counts {sorted(rows)}")
        self.data = arrays
        self.rows = np.arange(arrays[0].shape[0])
        if self.shuffle:
            np.random.shuffle(self.rows)

    def _next(self) -> None:
        self.current_row += 1
        if self.current_row < len(self.rows):
            return
        if len(self.files) > 1:
            self.current_file += 1
            if self.current_file == len(self.files):
                self.current_file = 0
                if self.shuffle:
                    random.shuffle(self.file_order)
            self._load(self.files[self.file_order[self.current_file]])
        self.current_row = 0
        if self.shuffle:
            np.random.shuffle(self.rows)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [(self.batch_size, *a.shape[1:]) for a in self.data]

    def forward(self) -> tuple[torch.Tensor, ...]:
        picked = [[] for _ in self.data]
        for _ in range(self.batch_size):
            row = self.rows[self.current_row]
            for out, array in zip(picked, self.data):
                out.append(array[row])
            self._next()
        return tuple(torch.from_numpy(np.stack(rows)) for rows in picked)


@register("HDF5Output", "HDF5_OUTPUT")
class HDF5Output(CaffeLayer):
    """Writes its two bottoms (``data`` and ``label``) to an HDF5 file at every forward."""

    min_bottoms = max_bottoms = 2
    max_tops = 0

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.file_name = spec.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is required")

    def forward(self, data: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if data.device.type != "meta":
            import h5py

            with atomic_open(self.file_name, "wb") as handle, h5py.File(handle, "w") as out:
                out.create_dataset("data", data=data.detach().cpu().numpy())
                out.create_dataset("label", data=label.detach().cpu().numpy())
        return ()
