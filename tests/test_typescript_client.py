"""The TypeScript client in clients/typescript type-checks and its generated code is fresh.

Needs node and npm (skipped without them); installs the pinned packages with `npm ci` the
first time (or after package-lock.json changed), then runs the local tsc and buf binaries,
so nothing beyond the npm registry is reached.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = REPO_ROOT / "clients" / "typescript"
GENERATED_DIR = CLIENT_DIR / "src" / "gen"


def _run(args: list[str], cwd: Path, timeout_seconds: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout_seconds, check=False
    )


@pytest.fixture(scope="module")
def installed_client_dir() -> Path:
    """clients/typescript with node_modules matching package-lock.json."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not on PATH")
    # npm ci writes node_modules/.package-lock.json last, so a copy newer than the lock
    # file means the install is complete and current.
    installed_marker = CLIENT_DIR / "node_modules" / ".package-lock.json"
    lock_file = CLIENT_DIR / "package-lock.json"
    if (
        not installed_marker.exists()
        or installed_marker.stat().st_mtime < lock_file.stat().st_mtime
    ):
        result = _run(["npm", "ci", "--no-audit", "--no-fund"], CLIENT_DIR, 300)
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return CLIENT_DIR


def _files_under(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_client_and_examples_typecheck(installed_client_dir: Path) -> None:
    # Run from the client folder so npx finds its pinned tsc; --no-install makes a missing
    # one an error instead of a download of the unrelated npm package named "tsc".
    result = _run(["npx", "--no-install", "tsc", "--noEmit", "-p", "."], installed_client_dir, 180)
    assert result.returncode == 0, f"tsc failed:\n{result.stdout}\n{result.stderr}"


def test_generated_code_matches_protos(installed_client_dir: Path, tmp_path: Path) -> None:
    buf = installed_client_dir / "node_modules" / ".bin" / "buf"
    # -o prefixes the template's `out: src/gen`, so the fresh copy lands in tmp/src/gen.
    result = _run([str(buf), "generate", "-o", str(tmp_path)], installed_client_dir, 180)
    assert result.returncode == 0, f"buf generate failed:\n{result.stdout}\n{result.stderr}"

    fresh = _files_under(tmp_path / "src" / "gen")
    committed = _files_under(GENERATED_DIR)
    assert fresh, "buf generate produced no files"
    assert sorted(committed) == sorted(fresh), "run `make proto-ts`: generated file set differs"
    stale = [name for name, content in fresh.items() if committed[name] != content]
    assert stale == [], f"run `make proto-ts`: stale generated files {stale}"
    # The clients agent-service and chatbot-service need are among them.
    service_files = {"capi/v1/qualification_service_pb.ts", "capi/v1/capi_sender_service_pb.ts"}
    assert service_files <= set(fresh)


def test_package_versions_are_pinned_and_buf_matches_makefile() -> None:
    package = json.loads((CLIENT_DIR / "package.json").read_text(encoding="utf-8"))
    versions: dict[str, str] = {**package["dependencies"], **package["devDependencies"]}
    # Exact versions only: a caret range would let `npm install` drift from the lock file.
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions.values()), versions

    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    match = re.search(r"^BUF_VERSION := (\S+)$", makefile, flags=re.MULTILINE)
    assert match is not None
    # One buf for lint/breaking (.tools) and for TypeScript generation.
    assert versions["@bufbuild/buf"] == match.group(1)

    lock = json.loads((CLIENT_DIR / "package-lock.json").read_text(encoding="utf-8"))
    locked = lock["packages"]
    for name, version in versions.items():
        assert locked[f"node_modules/{name}"]["version"] == version, name
