"""Child processes of the benchmark: the server under test, the fakes, the echo baseline,
and load-generator runs. Every process started here is stopped by the same object.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.load import LoadResult, LoadSpec, run_load

SPAWN = multiprocessing.get_context("spawn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident set size of a process from /proc/<pid>/status (VmRSS), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def postgres_cpu_seconds() -> float:
    """CPU time of every process named postgres on this machine (all its backends)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        total += cpu_seconds(int(entry.name))
    return total


class CpuMeter:
    """CPU use (in cores) of named processes and of PostgreSQL between start and stop."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._start = self._sample()
        self._began = time.monotonic()

    def _sample(self) -> dict[str, float]:
        sample = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        sample["postgres"] = postgres_cpu_seconds()
        return sample

    def cores(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._began, 1e-9)
        end = self._sample()
        return {name: (end[name] - self._start[name]) / elapsed for name in end}


class ServerProcess:
    """`python <args>` (the capi server) on a free loopback port, logs to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, *args],
            env={**env, "CAPI_LISTEN": self.target},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"server exited with {self.process.returncode}; see {self.log_path}"
                    )
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"server not SERVING after {timeout:.0f}s; see {self.log_path}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: cProfile writes its file), then SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class ChildProcess:
    """A spawn-context process that reports its port on a pipe when ready."""

    def __init__(self, target: Callable[..., None], name: str) -> None:
        receiver, sender = SPAWN.Pipe(duplex=False)
        self.process: multiprocessing.process.BaseProcess = SPAWN.Process(
            target=target, args=(sender,), name=name, daemon=True
        )
        self.process.start()
        if not receiver.poll(60):
            self.stop()
            raise RuntimeError(f"{name} did not start")
        self.port = int(receiver.recv())

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.join(5)


def drive(specs: list[LoadSpec], *, on_tick: Callable[[], None] | None = None) -> list[LoadResult]:
    """Run the specs in one fresh load-generator process; `on_tick` every 50 ms meanwhile."""
    results = SPAWN.Queue()
    process = SPAWN.Process(target=run_load, args=(specs, results), name="bench-load")
    process.start()
    limit = max(s.seconds + s.timeout_seconds for s in specs) + 60
    stop = threading.Event()
    ticker: threading.Thread | None = None
    if on_tick is not None:
        tick = on_tick

        def ticking() -> None:
            while not stop.wait(0.05):
                tick()

        ticker = threading.Thread(target=ticking, daemon=True)
        ticker.start()
    try:
        outcome = results.get(timeout=limit)
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join(5)
    if isinstance(outcome, str):
        raise RuntimeError(f"load generator failed: {outcome}")
    return list(outcome)
