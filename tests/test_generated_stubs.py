"""The committed stubs are what `make proto` generates from protos/ now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

PROTOS = REPO_ROOT / "protos"


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "capi" / "v1").glob("*.proto"))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *sources,
        ],
        cwd=PROTOS,
        check=True,
        env=env,
        capture_output=True,
    )

    def stubs(root: Path) -> list[Path]:
        return sorted(
            p.relative_to(root)
            for p in (root / "capi").rglob("*_pb2*")
            if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
        )

    generated = stubs(tmp_path)
    committed = stubs(PROTOS)
    assert generated == committed, "stub files differ from protos/: run `make proto`"
    stale = [
        str(rel)
        for rel in generated
        if (tmp_path / rel).read_bytes() != (PROTOS / rel).read_bytes()
    ]
    assert not stale, f"stale generated stubs (run `make proto` and commit): {stale}"
