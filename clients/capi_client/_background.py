"""BackgroundAnalyzer: fire-and-forget AnalyzeDialog for a chatbot that must never wait.

The chatbot answers the client first and calls `submit()` afterwards; submit() only puts
the dialog on a bounded queue. A few workers call AnalyzeDialog. When the queue is full
the work is dropped with a WARNING (the next message of the dialog submits it again, and
AnalyzeDialog is idempotent, so a dropped analysis only delays a level).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from types import TracebackType
from typing import Self

from capi_client._async_client import AsyncCapiClient
from capi_client._errors import CapiError

log = logging.getLogger("capi_client")

# ("id", dialog_id) or ("chat", instance_name, contact_phone)
DialogKey = tuple[str, ...]


def mask_phone(phone: str) -> str:
    """Only the last 4 digits, so logs never hold a client's phone number."""
    digits = "".join(ch for ch in phone if ch.isdigit())
    return "***" + digits[-4:] if len(digits) > 4 else "***"


def describe(key: DialogKey) -> str:
    if key[0] == "id":
        return key[1]
    return f"{key[1]}/{mask_phone(key[2])}"


class BackgroundAnalyzer:
    """Bounded queue + workers in front of `AsyncCapiClient.analyze_dialog`.

    Use inside a running event loop:

        analyzer = BackgroundAnalyzer(client)
        analyzer.submit(instance_name="inst", contact_phone="77011234567")
        ...
        await analyzer.close(drain_timeout=5)
    """

    def __init__(self, client: AsyncCapiClient, *, max_queue: int = 1000, workers: int = 2) -> None:
        if max_queue < 1 or workers < 1:
            raise ValueError("max_queue and workers must be positive")
        self._client = client
        self._queue: asyncio.Queue[DialogKey] = asyncio.Queue(maxsize=max_queue)
        # Dialogs waiting in the queue: a second submit for one of them is a no-op, since
        # the analysis that will run reads the whole dialog anyway.
        self._pending: set[DialogKey] = set()
        self._worker_count = workers
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self.dropped = 0
        self.failed = 0
        self.analyzed = 0

    def submit(
        self,
        dialog_id: str | None = None,
        instance_name: str | None = None,
        contact_phone: str | None = None,
    ) -> bool:
        """Queues an analysis; never blocks. False when it was dropped (queue full, closed)."""
        if dialog_id:
            key: DialogKey = ("id", dialog_id)
        elif instance_name and contact_phone:
            key = ("chat", instance_name, contact_phone)
        else:
            raise ValueError("name the dialog by dialog_id or by instance_name and contact_phone")
        if self._closed:
            log.warning("capi: analyzer closed, dropped dialog %s", describe(key))
            self.dropped += 1
            return False
        if key in self._pending:
            return True
        try:
            self._queue.put_nowait(key)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning(
                "capi: analyze queue full, dropped dialog %s (queue size %d)",
                describe(key),
                self._queue.maxsize,
            )
            return False
        self._pending.add(key)
        self._start_workers()
        return True

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def _start_workers(self) -> None:
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"capi-analyzer-{i}")
                for i in range(self._worker_count)
            ]

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            # Taken off `pending` before the call: a message that arrives while the
            # analysis runs must queue a fresh one.
            self._pending.discard(key)
            try:
                await self._analyze(key)
            finally:
                self._queue.task_done()

    async def _analyze(self, key: DialogKey) -> None:
        try:
            if key[0] == "id":
                await self._client.analyze_dialog(key[1])
            else:
                await self._client.analyze_dialog(instance_name=key[1], contact_phone=key[2])
            self.analyzed += 1
        except CapiError as exc:
            self.failed += 1
            log.warning(
                "capi: analyze failed for dialog %s: %s %s",
                describe(key),
                exc.code.name,
                exc.reason or "",
            )
        except Exception:
            self.failed += 1
            log.exception("capi: analyze crashed for dialog %s", describe(key))

    async def close(self, drain_timeout: float = 5.0) -> None:
        """Stops taking work, waits up to drain_timeout for the queue, then stops workers."""
        self._closed = True
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), drain_timeout)
        left = self._queue.qsize()
        if left:
            log.warning("capi: analyzer closed with %d dialogs not analyzed", left)
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
