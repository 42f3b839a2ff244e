"""Every Caffe file format in and out: upgrades against real Caffe's output, the fast
caffemodel reader against full protobuf parses, round trips, and bad-input errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

from caffe2torch.errors import FormatError
from caffe2torch.formats import (SolverStateRecord, array_to_blobproto, blobproto_to_array,
                                 parse_text, read_blobproto, read_blobproto_vector,
                                 read_caffemodel, read_hdf5_weights, read_net, read_solver,
                                 read_solverstate, upgrade_net, upgrade_solver, write_blobproto,
                                 write_caffemodel, write_hdf5_weights, write_solverstate)
from caffe2torch.formats.caffemodel import parse_net_binary
from caffe2torch.proto import caffe_pb2
from golden import cases, shared_root

V1 = caffe_pb2.V1LayerParameter


def _parse_text_file(path: Path, message):
    return text_format.Parse(path.read_text(), message)


def _bits(array: np.ndarray) -> np.ndarray:
    """Raw float32 bits, so NaNs and signed zeros compare too."""
    return np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)


# --------------------------------------------------------------- golden upgrades

@pytest.mark.parametrize("case", cases("formats"))
def test_golden_format(case: str) -> None:
    """Our upgrade equals real Caffe's upgrade_*_proto_* output (as parsed messages; the
    binary cases byte for byte)."""
    folder = shared_root() / "golden" / "formats" / case
    spec = json.loads((folder / "case.json").read_text())
    tool = spec["tool"]
    if tool == "upgrade_net_proto_binary":
        raw = (folder / spec["input"]).read_bytes()
        ours = upgrade_net(parse_net_binary(raw, folder / spec["input"]))
        expected = (folder / spec["upgraded"]).read_bytes()
        assert ours == parse_net_binary(expected)
        assert ours.SerializeToString() == expected
    elif tool == "upgrade_solver_proto_text":
        expected = _parse_text_file(folder / spec["upgraded"], caffe_pb2.SolverParameter())
        assert read_solver(folder / spec["input"]) == expected
    else:
        assert tool == "upgrade_net_proto_text", tool
        expected = _parse_text_file(folder / spec["upgraded"], caffe_pb2.NetParameter())
        net, locations = read_net(folder / spec["input"])
        assert net == expected
        assert len(locations) == len(net.layer)


def test_golden_formats_cover_every_kind() -> None:
    names = cases("formats")
    for prefix in ("v0_", "v1_", "bin_v1_", "input_dim_", "input_shape_", "solver_v0_",
                   "batchnorm_"):
        assert any(n.startswith(prefix) for n in names), prefix


def test_v0_padding_layer_lines() -> None:
    """Folding V0 'padding' layers keeps every other layer pointing at its own prototxt line."""
    path = shared_root() / "golden" / "formats" / "v0_pascal_finetune_train" / "input.prototxt"
    lines = path.read_text().splitlines()
    original = _parse_text_file(path, caffe_pb2.NetParameter())
    assert any(conn.layer.type == "padding" for conn in original.layers)
    net, locations = read_net(path)
    assert len(net.layer) == len(original.layers) - sum(
        conn.layer.type == "padding" for conn in original.layers)
    for layer, location in zip(net.layer, locations):
        block = "\n".join(lines[location.line - 1:location.line + 3])
        assert f'name: "{layer.name}"' in block, (layer.name, location)


def test_bare_input_is_dropped_like_caffe() -> None:
    net = parse_text('input: "data"\nlayer { name: "r" type: "ReLU" bottom: "data" top: "r" }',
                     caffe_pb2.NetParameter())
    upgrade_net(net)
    assert [layer.name for layer in net.layer] == ["r"] and not net.input


def test_v0_fields_to_v1_messages() -> None:
    text = """
    input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
    layers { layer { name: "pad" type: "padding" pad: 2 } bottom: "data" top: "padded" }
    layers { layer { name: "pool" type: "pool" pool: AVE kernelsize: 3 stride: 2
                     num_output: 7 } bottom: "padded" top: "pool" }
    layers { layer { name: "drop" type: "dropout" dropout_ratio: 0.25 } bottom: "pool"
             top: "pool" }
    """
    net = upgrade_net(parse_text(text, caffe_pb2.NetParameter()))
    pool = net.layer[1]
    assert (pool.type, pool.bottom[0], pool.pooling_param.pad) == ("Pooling", "data", 2)
    assert pool.pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert not pool.HasField("inner_product_param")       # num_output means nothing on pool
    assert net.layer[2].dropout_param.dropout_ratio == pytest.approx(0.25)
    assert net.layer[0].type == "Input"
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 3, 8, 8]


@pytest.mark.parametrize("text, message", [
    ('layers { layer { name: "odd" type: "warp" } top: "x" }',
     "layer 'odd': unknown V0 layer type 'warp'"),
    ('layers { layer { name: "c" type: "conv" } bottom: "nowhere" top: "x" }',
     "layer 'c': unknown bottom blob 'nowhere'"),
    ('input: "d" layers { layer { name: "p" type: "padding" } bottom: "d" top: "q" }\n'
     'layers { layer { name: "r" type: "relu" } bottom: "q" top: "q" }',
     "layer 'r': a padding layer feeds a layer of type 'relu'"),
    ('layer { name: "a" type: "ReLU" } layers { name: "b" type: RELU }', "mixes 1 new 'layer'"),
])
def test_upgrade_errors_name_file_and_layer(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "old.prototxt"
    path.write_text(text)
    with pytest.raises(FormatError) as error:
        read_net(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_unknown_v1_enum_in_binary(tmp_path: Path) -> None:
    path = tmp_path / "v1.caffemodel"
    path.write_bytes(b"\x12\x07\x22\x03fc9\x28\x63")      # layers { name: "fc9" type: 99 }
    assert read_caffemodel(path)[0].type == "99"
    with pytest.raises(FormatError, match=f"^{re.escape(str(path))}: layer 'fc9': unknown V1 "
                                          "layer type number 99"):
        upgrade_net(parse_net_binary(path.read_bytes(), path), path)


def test_solver_with_both_types_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "solver.prototxt"
    path.write_text('solver_type: ADAM\ntype: "Adam"\n')
    with pytest.raises(FormatError, match="both the old 'solver_type'"):
        read_solver(path)
    assert upgrade_solver(caffe_pb2.SolverParameter(solver_type=caffe_pb2.SolverParameter.RMSPROP)
                          ).type == "RMSProp"


# --------------------------------------------------------------- caffemodel

def _net_with_blobs(blobs: list[list[np.ndarray]]) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter(name="roundtrip")
    for i, _ in enumerate(blobs):
        layer = net.layer.add(name=f"layer/{i}", type="Convolution", bottom=["x"], top=["x"])
        layer.param.add(lr_mult=1)
        layer.convolution_param.num_output = 3
        layer.include.add(phase=caffe_pb2.TEST)          # a field numbered after blobs (7)
    return net


def _as_protobuf(net: caffe_pb2.NetParameter, blobs: list[list[np.ndarray]]
                 ) -> caffe_pb2.NetParameter:
    """What Caffe's ToProto builds, made with plain protobuf calls."""
    full = caffe_pb2.NetParameter()
    full.CopyFrom(net)
    for layer, arrays in zip(full.layer, blobs):
        for array in arrays:
            blob = layer.blobs.add()
            if array.ndim:
                blob.shape.dim.extend(array.shape)
            blob.data.extend(np.asarray(array, np.float32).ravel().tolist())
    return full


