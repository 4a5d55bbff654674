"""Regenerate the gRPC Python code for ``clipserve.v1`` from ``server/proto``.

Run ``python -m clipserve.server.codegen`` after editing the .proto; the output is committed
under ``server/v1/`` and ``tests/unit/test_server_codegen.py`` fails when it is stale.
``--check`` only compares and exits 1 when the committed code differs.

grpcio-tools is pinned because the generated code embeds the protobuf/grpc versions it was made
with and refuses to import on an older runtime; a different protoc also changes the bytes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
import tempfile
from pathlib import Path

GRPCIO_TOOLS_VERSION = "1.81.1"  # keep in step with pyproject's dev extra

SERVER_DIR = Path(__file__).resolve().parent
PROTO_ROOT = SERVER_DIR / "proto"
PROTO_FILE = "clipserve/v1/clipserve.proto"
OUT_DIR = SERVER_DIR / "v1"
GENERATED = ("clipserve_pb2.py", "clipserve_pb2.pyi", "clipserve_pb2_grpc.py")

# protoc writes absolute imports (`from clipserve.v1 import clipserve_pb2`) that would resolve to
# the clipserve package itself; the generated modules live in clipserve.server.v1, so make them
# relative.
_ABSOLUTE_IMPORT = re.compile(r"^from clipserve\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into ``out_dir`` (flat: the three GENERATED files); returns their paths.

    Raises RuntimeError when grpcio-tools is missing, not the pinned version, or protoc fails.
    """
    try:
        version = importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"grpcio-tools is not installed; pip install grpcio-tools=={GRPCIO_TOOLS_VERSION}"
        ) from None
    if version != GRPCIO_TOOLS_VERSION:
        raise RuntimeError(
            f"grpcio-tools {version} is installed; this code is generated with "
            f"{GRPCIO_TOOLS_VERSION} (pip install grpcio-tools=={GRPCIO_TOOLS_VERSION})"
        )
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE}")
        produced = Path(tmp) / Path(PROTO_FILE).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            text = _ABSOLUTE_IMPORT.sub("from . import ", (produced / name).read_text())
            target = out_dir / name
            target.write_text(text)
            written.append(target)
    return written


def stale_files(out_dir: Path = OUT_DIR) -> list[str]:
    """Names of generated files in ``out_dir`` that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = []
        for name in GENERATED:
            current = Path(out_dir) / name
            fresh = (Path(tmp) / name).read_text()
            if not current.exists() or current.read_text() != fresh:
                stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed code instead of writing it")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale generated code in {OUT_DIR}: {', '.join(stale)}; "
                  "run python -m clipserve.server.codegen", file=sys.stderr)
            return 1
        return 0
    for path in generate(OUT_DIR):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
