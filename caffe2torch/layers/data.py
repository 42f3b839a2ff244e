"""Caffe's image data layers: Data (LMDB/LevelDB records), ImageData (a list of image files),
WindowData (R-CNN windows) and MemoryData (arrays from pycaffe's ``set_input_arrays``).

Data, ImageData and WindowData build batches ahead on worker threads
(:func:`caffe2torch.data.set_workers`). Every sequential or random choice (next record,
shuffle, crop, mirror, window) is made in order on the forward thread from a generator seeded
by torch's, so batches are repeatable and do not depend on the number of workers.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch

from ..data import DataError, seeded_rng, workers
from ..data.db import RecordReader
from ..data.prefetch import BufferPool, Prefetcher
from ..data.transform import DataTransformer
from ..errors import FormatError, NetError
from ..formats.datum import (datum_image, decode_image, hwc_to_chw, parse_datum, read_image,
                             read_list_file)
from ..proto import caffe_pb2
from .base import CaffeLayer, LayerSpec, Shape
from .registry import register

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Item = tuple[np.ndarray, float, str]    # CxHxW image, label, what it is (for errors)
_PREFETCH = 4                            # Caffe's PREFETCH_COUNT where the layer has no field


class _PrefetchingLayer(CaffeLayer):
    """A layer whose tops (``data`` and, when named, ``label``) come from a :class:`Prefetcher`.

    Subclasses set ``batch_size`` and ``transformer`` and call :meth:`_start` with the image
    shape of the first item; they provide ``_plan()`` (sequential choices, on the forward
    thread) and ``_build(plan)`` (the slow part, on a worker).
    """

    max_bottoms = 0
    min_tops = 1
    max_tops = 2
    batch_size: int
    transformer: DataTransformer

    @contextmanager
    def _naming(self) -> Iterator[None]:
        """Data and format errors become errors naming this layer too."""
        try:
            yield
        except (DataError, FormatError) as exc:
            raise self.error(str(exc)) from None

    def _positive(self, value: int, what: str) -> int:
        if value <= 0:
            raise self.error(f"{what} must be positive, got {value}")
        return int(value)

    def _source(self, value: str, what: str) -> Path:
        if not value:
            raise self.error(f"{what} is required")
        return self.resolve_path(value, what)

    def _start(self, image_shape: tuple[int, ...], depth: int) -> None:
        self.top_shape = (self.batch_size, *image_shape)
        self._prefetch = Prefetcher(self._plan, self._build, workers(), depth)
        # batches queued or being built, the one in use and the one before it
        self._batches = BufferPool(keep=depth + self._prefetch.workers + 3)

    def _plan(self) -> object:
        raise NotImplementedError

    def _build(self, plan: object) -> Batch:
        raise NotImplementedError

    def _image_prefix(self, root_folder: str, first: str) -> str:
        """Caffe joins ``root_folder`` and each listed name as strings, read from the working
        directory; when the first image is not found so, look beside the prototxt."""
        path = Path(root_folder + first)
        if path.is_absolute() or path.exists() or self.base_dir is None:
            return root_folder
        beside = f"{self.base_dir}/{root_folder}"
        return beside if Path(beside + first).exists() else root_folder

    def _assemble(self, count: int, load: Callable[[int], Item],
                  draws: np.ndarray | None) -> Batch:
        """Load and transform ``count`` items; the first one sets the batch's image size, as in
        Caffe's ``load_batch``."""
        first = load(0)
        shape = self.transformer.output_shape(first[0].shape, first[2])
        data = self._batches.take((count, *shape))
        out = data.numpy()
        labels = np.empty(count, np.float32)
        for i in range(count):
            image, labels[i], source = first if i == 0 else load(i)
            self.transformer(image, out[i], None if draws is None else draws[i], source)
        return data, torch.from_numpy(labels)

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [self.top_shape, (self.batch_size,)][:self.num_tops]

    def forward(self) -> torch.Tensor | Batch:
        with self._naming():
            data, labels = self._prefetch.next()
        return (data, labels) if self.num_tops == 2 else data


