"""Caffe's dataset tools with Caffe's flags: ``convert_imageset`` (image files and a
``path label`` list to an LMDB/LevelDB of Datum records) and ``compute_image_mean`` (a
database to the mean image as a .binaryproto).

Records are byte for byte what Caffe writes (keys ``%08d_<path>``, the same Datum fields,
OpenCV's decoding, resizing and encoding). Only the argument declarations load at the
command line's start; numpy, OpenCV and torch are imported when a tool runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

_CHUNK = 1000          # images read in parallel between two database commits
_PROGRESS_FROM = 1000  # lists at least this long get a progress bar


def _match_ext(name: str, encoding: str) -> bool:
    """Caffe's ``matchExt``: the file's extension names ``encoding`` (jpeg counts as jpg)."""
    ext = name.rpartition(".")[2].lower() if "." in name else name.lower()
    return ext == encoding.lower() or (encoding.lower() == "jpg" and ext == "jpeg")


def _record(filename: str, label: int, is_color: bool, height: int, width: int,
            encoding: str) -> tuple[bytes, int] | None:
    """Caffe's ``ReadImageToDatum``: the serialized Datum and its pixel count, or None when
    the image cannot be read."""
    import cv2

    from .data import DataError
    from .formats.datum import encoded_datum, image_to_datum, read_image

    image = read_image(filename, is_color, height, width)
    if image is None:
        return None
    size = image.size
    if not encoding:
        return image_to_datum(image, label).SerializeToString(), size
    if (image.ndim == 3) == is_color and not height and not width and \
            _match_ext(filename, encoding):
        data = Path(filename).read_bytes()   # the file as it is, as Caffe's ReadFileToDatum
    else:
        ok, buf = cv2.imencode("." + encoding, image)
        if not ok:
            raise DataError(f"OpenCV cannot encode '{filename}' as '{encoding}'")
        data = buf.tobytes()
    return encoded_datum(data, label).SerializeToString(), size


def convert_imageset(root: str, list_file: str | Path, db: str | Path, *, gray: bool = False,
                     shuffle: bool = False, backend: str = "lmdb", resize_width: int = 0,
                     resize_height: int = 0, check_size: bool = False, encoded: bool = False,
                     encode_type: str = "", strict: bool = False,
                     threads: int | None = None) -> tuple[int, int]:
    """Caffe's ``convert_imageset ROOT LIST DB``; returns (records written, images skipped).

    ``root`` is prepended to each listed name as a string (give it its trailing '/').
    Unreadable images are skipped with a warning naming the file, as Caffe does, or stop
    the conversion with ``strict``. The database is built beside ``db`` and moved there
    only when complete; an existing ``db`` is never replaced.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    from .data import DataError, seeded_rng, workers
    from .data.db import RecordWriter
    from .formats.datum import read_list_file

    lines = read_list_file(list_file)
    if shuffle:
        seeded_rng().shuffle(lines)
    height, width = max(resize_height, 0), max(resize_width, 0)
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true")

    def load(line_id: int) -> tuple[bytes, int] | None:
        name, label = lines[line_id]
        encoding = encode_type
        if encoded and not encoding:
            if "." not in name:
                raise DataError(f"cannot guess the encoding of '{name}' from its name; give "
                                "--encode_type")
            encoding = name.rpartition(".")[2].lower()
        return _record(root + name, label, not gray, height, width, encoding)

    written = skipped = 0
    first_size = None
    with RecordWriter(db, backend) as writer, \
            ThreadPoolExecutor(threads or max(workers(), 1)) as pool, \
            tqdm(total=len(lines), unit="img", desc="convert_imageset",
                 disable=True if len(lines) < _PROGRESS_FROM else None) as progress:
        for start in range(0, len(lines), _CHUNK):
            ids = range(start, min(start + _CHUNK, len(lines)))
            for line_id, result in zip(ids, pool.map(load, ids)):
                progress.update()
                name = lines[line_id][0]
                if result is None:
                    if strict:
                        raise DataError(f"could not open or find image '{root + name}' "
                                        f"(listed in '{list_file}')")
                    log.warning("could not open or find image '%s'; skipped", root + name)
                    skipped += 1
                    continue
                value, size = result
                first_size = size if first_size is None else first_size
                if check_size and size != first_size:
                    raise DataError(f"image '{root + name}' has {size} values, the first image "
                                    f"{first_size} (--check_size)")
                key = f"{line_id:08d}_{name}".encode("utf-8", "surrogateescape")
                writer.put(key, value)
                written += 1
    return written, skipped


