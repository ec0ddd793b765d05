"""Build step for the gRPC stubs: protos/loraplex/v1/*.proto -> loraplex/v1/*_pb2*.py.

    python -m loraplex.protos

The stubs are generated (never edited) and git-ignored; `ensure_stubs()` regenerates them when
they are missing or older than the .proto, so a fresh checkout works after `pip install -e .`.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_FILES = sorted(PROTO_ROOT.glob("loraplex/v1/*.proto"))


def _stale() -> bool:
    for proto in PROTO_FILES:
        stub = REPO / proto.relative_to(PROTO_ROOT).with_name(proto.stem + "_pb2_grpc.py")
        if not stub.exists() or stub.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def generate() -> None:
    from grpc_tools import protoc
    import grpc_tools

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in PROTO_FILES:
        code = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={REPO}",
            f"--pyi_out={REPO}", f"--grpc_python_out={REPO}", str(proto),
        ])
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    init = REPO / "loraplex" / "v1" / "__init__.py"
    init.write_text('"""Generated gRPC stubs (python -m loraplex.protos); do not edit."""\n')


def ensure_stubs() -> None:
    if _stale():
        generate()


if __name__ == "__main__":
    generate()
    print("generated stubs for:", *(str(p.relative_to(REPO)) for p in PROTO_FILES), file=sys.stderr)