@register("Data", "DATA")
class Data(_PrefetchingLayer):
    """Datum records of an LMDB (or LevelDB) in key order, round and round (``data_param``).

    ``rand_skip`` skips a random number of records at the start, as Caffe did before its data
    reader rewrite (BVLC master ignores it). Without ``backend`` the folder's content decides.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.data_param
        self.batch_size = self._positive(p.batch_size, "data_param.batch_size")
        source = self._source(p.source, "data_param.source")
        declared = None
        if p.HasField("backend"):
            declared = "lmdb" if p.backend == caffe_pb2.DataParameter.LMDB else "leveldb"
        with self._naming():
            self.transformer = DataTransformer(spec.param.transform_param, spec.phase,
                                               self.resolve_path)
            self.reader = RecordReader(source, declared)
            needs_rng = self.transformer.needs_rand or p.rand_skip
            self.rng = seeded_rng() if needs_rng else None
            for _ in range(int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0):
                self.reader.next()
            image, _, what = self._load(*self.reader.peek())
            self._start(self.transformer.output_shape(image.shape, what), p.prefetch)

    def _load(self, key: bytes, value: bytes) -> Item:
        what = f"record '{key.decode(errors='replace')}' of '{self.reader.path}'"
        datum = parse_datum(value, what)
        t = self.transformer
        return datum_image(datum, what, t.force_color, t.force_gray), datum.label, what

    def _plan(self) -> tuple[list[tuple[bytes, bytes]], np.ndarray | None]:
        records = [self.reader.next() for _ in range(self.batch_size)]
        return records, self.transformer.draws(self.rng, self.batch_size)

    def _build(self, plan: tuple[list[tuple[bytes, bytes]], np.ndarray | None]) -> Batch:
        records, draws = plan
        return self._assemble(len(records), lambda i: self._load(*records[i]), draws)


@register("ImageData", "IMAGE_DATA")
class ImageData(_PrefetchingLayer):
    """Images named in a ``path label`` list, read by OpenCV (``image_data_param``).

    ``root_folder`` is prepended to each name; ``new_height``/``new_width`` resize with
    INTER_LINEAR; ``shuffle`` reorders the list at the start and after every pass.
    """

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.image_data_param
        self.batch_size = self._positive(p.batch_size, "image_data_param.batch_size")
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.error("image_data_param: new_height and new_width must be set together")
        if p.label_divide_factor != 1:
            raise self.error("image_data_param.label_divide_factor (a fork option) is not "
                             "supported")
        self.is_color, self.size = p.is_color, (p.new_height, p.new_width)
        self.shuffle = p.shuffle
        self.source = self._source(p.source, "image_data_param.source")
        with self._naming():
            self.lines = read_list_file(self.source)
            if not self.lines:
                raise self.error(f"image_data_param.source '{self.source}' lists no images")
            self.prefix = self._image_prefix(p.root_folder, self.lines[0][0])
            self.order = np.arange(len(self.lines))
            self.transformer = DataTransformer(spec.param.transform_param, spec.phase,
                                               self.resolve_path)
            needs_rng = self.shuffle or p.rand_skip or self.transformer.needs_rand
            self.rng = seeded_rng() if needs_rng else None
            if self.shuffle:
                self.rng.shuffle(self.order)
            self.pos = int(self.rng.integers(p.rand_skip)) if p.rand_skip else 0
            if self.pos >= len(self.lines):
                raise self.error(f"rand_skip drew {self.pos}, but the list has only "
                                 f"{len(self.lines)} images")
            image, _, what = self._load(self.lines[self.order[self.pos]])
            self._start(self.transformer.output_shape(image.shape, what), _PREFETCH)

    def _load(self, line: tuple[str, int]) -> Item:
        path = self.prefix + line[0]
        image = read_image(path, self.is_color, *self.size)
        if image is None:
            raise DataError(f"could not open or read image '{path}' (listed in '{self.source}')")
        return hwc_to_chw(image), line[1], f"image '{path}'"

    def _plan(self) -> tuple[list[tuple[str, int]], np.ndarray | None]:
        lines = []
        for _ in range(self.batch_size):
            lines.append(self.lines[self.order[self.pos]])
            self.pos += 1
            if self.pos == len(self.lines):
                self.pos = 0
                if self.shuffle:
                    self.rng.shuffle(self.order)
        return lines, self.transformer.draws(self.rng, self.batch_size)

    def _build(self, plan: tuple[list[tuple[str, int]], np.ndarray | None]) -> Batch:
        lines, draws = plan
        return self._assemble(len(lines), lambda i: self._load(lines[i]), draws)


def _round(value: np.float32) -> int:
    """C's ``round``: halves away from zero (Python's ``round`` goes to even)."""
    return int(math.copysign(math.floor(abs(float(value)) + 0.5), value))


@register("WindowData", "WINDOW_DATA")
class WindowData(_PrefetchingLayer):
    """R-CNN training windows (``window_data_layer.cpp``).

    The window file repeats ``# index``, image path, channels, height, width, the window
    count and one ``label overlap x1 y1 x2 y2`` line per window. Windows with overlap >=
    ``fg_threshold`` are foreground, < ``bg_threshold`` background; each batch samples
    ``fg_fraction`` of its items from the foreground and the rest from the background, with
    replacement. A window is widened by ``context_pad`` (and made square in crop_mode
    ``square``), clipped to the image, warped to ``crop_size`` and placed where the unclipped
    region would fall; the rest of the crop stays 0. As in Caffe, the pixel scale is
    ``window_data_param.scale`` and the crop, mirror and mean come from ``transform_param``.
    """

    min_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.window_data_param
        t = spec.param.transform_param
        self.batch_size = self._positive(p.batch_size, "window_data_param.batch_size")
        self.crop = self._positive(t.crop_size, "transform_param.crop_size")
        if p.crop_mode not in ("warp", "square"):
            raise self.error(f"window_data_param.crop_mode must be 'warp' or 'square', "
                             f"got '{p.crop_mode}'")
        if 2 * p.context_pad >= self.crop:
            raise self.error(f"window_data_param.context_pad {p.context_pad} leaves nothing of "
                             f"the {self.crop}-pixel crop")
        self.square, self.context_pad = p.crop_mode == "square", p.context_pad
        self.scale, self.fg_fraction = np.float32(p.scale), np.float32(p.fg_fraction)
        self.source = self._source(p.source, "window_data_param.source")
        with self._naming():
            self.transformer = DataTransformer(t, spec.phase, self.resolve_path)
            self._read_windows(p, self.source.read_text().split())
            self.mean = self._centre_mean()
            self.cache = [self._file_bytes(path) for path, _ in self.images] \
                if p.cache_images else None
        self.rng = seeded_rng()
        self._start((3, self.crop, self.crop), _PREFETCH)

    def _read_windows(self, p: caffe_pb2.WindowDataParameter, tokens: list[str]) -> None:
        """Fill ``images`` [(path, channels)] and the fg/bg windows [(image, label, x1, y1, x2,
        y2)] from the window file's whitespace-separated tokens."""
        self.images: list[tuple[str, int]] = []
        fg, bg = [], []
        i = 0
        try:
            while i < len(tokens):
                if tokens[i] != "#":
                    raise ValueError(f"expected '#', found '{tokens[i]}'")
                index, path = int(tokens[i + 1]), tokens[i + 2]
                channels, count = int(tokens[i + 3]), int(tokens[i + 6])
                if index != len(self.images):
                    raise ValueError(f"image index {index} out of order (expected "
                                     f"{len(self.images)})")
                if not self.images:
                    prefix = self._image_prefix(p.root_folder, path)
                self.images.append((prefix + path, channels))
                i += 7
                for _ in range(count):
                    label, overlap = int(tokens[i]), float(np.float32(tokens[i + 1]))
                    box = [int(v) for v in tokens[i + 2:i + 6]]
                    if len(box) != 4:
                        raise IndexError
                    if overlap >= np.float32(p.fg_threshold):
                        if label <= 0:
                            raise ValueError(f"foreground window with label {label} (must be > 0)")
                        fg.append((index, label, *box))
                    elif overlap < np.float32(p.bg_threshold):
                        bg.append((index, 0, *box))
                    i += 6
        except (ValueError, IndexError) as exc:
            detail = f": {exc}" if str(exc) else ""
            raise DataError(f"window file '{self.source}' is malformed at token {i + 1}"
                            f"{detail}") from None
        if not self.images:
            raise DataError(f"window file '{self.source}' is empty")
        if not fg or not bg:
            raise DataError(f"window file '{self.source}' has {len(fg)} foreground and "
                            f"{len(bg)} background windows; WindowData needs both")
        if any(channels != 3 for _, channels in self.images):
            raise DataError(f"window file '{self.source}' declares non-3-channel images; "
                            "WindowData reads every image in colour")
        self.windows = (np.array(bg, np.int64), np.array(fg, np.int64))

    def _centre_mean(self) -> np.ndarray | None:
        """The mean for a crop: the centre of the mean file (Caffe offsets both axes by the
        width's margin), or the per-channel values."""
        t = self.transformer
        if t.mean_file is not None:
            _, height, width = t.mean_file.shape
            off = (width - self.crop) // 2
            if off < 0 or height < off + self.crop:
                raise DataError(f"transform_param.mean_file '{t.mean_path}' is {height}x{width}, "
                                f"too small for crop_size {self.crop}")
            return t.mean_file[:, off:off + self.crop, off:off + self.crop]
        if t.mean_values is not None:
            if len(t.mean_values) not in (1, 3):
                raise DataError(f"transform_param gives {len(t.mean_values)} mean_value(s) for "
                                "3-channel images; give 1 or 3")
            return t.mean_values[:, None, None]
        return None

    def _file_bytes(self, path: str) -> np.ndarray:
        try:
            return np.fromfile(path, dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"cannot read image '{path}' (window_data_param.cache_images): "
                            f"{exc.strerror}") from None

    def _plan(self) -> list[tuple[np.ndarray, bool]]:
        num_fg = int(np.float32(self.batch_size) * self.fg_fraction)
        picks = []
        for is_fg, count in enumerate((self.batch_size - num_fg, num_fg)):
            pool = self.windows[is_fg]
            for _ in range(count):
                window = pool[int(self.rng.integers(2**32)) % len(pool)]
                mirror = self.transformer.mirror and bool(self.rng.integers(2**32) % 2)
                picks.append((window, mirror))
        return picks

    def _build(self, picks: list[tuple[np.ndarray, bool]]) -> Batch:
        data = self._batches.take((self.batch_size, 3, self.crop, self.crop))
        out = data.numpy()
        out.fill(0)
        labels = np.empty(self.batch_size, np.float32)
        for i, (window, mirror) in enumerate(picks):
            path = self.images[window[0]][0]
            if self.cache is not None:
                image = decode_image(self.cache[window[0]], f"image '{path}'", force_color=True)
            elif (image := read_image(path)) is None:
                raise DataError(f"could not open or read image '{path}' (in window file "
                                f"'{self.source}')")
            self._warp(image, window[2:], mirror, out[i], path)
            labels[i] = window[1]
        return data, torch.from_numpy(labels)

    def _warp(self, image: np.ndarray, box: np.ndarray, mirror: bool, out: np.ndarray,
              path: str) -> None:
        """Cut the window out of ``image`` and warp it into ``out`` (window_data_layer.cpp)."""
        crop, f32 = self.crop, np.float32
        x1, y1, x2, y2 = (int(v) for v in box)
        rows, cols = image.shape[:2]
        size_h = size_w = crop
        pad_h = pad_w = 0
        if self.context_pad > 0 or self.square:
            context = f32(crop) / f32(crop - 2 * self.context_pad)
            half_h, half_w = f32(y2 - y1 + 1) / f32(2), f32(x2 - x1 + 1) / f32(2)
            centre_x, centre_y = f32(x1) + half_w, f32(y1) + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _round(centre_x - half_w * context), _round(centre_x + half_w * context)
            y1, y2 = _round(centre_y - half_h * context), _round(centre_y + half_h * context)
            scale_x, scale_y = f32(crop) / f32(x2 - x1 + 1), f32(crop) / f32(y2 - y1 + 1)
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2 = max(0, x2 - cols + 1)
            x1, x2 = x1 + pad_x1, x2 - pad_x2
            y1, y2 = y1 + pad_y1, y2 - max(0, y2 - rows + 1)
            size_w = _round(f32(x2 - x1 + 1) * scale_x)
            size_h = _round(f32(y2 - y1 + 1) * scale_y)
            pad_h = _round(f32(pad_y1) * scale_y)
            pad_w = _round(f32(pad_x2 if mirror else pad_x1) * scale_x)
            size_h, size_w = min(size_h, crop - pad_h), min(size_w, crop - pad_w)
        if not (0 <= x1 <= x2 < cols and 0 <= y1 <= y2 < rows) or min(size_h, size_w) <= 0:
            raise DataError(f"window ({x1}, {y1}, {x2}, {y2}) does not fit image '{path}' "
                            f"({cols}x{rows})")
        patch = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], (size_w, size_h),
                           interpolation=cv2.INTER_LINEAR)
        if mirror:
            patch = cv2.flip(patch, 1)
        region = out[:, pad_h:pad_h + size_h, pad_w:pad_w + size_w]
        pixels = hwc_to_chw(patch)
        if self.mean is None:
            np.copyto(region, pixels)
        else:
            mean = self.mean if self.mean.shape[1] == 1 else \
                self.mean[:, pad_h:pad_h + size_h, pad_w:pad_w + size_w]
            np.subtract(pixels, mean, out=region, dtype=np.float32)
        if self.scale != 1:
            np.multiply(region, self.scale, out=region)


