"""Generate the Python gRPC stubs (with .pyi) for every .proto under proto/ivl_proto.

Run: python proto/generate.py   (needs grpcio-tools). Generated files are not committed.
"""

from __future__ import annotations

import sys
from pathlib import Path


def generate(proto_root: Path) -> list[Path]:
    from grpc_tools import protoc  # imported here: only needed at generation time

    sources = sorted(proto_root.glob("ivl_proto/**/*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files under {proto_root / 'ivl_proto'}")
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={proto_root}",
        f"--pyi_out={proto_root}",
        f"--grpc_python_out={proto_root}",
        *[str(s) for s in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for folder in {s.parent for s in sources} | {p for s in sources for p in s.parents if p != proto_root and proto_root in p.parents}:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")
    return sources


if __name__ == "__main__":
    root = Path(__file__).resolve().parent
    done = generate(root)
    print(f"generated stubs for {len(done)} proto files under {root / 'ivl_proto'}", file=sys.stderr)
