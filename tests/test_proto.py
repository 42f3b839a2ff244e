"""Tests of caffe2torch's Caffe schema (caffe2torch/proto/caffe.proto).

* every net / solver text file of the shared corpus and every golden
  prototxt parses with google.protobuf.text_format;
* every binary protobuf file there (.caffemodel and .cm = NetParameter,
  .binaryproto = BlobProto, .solverstate = SolverState, LMDB records =
  Datum) decodes with no unknown field and re-encodes to identical bytes;
* spot checks of BVLC default values;
* the checked-in caffe_pb2.py matches caffe.proto and is not pinned to a
  protobuf runtime version.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import text_format

from caffe2torch.proto import caffe_pb2

try:  # tests/ on sys.path (rootdir conftest, default import mode)
    from conftest import REPO_ROOT, shared_dir
except ImportError:  # tests/ imported as a package
    from tests.conftest import REPO_ROOT, shared_dir

SHARED = shared_dir()  # raises (collection error, not a skip) when missing

# ---------------------------------------------------------------------------
# text files
# ---------------------------------------------------------------------------

_TEXT_SUFFIXES = (".prototxt", ".pt", ".solver", ".prototxt.txt")


def _text_files() -> list[str]:
    found = []
    for root, _dirs, files in os.walk(SHARED / "corpus"):
        for name in files:
            if name.endswith(_TEXT_SUFFIXES):
                found.append(Path(root, name))
    found.extend((SHARED / "golden").rglob("*.prototxt"))
    return sorted(p.relative_to(SHARED).as_posix() for p in found)


TEXT_FILES = _text_files()

# Tokens of protobuf text format, enough to find the top-level field names.
_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'"""
    r"""|[{}<>\[\]:;,]|[^\s{}<>\[\]:;,"'#]+"""
)
_SOLVER_ONLY = frozenset(
    caffe_pb2.SolverParameter.DESCRIPTOR.fields_by_name
) - frozenset(caffe_pb2.NetParameter.DESCRIPTOR.fields_by_name)


def top_level_fields(text: str) -> set[str]:
    """Names of the fields set at the outermost level of a text proto."""
    names, depth, prev = set(), 0, None
    for match in _TOKEN.finditer(text):
        tok = match.group(0)
        if tok.isspace() or tok.startswith("#"):
            continue
        if tok in "{<":
            if depth == 0 and prev is not None:
                names.add(prev)
            depth += 1
        elif tok in "}>":
            depth -= 1
        elif tok == ":" and depth == 0 and prev is not None:
            names.add(prev)
        prev = tok if tok[0].isalpha() or tok[0] == "_" else None
    return names


def message_for(text: str):
    """The message a Caffe text file holds, judged from its top-level fields.

    Solvers are recognised by solver-only fields (base_lr, net, train_net,
    test_iter, ...); SSD label maps by `item`; everything else is a net.
    """
    fields = top_level_fields(text)
    if fields & _SOLVER_ONLY:
        return caffe_pb2.SolverParameter()
    if "item" in fields:
        return caffe_pb2.LabelMap()
    return caffe_pb2.NetParameter()


# chuanqi305/MobileNet-SSD ships *templates*: `num_output: cls3x` etc. are
# placeholders its gen_model.sh replaces by multiples of the class count.
# They are filled with VOC's 21 classes (which reproduces the repository's
# deploy.prototxt); nothing else is ever rewritten.
_TEMPLATE_FILL = {"cls1x": "21", "cls3x": "63", "cls6x": "126"}
_TEMPLATE_RE = re.compile(r"(:\s*)(cls[136]x)\b")


def fill_template(rel: str, text: str) -> str:
    if "/template/" not in rel:
        return text
    return _TEMPLATE_RE.sub(lambda m: m.group(1) + _TEMPLATE_FILL[m.group(2)], text)


def test_text_corpus_found():
    # guard against a walk that silently finds nothing
    assert len(TEXT_FILES) > 900
    assert sum(f.startswith("corpus/") for f in TEXT_FILES) > 450
    assert sum(f.startswith("golden/") for f in TEXT_FILES) > 400


