"""Regenerate the protobuf/gRPC modules from chainfs/proto/*.proto.

``python -m chainfs.proto.build`` writes *_pb2.py, *_pb2_grpc.py and *.pyi next
to the .proto files; ``--check`` exits 1 if the committed modules are stale.
Imports in generated code are rewritten to the package (``from chainfs.proto
import x_pb2``) so the package never needs to be on sys.path as top level.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency

    protos = sorted(p.name for p in PROTO_DIR.glob("*.proto"))
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--mypy_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    names = [Path(p).stem for p in protos]
    pattern = re.compile(rf"^import ({'|'.join(names)})_pb2", re.M)
    for f in out_dir.iterdir():
        if f.suffix in (".py", ".pyi"):
            text = pattern.sub(r"from chainfs.proto import \1_pb2", f.read_text())
            f.write_text(text)


def generated_files(directory: Path) -> dict[str, str]:
    return {
        f.name: f.read_text()
        for f in sorted(directory.iterdir())
        if f.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi"))
    }


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out)
        fresh = generated_files(out)
    if "--check" in sys.argv:
        stale = sorted(n for n in fresh if generated_files(PROTO_DIR).get(n) != fresh[n])
        if stale:
            print("stale generated modules (run `make proto`):", ", ".join(stale))
            return 1
        return 0
    for stale_name in set(generated_files(PROTO_DIR)) - set(fresh):
        (PROTO_DIR / stale_name).unlink()
    for name, text in fresh.items():
        (PROTO_DIR / name).write_text(text)
    print(f"generated {len(fresh)} files in {PROTO_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
