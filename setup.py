"""Build step: generate the protobuf and gRPC stubs from protos/ into modalmesh/v1/.

This is the project's one codegen step. It runs on every install (`pip install .` and
`pip install -e .`), so generated code is never committed and never edited by hand.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = ROOT / "modalmesh" / "v1"


def generate_stubs() -> None:
    """Compile every protos/modalmesh/v1/*.proto into _pb2.py, _pb2_grpc.py and .pyi files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "modalmesh" / "v1").glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / 'modalmesh' / 'v1'}")
    OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {protos}")
    (OUT_PACKAGE / "__init__.py").write_text(
        '"""Generated from protos/modalmesh/v1 by setup.py; do not edit."""\n'
    )
    (OUT_PACKAGE / "py.typed").write_text("")


# Generate before setup() runs: setuptools checks that every listed package folder exists
# already in egg_info, before any build_py hook would run. grpcio-tools is a build requirement
# (pyproject.toml), so it is importable here under build isolation.
generate_stubs()
setup()
