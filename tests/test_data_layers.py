"""Data layers, transforms and dataset tools: behaviour beyond the golden cases, and bad input.

Every bad input must fail with one clear error naming the thing at fault (the database, the
record, the image file, the mean file, the crop), never a traceback from deep inside.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest

import caffe2torch as caffe
from caffe2torch.cli import main as cli
from caffe2torch.data import DataError, set_workers
from caffe2torch.data.db import RecordReader
from caffe2torch.dataset_tools import compute_image_mean, convert_imageset
from caffe2torch.errors import NetError
from caffe2torch.formats import write_blobproto
from caffe2torch.formats.datum import array_to_datum, datum_to_array
from caffe2torch.proto import caffe_pb2
from conftest import shared_path


def _images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """Colour PNGs of the given (height, width) and their list file ``list.txt``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(folder / f"im{i}.png"), rng.integers(0, 256, (h, w, 3), np.uint8))
        lines.append(f"im{i}.png {i % 3}")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt"


def _lmdb(tmp: Path, sizes: list[tuple[int, int]], **flags) -> Path:
    listfile = _images(tmp / "images", sizes)
    convert_imageset(f"{tmp}/images/", listfile, tmp / "db", **flags)
    return tmp / "db"


def _net(tmp: Path, layer: str, phase=caffe.TEST, name: str = "net.prototxt") -> caffe.Net:
    path = tmp / name
    path.write_text(textwrap.dedent(layer))
    return caffe.Net(str(path), phase)


def _data_layer(source: Path | str, transform: str = "", batch: int = 2, extra: str = "") -> str:
    return f"""
        layer {{ name: "data" type: "Data" top: "data" top: "label"
          transform_param {{ {transform} }}
          data_param {{ source: "{source}" batch_size: {batch} {extra} }} }}
        """


# -- bad input --------------------------------------------------------------------------------

def test_missing_db_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(NetError, match=r"data_param.source '.*nowhere' does not exist"):
        _net(tmp_path, _data_layer(tmp_path / "nowhere"))


def test_folder_that_is_not_a_db(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    with pytest.raises(NetError, match=r"plain' is neither an LMDB .* nor a LevelDB"):
        _net(tmp_path, _data_layer(tmp_path / "plain"))


def test_lmdb_declared_as_leveldb(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(8, 8)])
    with pytest.raises(NetError, match="is a lmdb database, but the net declares backend: "
                                       "LEVELDB"):
        _net(tmp_path, _data_layer(db, extra="backend: LEVELDB"))


def test_corrupt_record_names_db_and_key(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(8, 8)] * 4)
    env = lmdb.open(str(db))
    with env.begin(write=True) as txn:
        txn.put(b"00000002_im2.png", b"\xff\xff\xff garbage")
    env.close()
    net = _net(tmp_path, _data_layer(db))
    net.forward()
    with pytest.raises(NetError, match=r"layer 'data' \(Data\): record '00000002_im2.png' of "
                                       r"'.*db': not a Caffe Datum"):
        net.forward()


def test_record_with_wrong_byte_count(tmp_path: Path) -> None:
    datum = caffe_pb2.Datum(channels=3, height=4, width=4, data=b"\0" * 10)
    env = lmdb.open(str(tmp_path / "db"))
    with env.begin(write=True) as txn:
        txn.put(b"k", datum.SerializeToString())
    env.close()
    with pytest.raises(NetError, match="record 'k' .* holds 10 bytes, its shape .* needs 48"):
        _net(tmp_path, _data_layer(tmp_path / "db"))


def test_image_list_naming_a_missing_image(tmp_path: Path) -> None:
    listfile = _images(tmp_path / "images", [(10, 10)] * 3)
    listfile.write_text(listfile.read_text() + "gone.jpg 1\n")
    net = _net(tmp_path, f"""
        layer {{ name: "data" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{listfile}" root_folder: "{tmp_path}/images/"
                              batch_size: 2 }} }}
        """)
    net.forward()
    with pytest.raises(NetError, match=r"could not open or read image '.*images/gone.jpg' "
                                       r"\(listed in '.*list.txt'\)"):
        net.forward()


def test_crop_larger_than_the_image(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(20, 30)])
    with pytest.raises(NetError, match=r"record '00000000_im0.png' .*: image is 20x30 \(HxW\), "
                                       r"smaller than the crop 24x24"):
        _net(tmp_path, _data_layer(db, "crop_size: 24"))


def test_mean_file_of_the_wrong_size(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(16, 16)])
    write_blobproto(tmp_path / "mean.binaryproto", np.zeros((1, 3, 32, 32), np.float32),
                    legacy=True)
    with pytest.raises(NetError, match=r"mean_file 'mean.binaryproto' is 3x32x32 \(CxHxW\) but "
                                       r"record .* is 3x16x16; the mean must have the size of "
                                       r"the uncropped images"):
        _net(tmp_path, _data_layer(db, 'mean_file: "mean.binaryproto" crop_size: 8'))