def test_caffemodel_round_trip_is_bit_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    special = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    blobs = [[rng.standard_normal((4, 3, 3, 3), dtype=np.float32), special],
             [np.float32(0.25) * np.ones((), np.float32)],          # scalar (PReLU shared)
             [rng.standard_normal((5,), dtype=np.float32), rng.standard_normal((2, 7), np.float32)],
             [np.zeros((0, 3), np.float32)],
             []]
    net = _net_with_blobs(blobs)
    first = tmp_path / "a.caffemodel"
    write_caffemodel(first, net, blobs)
    assert first.read_bytes() == _as_protobuf(net, blobs).SerializeToString()
    records = read_caffemodel(first)
    assert [r.name for r in records] == [layer.name for layer in net.layer]
    for record, arrays in zip(records, blobs):
        assert len(record.blobs) == len(arrays)
        for blob, array in zip(record.blobs, arrays):
            assert blob.shape == array.shape and not blob.legacy
            assert np.array_equal(_bits(blob.data), _bits(array).ravel())
    second = tmp_path / "b.caffemodel"
    write_caffemodel(second, net, [[b.data.reshape(b.shape) for b in r.blobs] for r in records])
    assert second.read_bytes() == first.read_bytes()


def test_caffemodel_with_diffs(tmp_path: Path) -> None:
    """ToProto(write_diff): each blob carries its gradient after the data."""
    blobs = [[np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(2, np.float32)]]
    diffs = [[np.full((2, 3), -1.0, np.float32), np.zeros(2, np.float32)]]
    net = _net_with_blobs(blobs)
    path = tmp_path / "d.caffemodel"
    write_caffemodel(path, net, blobs, diffs)
    expected = _as_protobuf(net, blobs)
    for blob, diff in zip(expected.layer[0].blobs, diffs[0]):
        blob.diff.extend(diff.ravel().tolist())
    assert path.read_bytes() == expected.SerializeToString()
    weights, bias = read_caffemodel(path)[0].blobs
    assert weights.diff.tolist() == [-1.0] * 6 and bias.diff.tolist() == [0.0, 0.0]


