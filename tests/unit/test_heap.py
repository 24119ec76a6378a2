"""HeapTrimmer: freed memory goes back to the OS, periodically, and only where glibc is."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

import pytest

from capi_server.adapters.heap import HeapTrimmer, find_malloc_trim, resident_bytes
from tests.conftest import make_settings, start_stubs, stop_stubs

MIB = 1024 * 1024


class FakeHeap:
    """malloc_trim and RSS of a pretend process: each trim returns `release` bytes."""

    def __init__(self, rss: int, release: int) -> None:
        self.rss = rss
        self.release = release
        self.trims: list[int] = []

    def malloc_trim(self, pad: int) -> int:
        self.trims.append(pad)
        self.rss -= self.release
        return 1

    def resident(self) -> int:
        return self.rss


def test_trim_reports_rss_before_and_after() -> None:
    heap = FakeHeap(rss=200 * MIB, release=50 * MIB)
    trimmer = HeapTrimmer(1.0, malloc_trim=heap.malloc_trim, rss=heap.resident)

    result = trimmer.trim()

    assert result is not None
    assert heap.trims == [0]  # pad 0: return everything that is free
    assert (result.rss_before, result.rss_after, result.released) == (
        200 * MIB,
        150 * MIB,
        50 * MIB,
    )


async def test_trims_every_interval_and_logs_only_large_releases(
    caplog: pytest.LogCaptureFixture,
) -> None:
    heap = FakeHeap(rss=400 * MIB, release=10 * MIB)
    trimmer = HeapTrimmer(0.01, malloc_trim=heap.malloc_trim, rss=heap.resident)
    caplog.set_level(logging.INFO, logger="capi_server.heap")

    trimmer.start()
    await asyncio.sleep(0.2)
    heap.release = 1 * MIB  # steady churn: trimmed, not logged
    logged = len(caplog.records)
    await asyncio.sleep(0.1)
    await trimmer.stop()
    trims = len(heap.trims)
    await asyncio.sleep(0.05)

    assert trims >= 5
    assert len(heap.trims) == trims, "stop() must end the periodic trims"
    assert logged >= 2 and len(caplog.records) == logged
    record = caplog.records[0]
    assert record.getMessage() == "returned freed memory to the OS"
    assert record.__dict__["rss_before_mb"] == 400.0
    assert record.__dict__["rss_after_mb"] == 390.0


async def test_without_malloc_trim_nothing_runs() -> None:
    trimmer = HeapTrimmer(0.01, rss=lambda: 0)
    trimmer._malloc_trim = None  # what find_malloc_trim gives on musl or macOS

    trimmer.start()

    assert trimmer.trim() is None
    assert trimmer._task is None
    await trimmer.stop()


async def test_interval_zero_never_trims() -> None:
    heap = FakeHeap(rss=100 * MIB, release=MIB)
    trimmer = HeapTrimmer(0, malloc_trim=heap.malloc_trim, rss=heap.resident)

    trimmer.start()
    await asyncio.sleep(0.05)
    await trimmer.stop()

    assert heap.trims == []


@pytest.mark.skipif(
    find_malloc_trim() is None or resident_bytes() == 0,
    reason="needs glibc's malloc_trim and /proc (Linux with glibc)",
)
def test_real_trim_returns_memory_freed_between_live_blocks() -> None:
    # In a fresh process: 200 MiB of 64 KiB blocks, freed but for every 50th, so free()
    # cannot shrink the heap from its top and RSS stays up until malloc_trim.
    script = textwrap.dedent(
        """
        import gc
        from capi_server.adapters.heap import HeapTrimmer, resident_bytes
        base = resident_bytes()
        blocks = [bytearray(64 * 1024) for _ in range(3200)]
        kept = blocks[::50]
        del blocks
        gc.collect()
        freed = resident_bytes()
        result = HeapTrimmer(1.0).trim()
        print(base, freed, result.rss_before, result.rss_after)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    base, freed, before, after = (int(x) for x in out)

    assert freed - base > 150 * MIB, "the freed blocks should still be resident before the trim"
    assert before - after > 150 * MIB
    assert after - base < 30 * MIB


@pytest.mark.parametrize(("seconds", "running"), [(2.0, True), (0.0, False)])
async def test_server_trims_unless_turned_off(
    sqlite_url: str, seconds: float, running: bool
) -> None:
    stubs = await start_stubs(make_settings(sqlite_url, memory_trim_seconds=seconds))
    try:
        trimmer = stubs.app.heap_trimmer
        task = trimmer._task if trimmer is not None else None
        assert (task is not None and not task.done()) is (
            running and find_malloc_trim() is not None
        )
    finally:
        await stop_stubs(stubs)
    assert stubs.app.heap_trimmer is None
    assert task is None or task.done()
