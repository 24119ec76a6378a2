"""Group commit: concurrent callers' items share one batch (one transaction, or one
query for reads).

The first item starts a batch at once; items that arrive while that batch runs form the
next one. Batches therefore grow with load and shrink to one item when the service is
idle: an idle service, or one caller calling in a loop, waits for no timer.

Under concurrent load a batch waits a moment (`linger_seconds`) before it starts, like
PostgreSQL's commit_delay with commit_siblings: gRPC hands this process its calls one at a
time, so without the wait a query that returns in a fraction of a millisecond would carry
one or two of the 32 calls a client keeps in flight. "Concurrent load" is seen in the
batches themselves: the previous batch ended moments ago and it carried, or left
waiting, the items of more than one caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from capi_server.adapters import metrics

log = logging.getLogger("capi_server.batching")

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# A batch that ends within this many lingers of the previous one counts as load.
BUSY_WINDOW_LINGERS = 4

# What a batch function returns per item: its result, or the error for that item alone.
BatchRunner = Callable[[list[ItemT]], Awaitable[Sequence[ResultT | Exception]]]
# Awaited after a batch's callers have their results, before the next batch forms.
BatchPacer = Callable[[Sequence[ResultT | Exception]], Awaitable[None]]


class Batcher(Generic[ItemT, ResultT]):
    """Runs `run_batch` over the items queued by concurrent `submit` calls.

    `run_batch` returns one entry per item, in order: a result or an Exception for that
    item. If `run_batch` itself raises (its transaction failed), the whole batch runs once
    more when `run_again(error)` (a lost deadlock), then the items run one by one when
    `retry_alone(error)` says that isolates the cause (an item the database rejects), so
    that only that item's caller gets the error; otherwise every item gets it. The batch
    runs in a task of its own: a caller that gives up (deadline) does not cancel the work
    of the others in its batch. `pace(results)`, when given, is awaited once a batch's
    callers have their results and before the next batch forms: work the batch started
    (a delivery) can finish first, while the calls arriving meanwhile queue for the next.
    """

    def __init__(
        self,
        run_batch: BatchRunner[ItemT, ResultT],
        *,
        max_batch: int,
        retry_alone: Callable[[Exception], bool] = lambda error: False,
        run_again: Callable[[Exception], bool] = lambda error: False,
        linger_seconds: float = 0.0,
        pace: BatchPacer[ResultT] | None = None,
        name: str = "",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if linger_seconds < 0:
            raise ValueError("linger_seconds must not be negative")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._retry_alone = retry_alone
        self._run_again = run_again
        self._pace = pace
        # Names the batch in logs and in the capi_batch_items metric.
        self._name = name or getattr(run_batch, "__name__", "batch").lstrip("_")
        # (item, its caller's future, which submit_many call queued it)
        self._queue: list[tuple[ItemT, asyncio.Future[ResultT], int]] = []
        self._submissions = 0
        self._runner: asyncio.Task[None] | None = None
        self._linger = linger_seconds
        # When the previous batch ended, and whether it showed concurrent callers.
        self._last_end = float("-inf")
        self._last_concurrent = False
        self.batches = 0
        self.items = 0
        self.lingered = 0

    async def submit(self, item: ItemT) -> ResultT:
        (result,) = await self.submit_many([item])
        return result

    async def submit_many(self, items: Sequence[ItemT]) -> list[ResultT]:
        """Queues `items` (they may land in one batch or more); raises the first error."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[ResultT]] = []
        self._submissions += 1
        for item in items:
            future: asyncio.Future[ResultT] = loop.create_future()
            future.add_done_callback(_retrieve)
            self._queue.append((item, future, self._submissions))
            futures.append(future)
        if self._runner is None:
            self._runner = asyncio.create_task(self._drain())
        # Each item has a future of its own: a caller that gives up cancels only that one
        # (the batch skips futures already done), so no shield is needed around it.
        return [await future for future in futures]

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                if self._should_linger(loop.time()):
                    self.lingered += 1
                    await asyncio.sleep(self._linger)
                batch = self._queue[: self._max_batch]
                del self._queue[: len(batch)]
                self.batches += 1
                self.items += len(batch)
                try:
                    metrics.observe_batch(self._name, len(batch))
                    results = await self._run([item for item, _, _ in batch])
                    for (_, future, _), result in zip(batch, results, strict=True):
                        if future.done():
                            continue
                        if isinstance(result, Exception):
                            future.set_exception(result)
                        else:
                            future.set_result(result)
                    if self._pace is not None:
                        try:
                            await self._pace(results)
                        except Exception:
                            # Every caller has its answer: the error is only logged.
                            log.exception("pacing a batch failed", extra={"batch": self._name})
                except Exception as exc:
                    # Also a result list of the wrong length: nobody is left waiting.
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(exc)
                except BaseException:
                    # Cancelled at shutdown: the callers must not wait forever.
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(asyncio.CancelledError())
                    raise
                self._last_end = loop.time()
                # Concurrent: more than one caller's items in this batch or waiting (one
                # caller's many items, e.g. a multi-message webhook, are not load).
                callers = {caller for _, _, caller in batch} | {c for _, _, c in self._queue}
                self._last_concurrent = len(callers) > 1
        finally:
            # No await between the empty check and here: nothing can be queued unseen.
            self._runner = None
            for _, future, _ in self._queue:
                if not future.done():
                    future.set_exception(asyncio.CancelledError())
            self._queue.clear()

    def _should_linger(self, now: float) -> bool:
        """Wait for more items: only under concurrent load (see the module docstring), and
        not when a full batch is already waiting."""
        return (
            self._linger > 0
            and self._last_concurrent
            and now - self._last_end < self._linger * BUSY_WINDOW_LINGERS
            and len(self._queue) < self._max_batch
        )

    async def _run(self, items: list[ItemT]) -> Sequence[ResultT | Exception]:
        return await run_isolating(
            self._run_batch,
            items,
            retry_alone=self._retry_alone,
            run_again=self._run_again,
            name=self._name,
        )

    async def aclose(self) -> None:
        """Waits for the batch in progress and the queued ones (called at shutdown)."""
        if self._runner is not None:
            await asyncio.gather(self._runner, return_exceptions=True)


