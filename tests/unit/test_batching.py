"""Batcher: concurrent callers share batches, each gets its own result or error."""

from __future__ import annotations

import asyncio

import pytest

from capi_server.services.batching import Batcher, wait_all


class Recorder:
    """A batch function that records its batches and can be held mid-batch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        self.batches.append(list(items))
        await self.release.wait()
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


async def test_each_caller_gets_its_own_result_or_error() -> None:
    recorder = Recorder()
    commit: Batcher[int, int] = Batcher(recorder, max_batch=100)
    results = await asyncio.gather(*(commit.submit(i) for i in range(6)), return_exceptions=True)
    assert results[0::2] == [0, 20, 40]
    assert [str(e) for e in results[1::2]] == ["odd 1", "odd 3", "odd 5"]
    # All six were queued before the first batch ran: one batch.
    assert recorder.batches == [[0, 1, 2, 3, 4, 5]]


async def test_items_queued_while_a_batch_runs_form_the_next_batch() -> None:
    recorder = Recorder()
    recorder.release.clear()
    commit: Batcher[int, int] = Batcher(recorder, max_batch=3)
    first = asyncio.ensure_future(commit.submit(0))
    await asyncio.sleep(0.01)
    assert recorder.batches == [[0]]  # an idle service does not wait to fill a batch
    later = [asyncio.ensure_future(commit.submit(i)) for i in (2, 4, 6, 8)]
    await asyncio.sleep(0.01)
    recorder.release.set()
    assert await first == 0
    assert await asyncio.gather(*later) == [20, 40, 60, 80]
    assert recorder.batches == [[0], [2, 4, 6], [8]]  # max_batch holds


async def test_a_caller_that_gives_up_does_not_cancel_its_batch() -> None:
    recorder = Recorder()
    recorder.release.clear()
    commit: Batcher[int, int] = Batcher(recorder, max_batch=10)
    impatient = asyncio.ensure_future(commit.submit(2))
    patient = asyncio.ensure_future(commit.submit(4))
    await asyncio.sleep(0.01)
    impatient.cancel()
    await asyncio.sleep(0.01)
    recorder.release.set()
    assert await patient == 40
    assert recorder.batches == [[2, 4]]
    with pytest.raises(asyncio.CancelledError):
        await impatient


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_still_runs() -> None:
    calls = 0

    async def flaky(items: list[int]) -> list[int | Exception]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("database went away")
        return list(items)

    commit: Batcher[int, int] = Batcher(flaky, max_batch=10)
    with pytest.raises(RuntimeError, match="went away"):
        await commit.submit_many([1, 2])
    assert await commit.submit(3) == 3


def test_max_batch_must_be_positive() -> None:
    async def noop(items: list[int]) -> list[int | Exception]:
        return list(items)

    with pytest.raises(ValueError, match="max_batch"):
        Batcher(noop, max_batch=0)


async def test_a_failed_batch_is_retried_item_by_item_when_a_retry_can_isolate_it() -> None:
    runs: list[list[int]] = []

    async def rejects_13(items: list[int]) -> list[int | Exception]:
        runs.append(list(items))
        if 13 in items:
            raise LookupError("row rejected")
        return list(items)

    isolating: Batcher[int, int] = Batcher(
        rejects_13, max_batch=10, retry_alone=lambda e: isinstance(e, LookupError)
    )
    results = await asyncio.gather(
        *(isolating.submit(i) for i in (1, 13, 2)), return_exceptions=True
    )
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], LookupError)
    assert runs == [[1, 13, 2], [1], [13], [2]]

    runs.clear()
    failing_all: Batcher[int, int] = Batcher(rejects_13, max_batch=10)
    results = await asyncio.gather(
        *(failing_all.submit(i) for i in (1, 13)), return_exceptions=True
    )
    assert all(isinstance(r, LookupError) for r in results)
    assert runs == [[1, 13]]


async def test_a_batch_function_that_returns_too_few_results_fails_its_callers() -> None:
    async def short(items: list[int]) -> list[int | Exception]:
        return list(items[:-1])

    commit: Batcher[int, int] = Batcher(short, max_batch=10)
    results = await asyncio.wait_for(
        asyncio.gather(*(commit.submit(i) for i in range(3)), return_exceptions=True), timeout=1
    )
    # Nobody waits forever: the ones without a result get the error.
    assert results[:2] == [0, 1] and isinstance(results[2], ValueError)


async def test_a_batch_that_lost_a_lock_race_runs_once_more_whole() -> None:
    runs: list[list[int]] = []

    async def loses_once(items: list[int]) -> list[int | Exception]:
        runs.append(list(items))
        if len(runs) == 1:
            raise TimeoutError("deadlock detected")
        return list(items)

    commit: Batcher[int, int] = Batcher(
        loses_once, max_batch=10, run_again=lambda e: isinstance(e, TimeoutError)
    )
    assert await commit.submit_many([1, 2]) == [1, 2]
    assert runs == [[1, 2], [1, 2]]


async def test_a_caller_calling_in_a_loop_never_waits_for_the_linger() -> None:
    recorder = Recorder()
    commit: Batcher[int, int] = Batcher(recorder, max_batch=100, linger_seconds=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for i in range(0, 10, 2):
        assert await commit.submit(i) == i * 10
    # One item per batch and nothing left waiting: no sign of concurrent callers.
    assert commit.lingered == 0
    assert loop.time() - started < 0.5


async def test_one_caller_submitting_many_items_is_not_load() -> None:
    recorder = Recorder()
    commit: Batcher[int, int] = Batcher(recorder, max_batch=3, linger_seconds=0.5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    for round_ in range(3):
        # A multi-message webhook: several items of one call, more than a batch holds.
        items = [round_ * 10 + i * 2 for i in range(5)]
        assert await commit.submit_many(items) == [i * 10 for i in items]
    assert commit.lingered == 0
    assert loop.time() - started < 0.5
    assert [len(batch) for batch in recorder.batches] == [3, 2] * 3


class SlowRecorder(Recorder):
    """A batch that takes a few milliseconds, as a database round trip does."""

    async def __call__(self, items: list[int]) -> list[int | Exception]:
        await asyncio.sleep(0.005)
        return await super().__call__(items)


async def test_under_concurrent_load_a_batch_lingers_for_more_callers() -> None:
    recorder = SlowRecorder()
    commit: Batcher[int, int] = Batcher(recorder, max_batch=100, linger_seconds=0.05)

    async def caller(first: int) -> list[int]:
        # Each caller submits again as soon as its previous call returns, and the callers
        # are spread out in time (as gRPC hands a process its calls one at a time).
        await asyncio.sleep(first * 0.003)
        return [await commit.submit(first * 2 + 20 * n) for n in range(4)]

    results = await asyncio.gather(*(caller(i) for i in range(5)))
    assert results == [[(i * 2 + 20 * n) * 10 for n in range(4)] for i in range(5)]
    assert commit.lingered > 0
    # Lingering gathers the spread-out callers into batches of several items.
    assert max(len(batch) for batch in recorder.batches) == 5
    assert len(recorder.batches) <= 6


def test_linger_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        Batcher(Recorder(), max_batch=1, linger_seconds=-1)


async def test_wait_all_returns_once_every_future_is_done() -> None:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    second: asyncio.Future[int] = loop.create_future()
    failed: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.ensure_future(wait_all([first, second, failed]))
    first.set_result(1)
    failed.set_exception(ValueError("one failed"))
    await asyncio.sleep(0)
    assert not waiting.done()  # the second is still pending
    second.set_result(2)
    await asyncio.wait_for(waiting, 1)
    assert failed.exception() is not None  # an error is left in its future, not raised
    await wait_all([first, second])  # all done already: returns at once
    await wait_all([])


async def test_a_caller_cancelled_in_wait_all_leaves_the_futures_pending() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.ensure_future(wait_all([future]))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not future.done()  # still the drainer's to complete
    future.set_result(1)  # and its callbacks are gone: nothing fires on the dead waiter
    await asyncio.sleep(0)


async def test_pace_runs_after_the_callers_have_results_and_before_the_next_batch() -> None:
    recorder = Recorder()
    paced = asyncio.Event()
    seen: list[list[object]] = []

    async def pace(results: object) -> None:
        assert isinstance(results, list)
        seen.append(results)
        await paced.wait()

    commit: Batcher[int, int] = Batcher(recorder, max_batch=100, pace=pace)
    first = asyncio.ensure_future(commit.submit(0))
    await asyncio.sleep(0.01)
    # The first batch is done and being paced: its caller has its answer already.
    assert first.done() and first.result() == 0
    assert seen == [[0]]
    later = [asyncio.ensure_future(commit.submit(i)) for i in (2, 4)]
    await asyncio.sleep(0.01)
    assert recorder.batches == [[0]]  # the next batch waits for the pace
    paced.set()
    assert await asyncio.gather(*later) == [20, 40]
    assert recorder.batches == [[0], [2, 4]]  # and then carries everything that queued


async def test_a_pace_that_fails_is_logged_and_the_next_batch_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder = Recorder()

    async def failing_pace(results: object) -> None:
        raise RuntimeError("pace failed")

    commit: Batcher[int, int] = Batcher(recorder, max_batch=100, pace=failing_pace)
    assert await commit.submit(0) == 0
    assert await commit.submit(2) == 20
    assert recorder.batches == [[0], [2]]
    assert "pacing a batch failed" in caplog.text
