"""Outage: Graph answers 5xx / times out / 613 for a while, then recovers."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from capi.v1 import resources_pb2 as res
from capi_server.adapters.db.orm import CapiEventLogRow
from capi_server.services.sender import RetryWorker
from tests.conftest import make_settings, start_stubs, stop_stubs
from tests.fakes.graph import FakeGraph
from tests.fakes.http import FakeResponse, RecordedRequest
from tests.reliability.conftest import Figures
from tests.reliability.support import create_direction, phone_of, send_request

CLIENT_TIMEOUT = 0.3
OUTAGE_SECONDS = 2.5


class FlakyGraph:
    """Fails every request in rotation (503, timeout, code 613, HTML 500) until `recover`."""

    def __init__(self) -> None:
        self.fake = FakeGraph()
        self.down = True
        self.kinds = itertools.cycle(["503", "timeout", "613", "html500"])
        self.seen: dict[str, list[float]] = defaultdict(list)
        self.failures: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.fake.set_handler(self._answer)

    def _answer(self, request: RecordedRequest) -> FakeResponse:
        now = time.monotonic()
        data = request.json().get("data") or []
        with self._lock:
            for event in data:
                self.seen[str(event["event_id"])].append(now)
            kind = next(self.kinds) if self.down else "ok"
            self.failures[kind] += 1
        if kind == "503":
            return FakeResponse(503, {"error": {"message": "Service unavailable", "code": 2}})
        if kind == "timeout":
            # The client gives up first; the answer would say "not accepted" anyway.
            return FakeResponse(503, b"", delay=CLIENT_TIMEOUT * 2)
        if kind == "613":
            return FakeResponse(
                400,
                {
                    "error": {
                        "message": "Calls to this api have exceeded the rate limit.",
                        "type": "OAuthException",
                        "code": 613,
                    }
                },
            )
        if kind == "html500":
            return FakeResponse(500, "<html><body>Internal Server Error</body></html>")
        return FakeResponse(200, {"events_received": len(data), "fbtrace_id": "ok"})


async def test_outage_then_recovery_delivers_with_backoff_and_expires_old_events(
    database_url: str, figures: Figures
) -> None:
    """Proves that while Graph fails (503, timeouts, code 613, HTML 500) every queued event
    stays pending and is retried with growing gaps, that after recovery every event is
    delivered exactly once with capi_events_log.attempts equal to the POSTs that carried it
    (> 1), and that events whose event_time left Meta's 7-day window are closed as expired
    without being sent again."""
    flaky = FlakyGraph()
    with flaky.fake:
        stubs = await start_stubs(
            make_settings(
                database_url,
                meta_graph_url=flaky.fake.base_url,
                meta_timeout_seconds=CLIENT_TIMEOUT,
                retry_base_seconds=0.2,
                retry_max_seconds=5.0,
            )
        )
        worker: RetryWorker | None = None
        try:
            direction = await create_direction(stubs.settings)
            responses = [
                await stubs.sender.SendConversion(send_request(direction, phone_of(i, "7705"), 1))
                for i in range(20)
            ]
            assert {r.events[0].outcome for r in responses} == {res.SEND_OUTCOME_QUEUED}
            event_ids = [r.events[0].event_id for r in responses]
            too_old, fresh = set(event_ids[:3]), event_ids[3:]
            async with stubs.app.db.session() as session:
                await session.execute(
                    update(CapiEventLogRow)
                    .where(CapiEventLogRow.event_id.in_(too_old))
                    .values(event_time=datetime.now(UTC) - timedelta(days=7, minutes=-30))
                )
                await session.commit()
            flaky.seen.clear()
            worker = RetryWorker(stubs.app.sender, 0.05)
            worker.start()
            await asyncio.sleep(OUTAGE_SECONDS)
            failing_posts = sum(flaky.failures.values())
            flaky.down = False
            deadline = time.monotonic() + 30
            while True:
                async with stubs.app.db.session() as session:
                    rows = {
                        row.event_id: row
                        for row in (
                            await session.execute(
                                select(CapiEventLogRow).where(
                                    CapiEventLogRow.event_id.in_(event_ids)
                                )
                            )
                        ).scalars()
                    }
                if all(rows[e].status == "success" for e in fresh) and all(
                    rows[e].status == "error" for e in too_old
                ):
                    break
                assert time.monotonic() < deadline, {e: rows[e].status for e in event_ids}
                await asyncio.sleep(0.1)
        finally:
            if worker is not None:
                await worker.stop()
            await stop_stubs(stubs)
    for event_id in too_old:
        assert (rows[event_id].error_message or "").startswith("expired")
        assert flaky.seen.get(event_id, []) == []
    gaps_by_attempt: dict[int, list[float]] = defaultdict(list)
    for event_id in fresh:
        times = flaky.seen[event_id]
        # One POST per attempt after the first (made by SendConversion itself).
        assert rows[event_id].attempts == len(times) + 1
        assert rows[event_id].attempts > 2
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for index, gap in enumerate(gaps):
            gaps_by_attempt[index].append(gap)
        if len(gaps) >= 2:
            assert gaps[-1] > gaps[0], gaps
    mean_gaps = [round(sum(g) / len(g), 2) for _, g in sorted(gaps_by_attempt.items())]
    figures.record(
        events=len(event_ids),
        delivered=len(fresh),
        expired=len(too_old),
        failing_posts=failing_posts,
        failure_kinds={k: v for k, v in flaky.failures.items() if k != "ok"},
        attempts=sorted({rows[e].attempts for e in fresh}),
        mean_gap_seconds_by_retry=mean_gaps,
    )
    # Backoff: the mean gap grows from one retry to the next while Graph is down.
    assert mean_gaps[1] > mean_gaps[0]
    assert flaky.failures["ok"] >= 1