@register("MemoryData", "MEMORY_DATA")
class MemoryData(CaffeLayer):
    """Batches of arrays given by pycaffe's ``net.set_input_arrays(data, labels)``, in order
    and round again, neither copied nor transformed (Caffe's ``MemoryDataLayer::Reset``).

    As in Caffe the label top is (N,) at setup and (N, 1, 1, 1) once data flows.
    """

    max_bottoms = 0
    min_tops = max_tops = 2

    def __init__(self, spec: LayerSpec):
        super().__init__(spec)
        p = spec.param.memory_data_param
        self.shape = (p.batch_size, p.channels, p.height, p.width)
        if min(self.shape) <= 0:
            raise self.error(f"memory_data_param: batch_size, channels, height and width must "
                             f"all be positive, got {list(self.shape)}")
        self.transforms = spec.param.HasField("transform_param")
        self._data: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        self._pos = 0

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Serve ``data`` (N x C x H x W) and ``labels`` (N, or N x 1 x 1 x 1) from now on."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32)
        if data.ndim != 4 or data.shape[1:] != self.shape[1:]:
            raise self.error(f"data array must be N x {' x '.join(map(str, self.shape[1:]))}, "
                             f"got shape {list(data.shape)}")
        if labels.shape not in ((len(data),), (len(data), 1, 1, 1)):
            raise self.error(f"labels array must be ({len(data)},) or ({len(data)}, 1, 1, 1) "
                             f"to match the data, got shape {list(labels.shape)}")
        if not len(data) or len(data) % self.shape[0]:
            raise self.error(f"the arrays' first dimension ({len(data)}) must be a positive "
                             f"multiple of the batch size {self.shape[0]}")
        if self.transforms:
            log.warning("layer '%s': MemoryData does not transform array data on Reset()",
                        self.layer_name)
        self._data = torch.from_numpy(data)
        self._labels = torch.from_numpy(labels.reshape(-1))
        self._pos = 0

    def infer_shapes(self, bottom_shapes: list[Shape]) -> list[Shape]:
        return [self.shape, self.shape[:1]]

    def forward(self) -> Batch:
        if self._data is None:
            raise self.error("has no data yet: call net.set_input_arrays(data, labels) first")
        size, pos = self.shape[0], self._pos
        self._pos = (pos + size) % len(self._data)
        return self._data[pos:pos + size], self._labels[pos:pos + size].view(size, 1, 1, 1)


def set_input_arrays(module: torch.nn.Module, data: np.ndarray, labels: np.ndarray) -> None:
    """pycaffe's ``Net.set_input_arrays``: the net's first layer must be MemoryData."""
    first = module.layers[module.steps[0].key] if module.steps else None
    if not isinstance(first, MemoryData):
        raise NetError("set_input_arrays may only be called if the first layer is a "
                       "MemoryData layer")
    first.reset(data, labels)