def test_rewriting_caffe_weights_gives_caffes_bytes(tmp_path: Path) -> None:
    """Caffe's own Net::ToProto files come back byte for byte from our writer."""
    checked = 0
    for path in sorted((shared_root() / "golden" / "nets").glob("*/weights.caffemodel"))[:12]:
        net = parse_net_binary(path.read_bytes(), path)
        records = read_caffemodel(path)
        for layer in net.layer:
            del layer.blobs[:]
        out = tmp_path / "w.caffemodel"
        write_caffemodel(out, net, [[b.data.reshape(b.shape) for b in r.blobs] for r in records])
        assert out.read_bytes() == path.read_bytes(), path
        checked += 1
    assert checked >= 5


def _expected_records(net: caffe_pb2.NetParameter) -> list[tuple[str, str, list]]:
    """Names, types and blobs as a plain protobuf parse sees them (V2, V1 and V0)."""
    out = []
    for entry in net.layer:
        out.append((entry.name, entry.type, list(entry.blobs)))
    for entry in net.layers:
        if entry.HasField("layer"):
            out.append((entry.layer.name, entry.layer.type, list(entry.layer.blobs)))
        else:
            out.append((entry.name, V1.LayerType.Name(entry.type), list(entry.blobs)))
    return out


def _expected_blob(blob: caffe_pb2.BlobProto) -> tuple[tuple[int, ...], bool, np.ndarray]:
    data = (np.asarray(blob.double_data, np.float64).astype(np.float32) if len(blob.double_data)
            else np.asarray(blob.data, np.float32))
    if blob.HasField("shape"):
        return tuple(blob.shape.dim), False, data
    legacy = any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    shape = (blob.num, blob.channels, blob.height, blob.width) if legacy else ()
    return shape, legacy, data


def _assert_same_as_protobuf(path: Path) -> None:
    net = caffe_pb2.NetParameter()
    net.ParseFromString(path.read_bytes())
    expected = _expected_records(net)
    records = read_caffemodel(path)
    assert len(records) == len(expected), path
    for record, (name, kind, blobs) in zip(records, expected):
        assert (record.name, record.type) == (name, kind), path
        assert len(record.blobs) == len(blobs), (path, name)
        for ours, theirs in zip(record.blobs, blobs):
            shape, legacy, data = _expected_blob(theirs)
            assert (ours.shape, ours.legacy) == (shape, legacy), (path, name)
            assert np.array_equal(_bits(ours.data), _bits(data)), (path, name)


def _binary_nets() -> list[str]:
    root = shared_root()
    files = [*root.joinpath("corpus").rglob("*.caffemodel"), *root.joinpath("corpus").rglob("*.cm"),
             *root.joinpath("golden").rglob("*.caffemodel")]
    return sorted(str(p.relative_to(root)) for p in files)


def test_every_corpus_and_golden_caffemodel_decodes_like_protobuf() -> None:
    files = _binary_nets()
    assert len(files) > 140
    for rel in files:
        _assert_same_as_protobuf(shared_root() / rel)


def test_v1_caffemodel_records() -> None:
    path = shared_root() / "golden/formats/bin_v1_everpeace_lenet_iter_10000/input.caffemodel"
    records = {r.name: r for r in read_caffemodel(path)}
    assert records["conv1"].type == "CONVOLUTION"
    weights, bias = records["conv1"].blobs
    assert weights.legacy and weights.shape == (20, 1, 5, 5) and bias.shape == (1, 1, 1, 20)


