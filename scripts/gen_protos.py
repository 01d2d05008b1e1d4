"""Regenerate gen/ from proto/: messages, gRPC stubs and typed .pyi stubs.

This is the only way gen/ changes. ``--check`` regenerates into a temporary
directory and fails when the result differs from what is committed, so CI catches
hand edits and forgotten regenerations.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto"
GEN = ROOT / "gen"
BIN = Path(sys.executable).parent
PACKAGE_DOC = '"""Generated protobuf and gRPC code for hivewire (from proto/). Do not edit."""\n'


def generate(out: Path) -> None:
    """Run protoc (grpcio-tools) with the mypy-protobuf plugins into ``out``."""
    protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.rglob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO)
    top = out / "hivewire"
    for directory in [top, *(d for d in top.rglob("*") if d.is_dir())]:
        init = directory / "__init__.py"
        init.write_text(PACKAGE_DOC if directory == top else "")
    (top / "py.typed").write_text("")


def tree(root: Path) -> set[str]:
    """Return the relative paths of every file under ``root``, ignoring caches."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if gen/ is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if args.check:
            current = tree(GEN)
            wanted = tree(fresh)
            stale = sorted(current ^ wanted)
            stale += sorted(
                name
                for name in current & wanted
                if not filecmp.cmp(GEN / name, fresh / name, shallow=False)
            )
            if stale:
                print("gen/ is stale; run `make gen`. Differences:", *stale, sep="\n  ")
                return 1
            print("gen/ is up to date")
            return 0
        shutil.rmtree(GEN / "hivewire", ignore_errors=True)
        GEN.mkdir(exist_ok=True)
        shutil.copytree(fresh / "hivewire", GEN / "hivewire")
    print(f"generated {len(tree(GEN))} files under gen/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