@pytest.mark.parametrize("rel", TEXT_FILES)
def test_text_file_parses(rel):
    # bytes -> str without newline translation: CRLF files stay CRLF
    text = (SHARED / rel).read_bytes().decode("utf-8")
    text = fill_template(rel, text)
    msg = message_for(text)
    text_format.Merge(text, msg)
    assert msg.ByteSize() > 0
    if isinstance(msg, caffe_pb2.NetParameter):
        assert msg.layer or msg.layers or msg.input, "net without layers"


def test_message_for_classification():
    assert isinstance(message_for("base_lr: 0.1\nnet: 'x'"), caffe_pb2.SolverParameter)
    # an inline net inside a solver is still a solver
    solver = 'train_net_param { name: "n" layers { name: "a" } }\ntest_iter: 1'
    assert isinstance(message_for(solver), caffe_pb2.SolverParameter)
    # a net that merely mentions solver-ish names in nested blocks
    net = 'name: "n" layer { name: "a" type: "Data" data_param { batch_size: 1 } }'
    assert isinstance(message_for(net), caffe_pb2.NetParameter)
    assert isinstance(message_for("item { name: 'a' label: 0 }"), caffe_pb2.LabelMap)


def test_text_dialects():
    """Dialects seen in the corpus that Python's text_format accepts."""
    text = (
        "name: 'n';\r\n"
        "input: \"data\"\r\n"
        "input_shape: { dim: 1, dim: 3 }\r\n"
        "layer < name: 'p' type: 'Pooling' bottom: 'data' top: 'p' "
        "pooling_param { pool: 1 kernel_size: 2 } >\r\n"
    )
    net = caffe_pb2.NetParameter()
    text_format.Merge(text, net)
    assert list(net.input_shape[0].dim) == [1, 3]
    assert net.layer[0].pooling_param.pool == caffe_pb2.PoolingParameter.AVE


# ---------------------------------------------------------------------------
# binary files
# ---------------------------------------------------------------------------

_BINARY_KINDS = {
    ".caffemodel": caffe_pb2.NetParameter,
    ".cm": caffe_pb2.NetParameter,  # kyehyeon/caffe-materials' caffemodels
    ".binaryproto": caffe_pb2.BlobProto,
    ".solverstate": caffe_pb2.SolverState,
}


def _binary_files() -> list[str]:
    found = [
        p for sub in ("corpus", "golden") for p in (SHARED / sub).rglob("*")
        if p.suffix in _BINARY_KINDS and p.is_file()
    ]
    return sorted(p.relative_to(SHARED).as_posix() for p in found)


BINARY_FILES = _binary_files()


def assert_exact_roundtrip(msg, data: bytes) -> None:
    """`msg` was parsed from `data`: same bytes back, and nothing unknown."""
    assert msg.SerializeToString() == data
    known = type(msg)()
    known.CopyFrom(msg)
    known.DiscardUnknownFields()
    # any field missing from the schema would be dropped here
    assert known.SerializeToString() == data, "unknown fields present"


def test_binary_corpus_found():
    assert len(BINARY_FILES) > 150
    for suffix in _BINARY_KINDS:
        assert any(f.endswith(suffix) for f in BINARY_FILES), suffix


@pytest.mark.parametrize("rel", BINARY_FILES)
def test_binary_file_roundtrips(rel):
    data = (SHARED / rel).read_bytes()
    msg = _BINARY_KINDS[Path(rel).suffix]()
    msg.ParseFromString(data)
    assert_exact_roundtrip(msg, data)
    if isinstance(msg, caffe_pb2.NetParameter):
        assert msg.layer or msg.layers
    elif isinstance(msg, caffe_pb2.BlobProto):
        assert msg.data or msg.double_data
    else:
        assert msg.history


def _lmdb_dirs() -> list[str]:
    dirs = {p.parent for p in SHARED.rglob("data.mdb")}
    return sorted(d.relative_to(SHARED).as_posix() for d in dirs)


LMDB_DIRS = _lmdb_dirs()