def _write_message(path: Path, net: caffe_pb2.NetParameter) -> Path:
    path.write_bytes(net.SerializeToString())
    return path


def test_legacy_double_and_scalar_blobs(tmp_path: Path) -> None:
    net = caffe_pb2.NetParameter()
    layer = net.layer.add(name="l", type="PReLU")
    legacy = layer.blobs.add(num=1, channels=2, height=1, width=3)
    legacy.data.extend(range(6))
    double = layer.blobs.add()
    double.shape.dim.extend([2])
    double.data.extend([7.0, 7.0])                   # double_data wins, as in Caffe's FromProto
    double.double_data.extend([0.1, -2.5e-3])
    layer.blobs.add().data.append(0.5)               # no shape, no dims: a scalar
    blobs = read_caffemodel(_write_message(tmp_path / "m.caffemodel", net))[0].blobs
    assert (blobs[0].shape, blobs[0].legacy) == ((1, 2, 1, 3), True)
    assert np.array_equal(blobs[1].data, np.array([0.1, -2.5e-3]).astype(np.float32))
    assert blobs[2].shape == () and blobs[2].data.tolist() == [0.5]
    _assert_same_as_protobuf(tmp_path / "m.caffemodel")


def test_v0_caffemodel(tmp_path: Path) -> None:
    net = caffe_pb2.NetParameter()
    entry = net.layers.add(bottom=["data"], top=["conv"])
    entry.layer.name, entry.layer.type = "conv1", "conv"
    entry.layer.blobs.add(num=2, channels=1, height=1, width=1).data.extend([1, 2])
    records = read_caffemodel(_write_message(tmp_path / "v0.caffemodel", net))
    assert (records[0].name, records[0].type, records[0].blobs[0].data.tolist()) == \
        ("conv1", "conv", [1.0, 2.0])


def _unpacked_blob(values: list[float], dims: list[int]) -> bytes:
    """A BlobProto as old writers made it: one key per float, dims not packed."""
    body = b"".join(b"\x08" + bytes([d]) for d in dims)
    shape = b"\x3a" + bytes([len(body)]) + body
    floats = b"".join(b"\x2d" + np.float32(v).tobytes() for v in values)
    return floats + shape


def test_non_packed_floats(tmp_path: Path) -> None:
    blob = _unpacked_blob([1.5, -2.0, 3.25, 4.0], [2, 2])
    mixed_blob = _unpacked_blob([1.0], [3]) + b"\x2a\x08" + np.float32([2, 3]).tobytes()
    layer = b"\x0a\x01L" + b"\x3a" + bytes([len(blob)]) + blob
    layer += b"\x3a" + bytes([len(mixed_blob)]) + mixed_blob
    path = tmp_path / "old.caffemodel"
    path.write_bytes(b"\xa2\x06" + bytes([len(layer)]) + layer)
    first, second = read_caffemodel(path)[0].blobs
    assert first.shape == (2, 2) and first.data.tolist() == [1.5, -2.0, 3.25, 4.0]
    assert second.shape == (3,) and second.data.tolist() == [1.0, 2.0, 3.0]
    _assert_same_as_protobuf(path)


def test_large_caffemodel(tmp_path: Path) -> None:
    """Files over protobuf's default 64 MB limit load (Caffe lifts the limit too)."""
    big = np.arange(18_000_000, dtype=np.float32).reshape(1000, 18000)
    net = _net_with_blobs([[big]])
    path = tmp_path / "big.caffemodel"
    write_caffemodel(path, net, [[big]])
    assert path.stat().st_size > 64 * 2 ** 20
    blob = read_caffemodel(path)[0].blobs[0]
    assert blob.shape == big.shape and np.array_equal(blob.data, big.ravel())
    blob.data[0] = -1.0                      # views of the file are private and writable
    assert read_caffemodel(path)[0].blobs[0].data[0] == 0.0


@pytest.fixture
def lenet_bytes() -> bytes:
    return (shared_root() / "golden/formats/bin_v1_everpeace_lenet_iter_10000/"
            "upgraded.caffemodel").read_bytes()


