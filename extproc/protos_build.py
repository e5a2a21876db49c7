"""Compile protos/*.proto into extproc/_proto with grpcio-tools.

`python -m extproc.protos_build` regenerates modules older than their .proto;
`--check` exits 1 when a committed module differs from a fresh compile.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = Path(__file__).resolve().parent / "_proto"


def compile_to(out: Path) -> list[Path]:
    from grpc_tools import protoc

    sources = sorted(PROTO_DIR.glob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    for src in sources:
        rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--pyi_out={out}", str(src)])
        if rc != 0:
            raise SystemExit(f"protoc failed on {src}")
    return sources


def stale() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        compile_to(fresh)
        diffs = []
        for f in sorted(fresh.iterdir()):
            committed = OUT_DIR / f.name
            if not committed.exists() or committed.read_bytes() != f.read_bytes():
                diffs.append(f.name)
        return diffs


def main(argv: list[str]) -> int:
    if "--check" in argv:
        diffs = stale()
        if diffs:
            print("stale generated modules (run python -m extproc.protos_build):", ", ".join(diffs))
            return 1
        return 0
    if not PROTO_DIR.is_dir():
        return 0  # installed without sources: the committed modules are used as they are
    newest = max((p.stat().st_mtime for p in PROTO_DIR.glob("*.proto")), default=0)
    outputs = list(OUT_DIR.glob("*_pb2.py"))
    if outputs and min(p.stat().st_mtime for p in outputs) >= newest and not stale():
        return 0
    compile_to(OUT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