def test_lmdb_found():
    assert len(LMDB_DIRS) >= 10


@pytest.mark.parametrize("rel", LMDB_DIRS)
def test_lmdb_datums_roundtrip(rel):
    import lmdb
    env = lmdb.open(str(SHARED / rel), readonly=True, lock=False)
    try:
        count = 0
        with env.begin() as txn:
            for _key, value in txn.cursor():
                datum = caffe_pb2.Datum()
                datum.ParseFromString(value)
                assert_exact_roundtrip(datum, value)
                assert datum.data or datum.float_data
                count += 1
        assert count > 0
    finally:
        env.close()


def test_caffemodel_blob_layout():
    """A real model decodes into the expected blob shapes and float data."""
    data = (SHARED / "golden/nets/lenet/weights.caffemodel").read_bytes()
    net = caffe_pb2.NetParameter.FromString(data)
    conv1 = next(layer for layer in net.layer if layer.name == "conv1")
    weight, bias = conv1.blobs
    assert list(weight.shape.dim) == [20, 1, 5, 5]
    assert len(weight.data) == 20 * 25
    assert list(bias.shape.dim) == [20]


# ---------------------------------------------------------------------------
# defaults and a few fork fields
# ---------------------------------------------------------------------------

approx = pytest.approx


def test_bvlc_layer_defaults():
    pool = caffe_pb2.PoolingParameter()
    assert pool.pool == caffe_pb2.PoolingParameter.MAX
    assert pool.stride == 1 and pool.pad == 0 and not pool.global_pooling
    assert pool.round_mode == caffe_pb2.PoolingParameter.CEIL
    assert pool.DESCRIPTOR.fields_by_name["round_mode"].number == 13

    bn = caffe_pb2.BatchNormParameter()
    assert bn.moving_average_fraction == approx(0.999)
    assert bn.eps == approx(1e-5)
    assert not bn.HasField("use_global_stats")

    assert caffe_pb2.SoftmaxParameter().axis == 1

    lrn = caffe_pb2.LRNParameter()
    assert lrn.local_size == 5 and lrn.alpha == 1 and lrn.k == 1
    assert lrn.beta == approx(0.75)
    assert lrn.norm_region == caffe_pb2.LRNParameter.ACROSS_CHANNELS

    filler = caffe_pb2.FillerParameter()
    assert filler.type == "constant" and filler.value == 0
    assert filler.std == 1 and filler.max == 1 and filler.sparse == -1
    assert filler.variance_norm == caffe_pb2.FillerParameter.FAN_IN

    loss = caffe_pb2.LossParameter()
    assert loss.normalization == caffe_pb2.LossParameter.VALID
    assert not loss.HasField("normalize")

    conv = caffe_pb2.ConvolutionParameter()
    assert conv.bias_term and conv.group == 1 and conv.axis == 1
    assert list(conv.pad) == [] and list(conv.stride) == []

    inner = caffe_pb2.InnerProductParameter()
    assert inner.bias_term and inner.axis == 1 and not inner.transpose

    assert caffe_pb2.ConcatParameter().axis == 1
    assert caffe_pb2.SliceParameter().axis == 1
    assert caffe_pb2.FlattenParameter().end_axis == -1
    assert caffe_pb2.CropParameter().axis == 2
    assert caffe_pb2.ReshapeParameter().num_axes == -1
    assert caffe_pb2.EltwiseParameter().operation == caffe_pb2.EltwiseParameter.SUM
    assert caffe_pb2.DropoutParameter().dropout_ratio == approx(0.5)
    assert caffe_pb2.ScaleParameter().num_axes == 1
    assert not caffe_pb2.ScaleParameter().bias_term
    assert caffe_pb2.ExpParameter().base == -1
    assert caffe_pb2.PowerParameter().power == 1
    assert caffe_pb2.MVNParameter().eps == approx(1e-9)
    assert caffe_pb2.SwishParameter().beta == 1
    assert caffe_pb2.InfogainLossParameter().axis == 1
    assert caffe_pb2.ReductionParameter().operation == caffe_pb2.ReductionParameter.SUM
    assert caffe_pb2.ParamSpec().lr_mult == 1 and caffe_pb2.ParamSpec().decay_mult == 1
    assert caffe_pb2.NetState().phase == caffe_pb2.TEST
    assert caffe_pb2.DataParameter().backend == caffe_pb2.DataParameter.LEVELDB
    assert caffe_pb2.ImageDataParameter().batch_size == 1
    assert caffe_pb2.WindowDataParameter().crop_mode == "warp"
    assert caffe_pb2.V0LayerParameter().biasterm
    clip = caffe_pb2.ClipParameter.DESCRIPTOR
    assert clip.fields_by_name["min"].number == 1 and clip.fields_by_name["max"].number == 2


