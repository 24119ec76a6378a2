"""Gives the heap memory that calls freed back to the operating system (glibc malloc_trim).

Why: after a burst (make bench: 10,000 calls at once) the memory its calls used is free
again, but glibc keeps it in its arenas, most of it in those of grpc's own threads, and
free() only ever returns the top of an arena. RSS stayed at the burst's peak (207 MiB
against 155 before it) for as long as the process lived. malloc_trim(0) hands back the
free pages of every arena: with this trimmer RSS is back at 177 MiB against 175 five
seconds after the burst. A periodic trim on a worker thread does that within seconds of
any burst, whatever made it (RPCs, a CRM mass update, LLM answers).

A trim is cheap (a walk over the free lists; measured in make bench, see bench/README), so
it runs on a fixed period instead of guessing when a burst is over: RSS does not drop
when memory is freed, only when it is returned, so it cannot tell. Where malloc_trim does
not exist (not glibc: musl, macOS) the trimmer does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("capi_server.heap")

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MIB = 1024 * 1024


def find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    function = getattr(libc, "malloc_trim", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True, slots=True)
class TrimResult:
    rss_before: int
    rss_after: int
    seconds: float

    @property
    def released(self) -> int:
        return max(0, self.rss_before - self.rss_after)


class HeapTrimmer:
    """Calls malloc_trim(0) every `interval_seconds` on a worker thread.

    ctypes releases the GIL for the call, so the event loop keeps serving while glibc
    walks its arenas (it locks one arena at a time).
    """

    # A release this large is worth a line in the log (a burst ended); smaller ones are
    # the steady churn of normal load.
    LOG_RELEASE_BYTES = 8 * _MIB

    def __init__(
        self,
        interval_seconds: float,
        *,
        malloc_trim: Callable[[int], int] | None = None,
        rss: Callable[[], int] = resident_bytes,
    ) -> None:
        self.interval = interval_seconds
        self._malloc_trim = malloc_trim if malloc_trim is not None else find_malloc_trim()
        self._rss = rss
        self._task: asyncio.Task[None] | None = None

    @property
    def available(self) -> bool:
        return self._malloc_trim is not None

    def trim(self) -> TrimResult | None:
        """One trim, on the calling thread; None where malloc_trim does not exist."""
        if self._malloc_trim is None:
            return None
        before = self._rss()
        started = time.perf_counter()
        self._malloc_trim(0)
        took = time.perf_counter() - started
        return TrimResult(before, self._rss(), took)

    def start(self) -> None:
        if self._task is None and self.available and self.interval > 0:
            self._task = asyncio.create_task(self._run(), name="heap-trimmer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            result = await asyncio.to_thread(self.trim)
            if result is not None and result.released >= self.LOG_RELEASE_BYTES:
                log.info(
                    "returned freed memory to the OS",
                    extra={
                        "rss_before_mb": round(result.rss_before / _MIB, 1),
                        "rss_after_mb": round(result.rss_after / _MIB, 1),
                        "took_ms": round(result.seconds * 1000, 2),
                    },
                )
