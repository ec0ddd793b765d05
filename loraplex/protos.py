"""Regenerate the committed gRPC stubs: protos/loraplex/v1/*.proto -> loraplex/v1/*_pb2*.py.

    python -m loraplex.protos

The stubs are committed (generated, never edited), so a non-editable `pip install` carries them and
nothing writes into the source tree at import time. `tests/test_protos.py` fails when they drift
from the .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"
PROTO_FILES = sorted(PROTO_ROOT.glob("loraplex/v1/*.proto"))
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path = REPO) -> list[Path]:
    """Run protoc on every .proto into out_dir; return the stub files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    written = []
    for proto in PROTO_FILES:
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out_dir}",
                f"--pyi_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                str(proto),
            ]
        )
        if code != 0:
            raise RuntimeError(f"protoc failed on {proto}")
        stem = out_dir / proto.relative_to(PROTO_ROOT).with_suffix("")
        written += [stem.with_name(stem.name + suffix) for suffix in STUB_SUFFIXES]
    init = out_dir / "loraplex" / "v1" / "__init__.py"
    init.write_text('"""Generated gRPC stubs (python -m loraplex.protos); do not edit."""\n')
    return written


if __name__ == "__main__":
    stubs = generate()
    print("generated:", *(str(p.relative_to(REPO)) for p in stubs), file=sys.stderr)
