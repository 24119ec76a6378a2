"""The real `capi-server` process: migrate, serve, health, reflection, graceful stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    target = f"127.0.0.1:{port}"
    environment = {
        **os.environ,
        "CAPI_LISTEN": target,
        "CAPI_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/proc.db",
        "CAPI_INSECURE_DEV": "true",
        **env,
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "capi_server", "serve", "--migrate"],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return process, target


def wait_serving(target: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])
def test_serves_health_and_reflection_then_stops_on_sigterm(
    tmp_path: Path, event_loop: str
) -> None:
    process, target = start_server(tmp_path, CAPI_EVENT_LOOP=event_loop)
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as channel:
            stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            names = {s.name for r in responses for s in r.list_services_response.service}
        assert {
            "capi.v1.QualificationService",
            "capi.v1.CapiSenderService",
            "capi.v1.SettingsService",
            "grpc.health.v1.Health",
        } <= names
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = process.stdout.read().decode() if process.stdout else ""
    assert "shutting down" in output
    # auto: uvloop, a dependency of the server (except on Windows)
    expected = "asyncio" if event_loop == "asyncio" or sys.platform == "win32" else "uvloop"
    assert f'"event_loop": "{expected}"' in output


def test_refuses_to_start_without_keys_unless_insecure_dev(tmp_path: Path) -> None:
    process, _ = start_server(tmp_path, CAPI_INSECURE_DEV="false", CAPI_ENCRYPTION_KEYS="")
    code = process.wait(timeout=30)
    output = process.stdout.read().decode() if process.stdout else ""
    assert code == 2
    assert "CAPI_ENCRYPTION_KEYS" in output


def test_refuses_to_start_on_uvloop_when_it_is_not_installed(tmp_path: Path) -> None:
    # A directory early on the path whose uvloop cannot be imported, as when it is not
    # installed.
    blocker = tmp_path / "no_uvloop"
    (blocker / "uvloop").mkdir(parents=True)
    (blocker / "uvloop" / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])
    process, _ = start_server(tmp_path, CAPI_EVENT_LOOP="uvloop", PYTHONPATH=path)
    code = process.wait(timeout=30)
    output = process.stdout.read().decode() if process.stdout else ""
    assert code == 2
    assert "uvloop is not installed" in output
    # auto falls back to asyncio's loop.
    process, target = start_server(tmp_path, CAPI_EVENT_LOOP="auto", PYTHONPATH=path)
    try:
        wait_serving(target)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    output = process.stdout.read().decode() if process.stdout else ""
    assert '"event_loop": "asyncio"' in output
