#!/usr/bin/env python
"""Regenerate caffe2torch/proto/caffe_pb2.py from caffe2torch/proto/caffe.proto.

Usage (from anywhere):

    python scripts/gen_proto.py            # regenerate in place
    python scripts/gen_proto.py --check    # exit 1 if the checked-in schema is stale

Needs grpcio-tools (it ships protoc as ``python -m grpc_tools.protoc``); the
package itself never runs protoc: the generated module is checked in.

Post-processing of protoc's output:

* protoc calls ``runtime_version.ValidateProtobufRuntimeVersion(...)``,
  which refuses any protobuf runtime older than the protoc that generated
  the file.  The descriptor-based code itself works with every runtime from
  protobuf 4.21 on, so that call and its import are removed.
* The schema is registered in a private ``DescriptorPool`` instead of the
  process-wide default pool.  Our ``package caffe`` differs from pycaffe's
  (and from other tools' copies of caffe.proto); in the default pool two
  different definitions of ``caffe.LayerParameter`` cannot coexist, and
  importing both would fail with "duplicate symbol".
"""
from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "caffe2torch" / "proto"
PROTO = PROTO_DIR / "caffe.proto"
OUTPUT = PROTO_DIR / "caffe_pb2.py"

_IMPORT_RE = re.compile(
    r"^from google\.protobuf import runtime_version as _runtime_version\n",
    re.MULTILINE,
)
# The call spans several lines: `_runtime_version.Validate...(\n ... \n)\n`.
_CALL_RE = re.compile(
    r"^_runtime_version\.ValidateProtobufRuntimeVersion\(.*?^\)\n",
    re.MULTILINE | re.DOTALL,
)
_DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_PRIVATE_POOL = (
    "# Private pool: see scripts/gen_proto.py.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = _POOL.AddSerializedFile("
)


def run_protoc(out_dir: Path) -> Path:
    # proto_path is the repository root, so the generated module knows its
    # dotted name (caffe2torch.proto.caffe_pb2) and classes pickle properly.
    rel = PROTO.relative_to(ROOT).as_posix()
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--python_out={out_dir}",
        rel,
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out_dir / OUTPUT.relative_to(ROOT)


def postprocess(source: str) -> str:
    """Drop the runtime-version check, use a private pool (see docstring)."""
    source, n_import = _IMPORT_RE.subn("", source)
    source, n_call = _CALL_RE.subn("", source)
    if n_import != n_call or n_import > 1:
        raise RuntimeError(
            "unexpected runtime_version usage in generated code "
            f"(imports removed: {n_import}, calls removed: {n_call})"
        )
    if "_runtime_version" in source:
        raise RuntimeError("generated code still references _runtime_version")
    if source.count(_DEFAULT_POOL) != 1:
        raise RuntimeError("generated code does not register its file as expected")
    source = source.replace(_DEFAULT_POOL, _PRIVATE_POOL)
    # protoc's marker comment; this project does check the module in.
    source = source.replace("# NO CHECKED-IN PROTOBUF GENCODE\n", "")
    header = (
        "# Generated from caffe.proto by scripts/gen_proto.py -- do not edit.\n"
        "# Post-processed: no protobuf runtime version pin (any protobuf >= 4.21\n"
        "# works) and a private descriptor pool (coexists with pycaffe).\n"
    )
    return header + source


def generate() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        generated = run_protoc(Path(tmp))
        return postprocess(generated.read_text(encoding="utf-8"))


_SERIALIZED_RE = re.compile(r"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)")


def serialized_descriptor(source: str) -> bytes | None:
    """The FileDescriptorProto bytes a generated module registers."""
    match = _SERIALIZED_RE.search(source)
    return ast.literal_eval(match.group(1)) if match else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true",
        help="do not write; fail if caffe_pb2.py differs from a fresh build",
    )
    args = parser.parse_args(argv)
    text = generate()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current == text:
            print(f"{OUTPUT} is up to date")
            return 0
        # Another protoc version words the module differently; what matters
        # is that it registers the same schema.
        fresh = serialized_descriptor(text)
        if fresh is not None and serialized_descriptor(current) == fresh:
            print(f"{OUTPUT} matches caffe.proto (written by another protoc version)")
            return 0
        print(f"{OUTPUT} is out of date; run scripts/gen_proto.py", file=sys.stderr)
        return 1
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
