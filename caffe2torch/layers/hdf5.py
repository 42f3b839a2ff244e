"""HDF5Data and HDF5Output: Caffe's HDF5 readers and writers (hdf5_data_layer.cpp)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..data import seeded_rng
from ..formats.atomic import atomic_open
from .base import CaffeLayer, LayerSpec, Shape
from .registry import register


@register("HDF5Data", "HDF5_DATA")
class HDF5Data(CaffeLayer):
    """Reads rows of the datasets named by its tops from a list of .h5 files, in order.

    Rows are taken one at a time across file boundaries, wrapping around at the end of
    the list, exactly as Caffe's ``Next()``; ``shuffle`` permutes files and rows (from a
    generator seeded by torch's, so runs repeat). The list holds whitespace-separated names,
    read from the working directory, else beside the list or the prototxt.
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
        names = source.read_text().split()
        if not names:
            raise self.error(f"hdf5_data_param.source '{source}' lists no .h5 files")
        self.files = [self._resolve_h5(name, source.parent) for name in names]
        self.rng = seeded_rng() if self.shuffle else None
        self.file_order = np.arange(len(self.files))
        if self.shuffle:
            self.rng.shuffle(self.file_order)
        self.current_file = 0
        self.data: list[np.ndarray] = []
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
        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise self.error(f"cannot read HDF5 file '{path}': {exc}") from None
        with handle:
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
        if 0 in rows:
            raise self.error(f"datasets in '{path}' have no rows")
        for top, old, new in zip(self.param.top, self.data, arrays):
            if old.shape[1:] != new.shape[1:]:
                raise self.error(f"dataset '{top}' in '{path}' has rows of shape "
                                 f"{list(new.shape[1:])}, the first file's are "
                                 f"{list(old.shape[1:])}")
        self.data = arrays
        self.rows = np.arange(arrays[0].shape[0])
        if self.shuffle:
            self.rng.shuffle(self.rows)

    def _next(self) -> None:
        self.current_row += 1
        if self.current_row < len(self.rows):
            return
        if len(self.files) > 1:
            self.current_file += 1
            if self.current_file == len(self.files):
                self.current_file = 0
                if self.shuffle:
                    self.rng.shuffle(self.file_order)
            self._load(self.files[self.file_order[self.current_file]])
        self.current_row = 0
        if self.shuffle:
            self.rng.shuffle(self.rows)

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
    """Writes its two bottoms to datasets ``data`` and ``label`` of an HDF5 file.

    As Caffe's ``SaveBlobs`` the datasets are float32 and 4-D (num, channels, height, width:
    a label of shape (N,) is stored as (N, 1, 1, 1)). Caffe can write one batch only (a
    second forward fails on the existing datasets); here every forward replaces the file
    atomically with the latest batch.
    """

    min_bottoms = max_bottoms = 2
    max_tops = 0

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        self.file_name = spec.param.hdf5_output_param.file_name
        if not self.file_name:
            raise self.error("hdf5_output_param.file_name is required")

    def _legacy(self, blob: torch.Tensor, what: str) -> np.ndarray:
        """A blob as Caffe's 4-D num/channels/height/width array (trailing 1s added)."""
        if blob.dim() > 4 or blob.dim() == 0:
            raise self.error(f"bottom '{what}' has {blob.dim()} axes; HDF5Output writes blobs "
                             "of 1 to 4 axes")
        array = blob.detach().to("cpu", torch.float32).numpy()
        return array.reshape(*array.shape, *[1] * (4 - array.ndim))

    def forward(self, data: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if data.device.type != "meta":
            import h5py

            if data.shape[:1] != label.shape[:1]:
                raise self.error(f"data and label must have the same batch size, got "
                                 f"{list(data.shape)} and {list(label.shape)}")
            arrays = {"data": self._legacy(data, "data"), "label": self._legacy(label, "label")}
            with atomic_open(self.file_name, "wb") as handle, h5py.File(handle, "w") as out:
                for name, array in arrays.items():
                    out.create_dataset(name, data=array)
        return ()