def test_solver_defaults():
    s = caffe_pb2.SolverParameter()
    assert s.type == "SGD" and s.solver_type == caffe_pb2.SolverParameter.SGD
    assert s.base_lr == 0 and s.momentum == 0 and s.weight_decay == 0
    assert s.lr_policy == "" and s.regularization_type == "L2"
    assert s.average_loss == 1 and s.iter_size == 1
    assert s.test_initialization and s.snapshot_after_train
    assert s.test_interval == 0 and s.snapshot == 0
    assert s.clip_gradients == -1 and s.random_seed == -1
    assert s.delta == approx(1e-8) and s.momentum2 == approx(0.999)
    assert s.rms_decay == approx(0.99)
    assert s.snapshot_format == caffe_pb2.SolverParameter.BINARYPROTO
    assert s.solver_mode == caffe_pb2.SolverParameter.GPU
    assert s.layer_wise_reduce
    numbers = {f.name: f.number for f in s.DESCRIPTOR.fields}
    assert numbers["type"] == 40 and numbers["solver_type"] == 30
    assert numbers["stepvalue"] == 34 and numbers["iter_size"] == 36
    assert numbers["layer_wise_reduce"] == 41 and numbers["weights"] == 42
    assert caffe_pb2.SolverState().current_step == 0


def test_wire_types():
    """Packing and integer widths that binary compatibility depends on."""
    # BlobShape.dim: packed int64 (a negative dim takes 10 varint bytes)
    assert caffe_pb2.BlobShape(dim=[2, 3]).SerializeToString() == b"\x0a\x02\x02\x03"
    assert len(caffe_pb2.BlobShape(dim=[-1]).SerializeToString()) == 12
    # BlobProto data/diff: packed float; double_data/double_diff: packed double
    one_f = b"\x00\x00\x80\x3f"
    one_d = b"\x00\x00\x00\x00\x00\x00\xf0\x3f"
    assert caffe_pb2.BlobProto(data=[1.0]).SerializeToString() == b"\x2a\x04" + one_f
    assert caffe_pb2.BlobProto(diff=[1.0]).SerializeToString() == b"\x32\x04" + one_f
    assert caffe_pb2.BlobProto(double_data=[1.0]).SerializeToString() == b"\x42\x08" + one_d
    assert caffe_pb2.BlobProto(double_diff=[1.0]).SerializeToString() == b"\x4a\x08" + one_d
    # legacy 4-D sizes are int32 varints at 1..4, shape at 7
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=3, width=4)
    assert legacy.SerializeToString() == b"\x08\x01\x10\x02\x18\x03\x20\x04"
    # V1's per-blob multipliers are plain (unpacked) repeated floats
    v1 = caffe_pb2.V1LayerParameter(blobs_lr=[1.0])
    assert v1.SerializeToString() == b"\x3d" + one_f
    # Datum.float_data is an unpacked repeated float
    assert caffe_pb2.Datum(float_data=[1.0]).SerializeToString() == b"\x35" + one_f