@pytest.mark.parametrize("name, content, message", [
    ("missing.caffemodel", None, "no such file"),
    ("empty.caffemodel", b"", "is empty, expected a binary .caffemodel"),
    ("net.prototxt", b'name: "LeNet"\nlayer { name: "a" type: "ReLU" }\n',
     "is a text file (a prototxt?), expected a binary .caffemodel"),
    ("truncated.caffemodel", "half", "is truncated"),
    ("corrupt.caffemodel", "garbage", "is corrupt or not a binary .caffemodel"),
    ("mean.binaryproto", "blob", "is corrupt or not a binary .caffemodel"),
])
def test_bad_caffemodels(tmp_path: Path, lenet_bytes: bytes, name: str, content, message: str
                         ) -> None:
    path = tmp_path / name
    if content == "half":
        content = lenet_bytes[:len(lenet_bytes) // 2]
    elif content == "garbage":
        content = lenet_bytes[:100] + b"\xff" * 64 + lenet_bytes[164:]
    elif content == "blob":
        content = array_to_blobproto(np.ones((1, 3, 2, 2))).SerializeToString()
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FormatError) as error:
        read_caffemodel(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_directory_as_caffemodel(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="is a directory"):
        read_caffemodel(tmp_path)


# --------------------------------------------------------------- HDF5

def test_hdf5_weights_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    net = caffe_pb2.NetParameter()
    for name in ("conv1", "conv1/bn", "relu", "inception_3a/1x1", "shared"):
        net.layer.add(name=name)
    blobs = [[rng.standard_normal((2, 3, 1, 1), dtype=np.float32), np.ones(2, np.float32)],
             [np.float32(3.0) * np.ones((), np.float32)], [],
             [rng.standard_normal((4, 2), dtype=np.float32)],
             [None, np.zeros(2, np.float32)]]           # blob 0 is shared: Caffe skips it
    # Caffe writes every diff, shared or not.
    diffs = [[np.full((2,) if a is None else a.shape, 0.5, np.float32) for a in layer]
             for layer in blobs]
    path = tmp_path / "w.caffemodel.h5"
    write_hdf5_weights(path, net, blobs, diffs)
    with h5py.File(path, "r") as handle:
        assert handle["data/conv1/0"].shape == (2, 3, 1, 1)
        assert isinstance(handle["data/conv1"]["bn"], h5py.Group)   # '/' makes a real sub-group
        assert "0" not in handle["data/shared"]
    records = {r.name: r for r in read_caffemodel(path)}       # dispatched on the signature
    assert sorted(records) == sorted(r.name for r in read_hdf5_weights(path))
    assert sorted(records) == sorted(layer.name for layer in net.layer)
    for layer, arrays in zip(net.layer, blobs):
        record = records[layer.name]
        assert len(record.blobs) == len(arrays)
        for blob, array in zip(record.blobs, arrays):
            if array is None:
                assert blob is None
                continue
            assert blob.shape == array.shape and np.array_equal(blob.data, array.ravel())
            assert np.array_equal(blob.diff, np.full(array.size, 0.5, np.float32))


def test_hdf5_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "no_data.h5"
    with h5py.File(path, "w") as handle:
        handle.create_group("other")
    with pytest.raises(FormatError, match="is not Caffe HDF5 weights"):
        read_hdf5_weights(path)
    with pytest.raises(FormatError, match="no such file"):
        read_hdf5_weights(tmp_path / "missing.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(FormatError, match="is not a readable HDF5 file"):
        read_hdf5_weights(tmp_path / "text.h5")


# --------------------------------------------------------------- solverstate

def _golden_solverstates() -> list[Path]:
    return sorted((shared_root() / "golden" / "solvers").glob("*/*.solverstate"))


def test_solverstate_matches_protobuf_and_rewrites_to_caffes_bytes(tmp_path: Path) -> None:
    files = [*_golden_solverstates(), *(shared_root() / "corpus").rglob("*.solverstate")]
    assert len(files) >= 4
    for path in files:
        state = read_solverstate(path)
        message = caffe_pb2.SolverState()
        message.ParseFromString(path.read_bytes())
        assert (state.iter, state.learned_net, state.current_step) == \
            (message.iter, message.learned_net, message.current_step)
        assert len(state.history) == len(message.history)
        for ours, theirs in zip(state.history, message.history):
            shape, _, data = _expected_blob(theirs)
            assert ours.shape == shape and np.array_equal(ours.ravel(), data)
    for path in _golden_solverstates():
        write_solverstate(tmp_path / "s.solverstate", read_solverstate(path))
        assert (tmp_path / "s.solverstate").read_bytes() == path.read_bytes()


def test_hdf5_solverstate_round_trip(tmp_path: Path) -> None:
    state = SolverStateRecord(iter=1234, learned_net="snap_iter_1234.caffemodel.h5",
                              history=[np.ones((3, 2), np.float32), np.zeros(4, np.float32)],
                              current_step=2)
    path = tmp_path / "snap.solverstate.h5"
    write_solverstate(path, state)
    with h5py.File(path, "r") as handle:
        name = handle["learned_net"]
        assert name.shape == () and name.id.get_type().get_size() == len(state.learned_net) + 1
        assert name.id.get_type().get_strpad() == h5py.h5t.STR_NULLTERM
        assert handle["iter"].dtype == np.int32 and handle["iter"].shape == ()
    back = read_solverstate(path)
    assert (back.iter, back.learned_net, back.current_step) == (1234, state.learned_net, 2)
    assert all(np.array_equal(a, b) for a, b in zip(back.history, state.history))


def test_bad_solverstate(tmp_path: Path, lenet_bytes: bytes) -> None:
    path = tmp_path / "net.solverstate"
    path.write_bytes(lenet_bytes)
    with pytest.raises(FormatError, match="not a binary .solverstate"):
        read_solverstate(path)


# --------------------------------------------------------------- binaryproto

def _binaryprotos() -> list[Path]:
    return sorted(shared_root().rglob("*.binaryproto"))


def test_corpus_binaryprotos() -> None:
    files = _binaryprotos()
    assert len(files) >= 5
    for path in files:
        blob = caffe_pb2.BlobProto()
        blob.ParseFromString(path.read_bytes())
        array = read_blobproto(path)
        assert array.dtype == np.float32
        assert np.array_equal(array, blobproto_to_array(blob).astype(np.float32)), path


def test_compute_image_mean_output() -> None:
    folder = shared_root() / "golden" / "tools" / "compute_image_mean"
    assert np.array_equal(read_blobproto(folder / "mean.binaryproto"), np.load(folder / "mean.npy"))


@pytest.mark.parametrize("legacy", [False, True])
def test_binaryproto_round_trip(tmp_path: Path, legacy: bool) -> None:
    mean = np.random.default_rng(3).random((1, 3, 4, 5), dtype=np.float32)
    path = tmp_path / "mean.binaryproto"
    write_blobproto(path, mean, legacy=legacy)
    blob = caffe_pb2.BlobProto()
    blob.ParseFromString(path.read_bytes())
    assert blob.HasField("num") == legacy and blob.HasField("shape") != legacy
    assert np.array_equal(read_blobproto(path), mean)


def test_pycaffe_blobproto_helpers() -> None:
    arr = np.arange(6, dtype=np.int64).reshape(2, 3)
    blob = array_to_blobproto(arr, diff=arr * 2)
    assert list(blob.shape.dim) == [2, 3] and list(blob.diff) == [0, 2, 4, 6, 8, 10]
    back = blobproto_to_array(blob)
    assert back.dtype == np.float64 and np.array_equal(back, arr)
    assert np.array_equal(blobproto_to_array(blob, return_diff=True), arr * 2)
    legacy = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3, data=range(6))
    legacy.shape.dim.extend([6])              # pycaffe prefers the legacy dims when both exist
    assert blobproto_to_array(legacy).shape == (1, 1, 2, 3)


def test_blobproto_vector(tmp_path: Path) -> None:
    vector = caffe_pb2.BlobProtoVector()
    vector.blobs.extend([array_to_blobproto(np.ones((2, 2))), array_to_blobproto(np.zeros(3))])
    path = tmp_path / "means.binaryproto"
    path.write_bytes(vector.SerializeToString())
    first, second = read_blobproto_vector(path)
    assert first.shape == (2, 2) and second.shape == (3,) and first.sum() == 4


def test_bad_binaryproto(tmp_path: Path, lenet_bytes: bytes) -> None:
    path = tmp_path / "model.binaryproto"
    path.write_bytes(lenet_bytes)
    with pytest.raises(FormatError, match="not a binary .binaryproto"):
        read_blobproto(path)
    short = tmp_path / "short.binaryproto"
    short.write_bytes(caffe_pb2.BlobProto(num=1, channels=1, height=2, width=2,
                                          data=[1, 2]).SerializeToString())
    with pytest.raises(FormatError, match=r"needs 4 values but the file holds 2"):
        read_blobproto(short)


# --------------------------------------------------------------- prototxt

_SOLVER = re.compile(r"^\s*(base_lr|net|train_net|test_iter|max_iter|solver_mode|lr_policy)\s*:",
                     re.M)
_TEXT_SUFFIXES = (".prototxt", ".pt", ".solver", ".prototxt.txt")


def _corpus_texts() -> list[str]:
    """Nets and solvers of the corpus and golden data; label maps and MobileNet-SSD's
    unfilled templates are not nets."""
    root = shared_root()
    files = [p for p in root.joinpath("corpus").rglob("*") if p.name.endswith(_TEXT_SUFFIXES)]
    files += list(root.joinpath("golden").rglob("*.prototxt"))
    return [str(p.relative_to(root)) for p in sorted(files) if "/template/" not in str(p)
            and not re.search(rb"^\s*item\s*\{", p.read_bytes(), re.M)]


CORPUS_TEXTS = _corpus_texts()


def test_corpus_texts_found() -> None:
    assert len(CORPUS_TEXTS) > 900


@pytest.mark.parametrize("rel", CORPUS_TEXTS)
def test_corpus_prototxt_reads(rel: str) -> None:
    """Every net and solver of the corpus parses and upgrades through read_net/read_solver."""
    path = shared_root() / rel
    text = path.read_bytes().decode("utf-8", "replace")
    (read_solver if _SOLVER.search(text) else read_net)(path)


def test_prototxt_dialects(tmp_path: Path) -> None:
    """';' separators, single quotes, 'shape: {', numeric enums and CRLF line ends."""
    path = tmp_path / "dialects.prototxt"
    path.write_bytes(b"name: 'x'; input: 'data'; input_shape: { dim: 1; dim: 3 }\r\n"
                     b"layer { name: 'r'; type: 'ReLU'; bottom: 'data'; top: 'data' }\r\n"
                     b"layer { name: 'p' type: 'Pooling' bottom: 'data' top: 'q'\r\n"
                     b"        pooling_param { pool: 1 } }\r\n")
    net, locations = read_net(path)
    assert [layer.name for layer in net.layer] == ["input", "r", "p"]
    assert net.layer[2].pooling_param.pool == caffe_pb2.PoolingParameter.AVE
    assert [loc.line if loc else None for loc in locations] == [None, 2, 3]


@pytest.mark.parametrize("content, line, column, message", [
    ('layer {\n  name: "c"\n  convolution_parm { num_output: 1 }\n}\n', 3, 3,
     "has no field named \"convolution_parm\". (at 'convolution_parm')"),
    ('layer {\n  pooling_param {\n    pool: MAXX\n  }\n}\n', 3, 11,
     "has no value named MAXX. (at 'MAXX')"),
    ('layer {\n  name: "p"\n  bottom "x"\n}\n', 3, 10, "Expected \":\". (at '\"x\"')"),
    ('layer {\n  name: "p"\n', 2, 9, 'Expected "}". (at end of file)'),
    ('layers {\n  type: CONVOLUTON\n}\n', 2, 9, "(at 'CONVOLUTON')"),
])
def test_prototxt_errors_are_located(tmp_path: Path, content: str, line: int, column: int,
                                     message: str) -> None:
    path = tmp_path / "bad.prototxt"
    path.write_text(content)
    with pytest.raises(FormatError) as error:
        read_net(path)
    assert str(error.value).startswith(f"{path}:{line}:{column}: cannot parse as NetParameter")
    assert message in str(error.value)
    assert (error.value.location.line, error.value.location.column) == (line, column)


@pytest.mark.parametrize("name, content, message", [
    ("missing.prototxt", None, "no such file"),
    ("empty.prototxt", b" \n", "is empty, expected a prototxt"),
    ("weights.caffemodel", "lenet", "is a binary file (a .caffemodel"),
])
def test_bad_prototxt_files(tmp_path: Path, lenet_bytes: bytes, name: str, content, message: str
                            ) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(lenet_bytes if content == "lenet" else content)
    with pytest.raises(FormatError) as error:
        read_net(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)