def test_varying_sizes_without_crop(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(8, 8), (9, 8)])
    net = _net(tmp_path, _data_layer(db))
    with pytest.raises(NetError, match=r"record '00000001_im1.png' .* is 3x9x8 \(CxHxW\), but "
                                       r"the batch's first gives 3x8x8; .* need "
                                       r"transform_param.crop_size"):
        net.forward()


def test_leveldb_without_plyvel_names_the_extra(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ldb").mkdir()
    (tmp_path / "ldb" / "CURRENT").write_text("MANIFEST-000001\n")
    monkeypatch.setitem(__import__("sys").modules, "plyvel", None)
    with pytest.raises(NetError, match=r"LevelDB databases need the optional plyvel package: "
                                       r"pip install 'caffe2torch\[leveldb\]'"):
        _net(tmp_path, _data_layer(tmp_path / "ldb"))


def test_mean_value_count_must_fit_the_channels(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(8, 8)], gray=True)
    with pytest.raises(NetError, match="gives 3 mean_value.* for a 1-channel image"):
        _net(tmp_path, _data_layer(db, "mean_value: 1 mean_value: 2 mean_value: 3"))


# -- the Data layer ---------------------------------------------------------------------------

def _expected(image_hwc: np.ndarray, crop: int, mean: np.ndarray, scale: float) -> np.ndarray:
    h, w = image_hwc.shape[:2]
    top, left = (h - crop) // 2, (w - crop) // 2
    pixels = image_hwc[top:top + crop, left:left + crop].transpose(2, 0, 1).astype(np.float32)
    return (pixels - mean[:, None, None]) * np.float32(scale)


def test_course_tiny_lmdb_reads_through_a_data_layer(tmp_path: Path) -> None:
    source = shared_path("corpus", "repos", "kyehyeon__caffe-materials", "tiny_lmdb")
    mean = np.array([104, 117, 123], np.float32)
    net = _net(tmp_path, _data_layer(source, "crop_size: 224 mean_value: 104 mean_value: 117 "
                                             "mean_value: 123 scale: 0.5", batch=4,
                                     extra="backend: LMDB"))
    records = [caffe_pb2.Datum.FromString(v) for _, v in RecordReader(source)]
    for start in (0, 4, 8):   # 10 records: the third batch wraps round to the start
        out = net.forward(blobs=["data", "label"])
        for i in range(4):
            datum = records[(start + i) % len(records)]
            image = cv2.imdecode(np.frombuffer(datum.data, np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(out["data"][i], _expected(image, 224, mean, 0.5))
            assert out["label"][i] == datum.label


def test_course_net_builds_at_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """practice1/net.pt names data/tiny_lmdb: run from a folder where that path exists."""
    course = shared_path("corpus", "repos", "kyehyeon__caffe-materials")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny_lmdb").symlink_to(course / "tiny_lmdb")
    monkeypatch.chdir(tmp_path)
    net = caffe.Net(str(course / "practice1" / "net.pt"), caffe.TRAIN)
    net.forward()
    assert net.blobs["data"].data.shape == (1, 3, 224, 224)


def _batches(tmp: Path, workers: int, seed: int, count: int = 4) -> list[np.ndarray]:
    set_workers(workers)
    try:
        caffe.set_random_seed(seed)
        net = _net(tmp, _data_layer(tmp / "db", "crop_size: 12 mirror: true", batch=3),
                   caffe.TRAIN, name=f"net{workers}.prototxt")
        return [net.forward()["data"].copy() for _ in range(count)]
    finally:
        set_workers(None)


def test_random_crops_and_mirrors_repeat_and_ignore_the_worker_count(tmp_path: Path) -> None:
    _lmdb(tmp_path, [(16, 20)] * 5)
    inline, threaded, again = (_batches(tmp_path, w, s) for w, s in ((0, 7), (2, 7), (2, 7)))
    other = _batches(tmp_path, 0, 8)
    for a, b, c in zip(inline, threaded, again):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert any(not np.array_equal(a, d) for a, d in zip(inline, other))


def test_train_crops_are_windows_of_the_image(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(16, 20)])
    image = cv2.imread(str(tmp_path / "images" / "im0.png")).transpose(2, 0, 1)
    net = _net(tmp_path, _data_layer(db, "crop_size: 12 mirror: true", batch=8), caffe.TRAIN)
    seen = set()
    for crop in net.forward()["data"]:
        matches = [(y, x, m) for y in range(5) for x in range(9) for m in (False, True)
                   if np.array_equal(crop, (image[:, y:y + 12, x:x + 12][:, :, ::-1] if m
                                            else image[:, y:y + 12, x:x + 12]))]
        assert matches, "a TRAIN crop is not a (mirrored) window of the image"
        seen.add(matches[0])
    assert len(seen) > 1


def test_float_data_records_and_rand_skip(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "db"))
    with env.begin(write=True) as txn:
        for i in range(5):
            datum = array_to_datum(np.full((2, 3, 3), i + 0.25, np.float32), label=i)
            txn.put(f"{i:02d}".encode(), datum.SerializeToString())
    env.close()
    net = _net(tmp_path, _data_layer(tmp_path / "db", "scale: 2", batch=5, extra="rand_skip: 5"))
    out = net.forward(blobs=["label"])
    first = int(out["label"][0])
    assert [int(v) for v in out["label"]] == [(first + i) % 5 for i in range(5)]
    np.testing.assert_array_equal(out["data"][:, 0, 0, 0], (out["label"] + 0.25) * 2)