def compute_image_mean(db: str | Path, output: str | Path | None = None,
                       backend: str | None = None) -> "np.ndarray":
    """Caffe's ``compute_image_mean DB [OUTPUT]``: the float32 mean of every record (encoded
    ones decoded as stored) as a 1xCxHxW array, summed and divided in float32 as Caffe does,
    and written as a legacy-shaped BlobProto when ``output`` is given."""
    import numpy as np

    from .data import DataError
    from .data.db import RecordReader
    from .formats.binaryproto import write_blobproto
    from .formats.datum import datum_image, parse_datum

    reader = RecordReader(db, backend)
    total: np.ndarray | None = None
    count = 0
    for key, value in reader:
        what = f"record '{key.decode(errors='replace')}' of '{db}'"
        image = datum_image(parse_datum(value, what), what)
        if total is None:
            total = np.zeros(image.shape, np.float32)
        elif image.shape != total.shape:
            raise DataError(f"{what} is {'x'.join(map(str, image.shape))} (CxHxW), the first "
                            f"record {'x'.join(map(str, total.shape))}; all must have one size")
        total += image
        count += 1
    mean = (total / np.float32(count))[None]
    if output is not None:
        write_blobproto(output, mean, legacy=True)
    return mean


def channel_means(mean: "np.ndarray") -> list[float]:
    """The per-channel means Caffe's tool prints: float32 sums in pixel order, over H*W."""
    import numpy as np

    flat = mean.reshape(mean.shape[-3], -1)
    return [float(np.cumsum(row, dtype=np.float32)[-1] / np.float32(flat.shape[1]))
            for row in flat]


# -- command line -----------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "True", "1", "yes"), ("false", "False", "0", "no")


def _switch(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """A gflags boolean: ``--name``, ``--name=true`` and ``--name=false``, ``--noname``
    (after the CLI's rewriting, ``-name`` and ``-name=true`` too). A bare ``--name`` takes no
    value, so it never swallows the positional argument after it."""
    parser.add_argument(f"--{name}", action="store_true", help=help)
    for value, spellings in ((True, _TRUE), (False, _FALSE)):
        extra = [f"--no{name}"] if not value else []
        parser.add_argument(*[f"--{name}={v}" for v in spellings], *extra, dest=name,
                            action="store_const", const=value, help=argparse.SUPPRESS)


def convert_imageset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="folder prepended to each listed image name (as a string: "
                                     "keep its trailing '/')")
    parser.add_argument("listfile", help="text file of 'path label' lines")
    parser.add_argument("db", help="the database folder to create (must not exist)")
    _switch(parser, "gray", "treat images as grayscale ones")
    _switch(parser, "shuffle", "randomly shuffle the order of images and their labels")
    parser.add_argument("--backend", default="lmdb", choices=("lmdb", "leveldb"),
                        help="the database kind (leveldb needs the plyvel package)")
    parser.add_argument("--resize_width", type=int, default=0, help="width images are resized to")
    parser.add_argument("--resize_height", type=int, default=0,
                        help="height images are resized to")
    _switch(parser, "check_size", "check that all the datums have the same size")
    _switch(parser, "encoded", "store the encoded image file in the datum")
    parser.add_argument("--encode_type", default="",
                        help="what type to encode images as ('png', 'jpg', ...)")
    _switch(parser, "strict", "stop at the first unreadable image instead of skipping it")


def convert_imageset_command(args: argparse.Namespace) -> int:
    written, skipped = convert_imageset(
        args.root, args.listfile, args.db, gray=args.gray, shuffle=args.shuffle,
        backend=args.backend, resize_width=args.resize_width, resize_height=args.resize_height,
        check_size=args.check_size, encoded=args.encoded, encode_type=args.encode_type,
        strict=args.strict)
    note = f" ({skipped} unreadable image(s) skipped)" if skipped else ""
    print(f"convert_imageset: processed {written} files into {args.db}{note}", file=sys.stderr)
    return 0


def compute_image_mean_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("db", help="the LMDB/LevelDB folder")
    parser.add_argument("output", nargs="?", help="the mean .binaryproto to write")
    parser.add_argument("--backend", default=None, choices=("lmdb", "leveldb"),
                        help="the database kind (default: what the folder holds)")


def compute_image_mean_command(args: argparse.Namespace) -> int:
    mean = compute_image_mean(args.db, args.output, args.backend)
    if args.output:
        print(f"compute_image_mean: wrote {args.output}", file=sys.stderr)
    print(f"Number of channels: {mean.shape[1]}", file=sys.stderr)
    for c, value in enumerate(channel_means(mean)):
        print(f"mean_value channel [{c}]: {value:.6g}", file=sys.stderr)
    return 0


# name -> (help, argument declarations, run): the command line's table takes these as they are.
COMMANDS = {
    "convert_imageset": ("convert image files listed as 'path label' lines into an LMDB/LevelDB "
                         "of Datum records (Caffe's tool and flags)",
                         convert_imageset_arguments, convert_imageset_command),
    "compute_image_mean": ("the mean image of an LMDB/LevelDB, written as a .binaryproto "
                           "(Caffe's tool)", compute_image_mean_arguments,
                           compute_image_mean_command),
}