def test_layer_field_numbers():
    fields = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name
    expected = {
        "name": 1, "type": 2, "bottom": 3, "top": 4, "loss_weight": 5,
        "param": 6, "blobs": 7, "include": 8, "exclude": 9, "phase": 10,
        "propagate_down": 11, "transform_param": 100, "loss_param": 101,
        "convolution_param": 106, "pooling_param": 121, "batch_norm_param": 139,
        "scale_param": 142, "input_param": 143, "crop_param": 144,
        "recurrent_param": 146, "swish_param": 147, "clip_param": 148,
        # forks
        "annotated_data_param": 200, "multibox_loss_param": 201,
        "permute_param": 202, "prior_box_param": 203,
        "detection_output_param": 204, "detection_evaluate_param": 205,
        "norm_param": 206, "video_data_param": 207,
        "roi_pooling_param": 8266711, "smooth_l1_loss_param": 8266712,
        "shuffle_channel_param": 164, "yolov3_detection_output_param": 602,
    }
    assert {k: fields[k].number for k in expected} == expected
    numbers = [f.number for f in caffe_pb2.LayerParameter.DESCRIPTOR.fields]
    assert len(numbers) == len(set(numbers))


def test_fork_fields_parse():
    text = """
    layer { name: "p" type: "Pooling" pooling_param { pool: MAX kernel_size: 3
            stride: 2 ceil_mode: false } }
    layer { name: "b" type: "BN" bn_param { bn_mode: INFERENCE
            scale_filler { type: "constant" value: 1 } slope_filler { value: 1 }
            frozen: true momentum: 0.9 } }
    layer { name: "i" type: "Interp" interp_param { zoom_factor: 8 pad_beg: 0 } }
    layer { name: "u" type: "Upsample" upsample_param { scale: 2 upsample_h: 30 } }
    layer { name: "r" type: "ROIPooling" roi_pooling_param { pooled_h: 7
            pooled_w: 7 spatial_scale: 0.0625 } }
    layer { name: "l" type: "SmoothL1Loss" smooth_l1_loss_param { sigma: 3 } }
    layer { name: "s" type: "ShuffleChannel" shuffle_channel_param { group: 3 } }
    layer { name: "n" type: "Normalize" norm_param { across_spatial: false } }
    layer { name: "q" type: "ReLU6" relu6_param { threshold: 4 } }
    """
    net = caffe_pb2.NetParameter()
    text_format.Merge(text, net)
    pool = net.layer[0].pooling_param
    assert pool.HasField("ceil_mode") and not pool.ceil_mode
    assert caffe_pb2.PoolingParameter().ceil_mode
    assert net.layer[1].bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE
    assert net.layer[2].interp_param.zoom_factor == 8
    assert net.layer[3].upsample_param.upsample_h == 30
    assert net.layer[4].roi_pooling_param.spatial_scale == approx(0.0625)
    assert net.layer[5].smooth_l1_loss_param.sigma == 3
    assert caffe_pb2.SmoothL1LossParameter().sigma == 1
    assert net.layer[6].shuffle_channel_param.group == 3
    assert not net.layer[7].norm_param.across_spatial
    assert caffe_pb2.NormalizeParameter().eps == approx(1e-10)
    assert net.layer[8].relu6_param.threshold == 4
    assert caffe_pb2.ReLU6Parameter().threshold == 6
    assert caffe_pb2.HardSigmoidParameter().alpha == approx(0.2)


# ---------------------------------------------------------------------------
# generated module
# ---------------------------------------------------------------------------

PB2 = REPO_ROOT / "caffe2torch" / "proto" / "caffe_pb2.py"


def test_generated_module_not_version_pinned():
    source = PB2.read_text(encoding="utf-8")
    assert "runtime_version" not in source
    assert "ValidateProtobufRuntimeVersion" not in source


def test_private_descriptor_pool():
    from google.protobuf import descriptor_pool

    assert caffe_pb2.NetParameter.DESCRIPTOR.file.pool is not descriptor_pool.Default()
    assert caffe_pb2.NetParameter.DESCRIPTOR.full_name == "caffe.NetParameter"
    assert caffe_pb2.NetParameter.__module__ == "caffe2torch.proto.caffe_pb2"


def test_generated_module_up_to_date():
    import grpc_tools  # noqa: F401 - the proto extra is part of the test install
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr or result.stdout