def test_leveldb_backend_round_trip(tmp_path: Path) -> None:
    import plyvel  # noqa: F401 - the leveldb extra is part of the test install
    db = _lmdb(tmp_path, [(6, 7)] * 3, backend="leveldb")
    net = _net(tmp_path, _data_layer(db, batch=3, extra="backend: LEVELDB"))
    data = net.forward()["data"]
    image = cv2.imread(str(tmp_path / "images" / "im2.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(data[2], image)


# -- ImageData, MemoryData, WindowData, HDF5Output ----------------------------------------------

def test_image_data_shuffles_every_epoch_and_resizes(tmp_path: Path) -> None:
    listfile = _images(tmp_path / "images", [(10 + i, 12) for i in range(6)])
    caffe.set_random_seed(3)
    net = _net(tmp_path, f"""
        layer {{ name: "data" type: "ImageData" top: "data" top: "label"
          image_data_param {{ source: "{listfile}" root_folder: "{tmp_path}/images/"
                              batch_size: 6 shuffle: true new_height: 8 new_width: 9 }} }}
        """)
    epochs = [net.forward(blobs=["label"]) for _ in range(3)]
    orders = [tuple(e["label"]) for e in epochs]
    assert all(sorted(o) == sorted(orders[0]) for o in orders)
    assert len(set(orders)) > 1
    assert epochs[0]["data"].shape == (6, 3, 8, 9)


def test_memory_data_serves_set_input_arrays(tmp_path: Path) -> None:
    net = _net(tmp_path, """
        layer { name: "mem" type: "MemoryData" top: "data" top: "label"
          memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 } }
        """)
    with pytest.raises(NetError, match=r"call net.set_input_arrays\(data, labels\) first"):
        net.forward()
    data = np.arange(6 * 6, dtype=np.float32).reshape(6, 1, 2, 3)
    net.set_input_arrays(data, np.arange(6, dtype=np.float32))
    for start in (0, 2, 4, 0):
        out = net.forward(blobs=["data", "label"])
        np.testing.assert_array_equal(out["data"], data[start:start + 2])
        np.testing.assert_array_equal(out["label"].ravel(), [start, start + 1])
        assert out["label"].shape == (2, 1, 1, 1)
    with pytest.raises(NetError, match="multiple of the batch size 2"):
        net.set_input_arrays(data[:3], np.zeros(3, np.float32))
    with pytest.raises(NetError, match=r"data array must be N x 1 x 2 x 3"):
        net.set_input_arrays(np.zeros((2, 3, 2, 2), np.float32), np.zeros(2, np.float32))


def test_set_input_arrays_needs_memory_data_first(tmp_path: Path) -> None:
    db = _lmdb(tmp_path, [(4, 4)])
    net = _net(tmp_path, _data_layer(db))
    with pytest.raises(NetError, match="first layer is a MemoryData layer"):
        net.set_input_arrays(np.zeros((2, 3, 4, 4), np.float32), np.zeros(2, np.float32))


def _window_net(tmp: Path, mode: str, pad: int, mirror: bool = False) -> caffe.Net:
    image = np.random.default_rng(5).integers(0, 256, (40, 50, 3), np.uint8)
    cv2.imwrite(str(tmp / "scene.png"), image)
    (tmp / "windows.txt").write_text(textwrap.dedent("""\
        # 0
        scene.png
        3 40 50
        3
        2 0.9 10 5 29 34
        0 0.1 0 0 49 39
        1 0.3 3 4 20 20
        """))
    return _net(tmp, f"""
        layer {{ name: "data" type: "WindowData" top: "data" top: "label"
          transform_param {{ crop_size: 16 mirror: {str(mirror).lower()} mean_value: 100 }}
          window_data_param {{ source: "windows.txt" root_folder: "{tmp}/" batch_size: 4
                               fg_fraction: 0.5 bg_threshold: 0.2 context_pad: {pad}
                               crop_mode: "{mode}"
                               scale: 0.5 }} }}
        """, caffe.TRAIN, name=f"win_{mode}{pad}.prototxt")


def test_window_data_warps_sampled_windows(tmp_path: Path) -> None:
    net = _window_net(tmp_path, "warp", 0)
    out = net.forward(blobs=["data", "label"])
    assert out["data"].shape == (4, 3, 16, 16)
    # 2 background windows, then 2 foreground; the 0.3-overlap window is neither
    assert list(out["label"]) == [0, 0, 2, 2]
    image = cv2.imread(str(tmp_path / "scene.png"))
    for i, window in ((0, (0, 0, 49, 39)), (2, (10, 5, 29, 34))):
        x1, y1, x2, y2 = window
        warped = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], (16, 16)).transpose(2, 0, 1)
        np.testing.assert_array_equal(out["data"][i], (warped.astype(np.float32) - 100) * 0.5)