async def run_isolating(
    run_batch: BatchRunner[ItemT, ResultT],
    items: list[ItemT],
    *,
    retry_alone: Callable[[Exception], bool],
    run_again: Callable[[Exception], bool],
    name: str,
) -> Sequence[ResultT | Exception]:
    """`run_batch(items)`; if it raises, once more when `run_again(error)` (a lost lock
    race), then item by item when `retry_alone(error)` (an item the database rejects), so
    that only that item gets the error; otherwise every item gets it."""
    try:
        return await run_batch(items)
    except Exception as exc:
        error = exc
    if run_again(error):
        # A lost lock race (deadlock): the transaction rolled back; once more.
        log.warning(
            "a batch of %d lost a lock race; running it again",
            len(items),
            extra={"batch": name, "error": type(error).__name__},
        )
        try:
            return await run_batch(items)
        except Exception as again:
            error = again
    if len(items) == 1 or not retry_alone(error):
        return [error] * len(items)
    log.warning(
        "a batch of %d failed; running its items one by one",
        len(items),
        extra={"batch": name, "error": type(error).__name__},
    )
    results: list[ResultT | Exception] = []
    for item in items:
        try:
            results.extend(await run_batch([item]))
        except Exception as single:
            results.append(single)
    return results


async def wait_all(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Returns when every future is done. Like asyncio.wait(futures), a caller cancelled
    here leaves the futures alone (no shield needed); unlike it, it does not check each
    future against the Coroutine ABC (a slow isinstance miss for a future, in every
    SendConversion call)."""
    pending = [future for future in futures if not future.done()]
    if not pending:
        return
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    remaining = len(pending)

    def one_done(_: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining == 0 and not waiter.done():
            waiter.set_result(None)

    for future in pending:
        future.add_done_callback(one_done)
    try:
        await waiter
    finally:
        for future in pending:
            future.remove_done_callback(one_done)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Marks a future's error as seen: its caller may have gone (deadline)."""
    if not future.cancelled():
        future.exception()