def test_window_data_context_pad_leaves_zeros_outside_the_image(tmp_path: Path) -> None:
    net = _window_net(tmp_path, "square", 4, mirror=True)
    background = net.forward()["data"][:2]    # the whole-image window padded past every edge
    assert (background[:, :, 0, :] == 0).all() and (background[:, :, :, 0] == 0).all()
    assert (background[:, :, 8, 8] != 0).any()


def test_hdf5_output_writes_caffe_4d_datasets(tmp_path: Path) -> None:
    import h5py

    net = _net(tmp_path, f"""
        layer {{ name: "in" type: "Input" top: "x" top: "y"
          input_param {{ shape {{ dim: 3 dim: 2 }} shape {{ dim: 3 }} }} }}
        layer {{ name: "out" type: "HDF5Output" bottom: "x" bottom: "y"
          hdf5_output_param {{ file_name: "{tmp_path}/out.h5" }} }}
        """)
    net.forward(x=np.ones((3, 2), np.float32), y=np.arange(3, dtype=np.float32))
    with h5py.File(tmp_path / "out.h5", "r") as handle:
        assert handle["data"].shape == (3, 2, 1, 1) and handle["label"].shape == (3, 1, 1, 1)
        np.testing.assert_array_equal(handle["label"][:, 0, 0, 0], [0, 1, 2])


# -- pycaffe's datum helpers and the tools ------------------------------------------------------

def test_array_datum_round_trip() -> None:
    pixels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    datum = array_to_datum(pixels, label=7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (2, 3, 4, 7)
    np.testing.assert_array_equal(datum_to_array(datum), pixels)
    floats = datum_to_array(array_to_datum(pixels.astype(np.float64) / 3))
    assert floats.dtype == np.float64
    np.testing.assert_array_equal(floats, (pixels / 3).astype(np.float32))
    with pytest.raises(ValueError, match="3-D"):
        array_to_datum(np.zeros((2, 2)))


def test_convert_imageset_skips_unreadable_images_or_stops(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    listfile = _images(tmp_path / "images", [(5, 5)] * 3)
    listfile.write_text("im0.png 0\nmissing.png 1\nim2.png 2\n")
    root = f"{tmp_path}/images/"
    assert convert_imageset(root, listfile, tmp_path / "db") == (2, 1)
    assert "could not open or find image" in caplog.text and "missing.png" in caplog.text
    keys = [k for k, _ in RecordReader(tmp_path / "db")]
    assert keys == [b"00000000_im0.png", b"00000002_im2.png"]
    with pytest.raises(DataError, match=r"missing.png' \(listed in '.*list.txt'\)"):
        convert_imageset(root, listfile, tmp_path / "strict", strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "images"]   # nothing half-made


def test_tools_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    listfile = _images(tmp_path / "images", [(6, 6)] * 2)
    db, mean = tmp_path / "db", tmp_path / "mean.binaryproto"
    assert cli(["convert_imageset", "-shuffle", "-encoded=true", f"{tmp_path}/images/",
                str(listfile), str(db)]) == 0
    assert cli(["compute_image_mean", str(db), str(mean)]) == 0
    assert "mean_value channel [2]:" in capsys.readouterr().err
    images = [cv2.imread(str(tmp_path / "images" / f"im{i}.png")) for i in range(2)]
    expected = (images[0].astype(np.float32) + images[1]) / np.float32(2)
    np.testing.assert_array_equal(compute_image_mean(db)[0], expected.transpose(2, 0, 1))
    assert cli(["convert_imageset", f"{tmp_path}/images/", str(listfile), str(db)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli(["convert_imageset", "./", str(tmp_path / "nolist.txt"), str(tmp_path / "x")]) == 1
    assert "nolist.txt: cannot read the image list" in capsys.readouterr().err
    assert cli(["compute_image_mean", str(tmp_path / "nodb")]) == 1
    assert "database '" in capsys.readouterr().err

