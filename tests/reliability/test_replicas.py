"""Replicas: two server processes on one PostgreSQL database, retry workers in both."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from capi.v1 import resources_pb2 as res
from tests.fakes.graph import FakeGraph
from tests.fakes.http import FakeResponse, RecordedRequest
from tests.reliability.conftest import Figures
from tests.reliability.support import (
    Client,
    ServerProcess,
    create_direction,
    event_log_statuses,
    expected_levels,
    fresh_pg_database,
    phone_of,
    send_all,
    send_request,
    server_env,
    sync_engine,
    tally_events,
)

WORKER_ENV = {
    "CAPI_RETRY_WORKER_ENABLED": "true",
    "CAPI_RETRY_POLL_SECONDS": "0.2",
    "CAPI_RETRY_BASE_SECONDS": "0.5",
    "CAPI_RETRY_MAX_SECONDS": "1.5",
}


@dataclass(frozen=True, slots=True)
class Post:
    replica: str
    started: float
    ended: float
    status: int
    event_ids: tuple[str, ...]


class TimedGraph:
    """A FakeGraph whose POSTs are recorded with their time span; can be made to fail."""

    def __init__(self, replica: str, log: list[Post], lock: threading.Lock) -> None:
        self.replica = replica
        self.fake = FakeGraph()
        self.failing = False
        self._log, self._lock = log, lock
        self.fake.set_handler(self._answer)

    def _answer(self, request: RecordedRequest) -> FakeResponse:
        started = time.monotonic()
        data = request.json().get("data") or []
        time.sleep(0.05)  # a realistic round trip, so overlapping sends would show
        status = 503 if self.failing else 200
        with self._lock:
            self._log.append(
                Post(
                    self.replica,
                    started,
                    time.monotonic(),
                    status,
                    tuple(str(e["event_id"]) for e in data),
                )
            )
        if self.failing:
            return FakeResponse(503, {"error": {"message": "Service unavailable", "code": 2}})
        return FakeResponse(200, {"events_received": len(data), "fbtrace_id": "t"})


async def wait_all_success(url: str, expected: int, within_seconds: float) -> None:
    with sync_engine(url) as engine:
        deadline = time.monotonic() + within_seconds
        while True:
            statuses = event_log_statuses(engine)
            if len(statuses) == expected and set(statuses.values()) == {"success"}:
                return
            assert time.monotonic() < deadline, (len(statuses), expected, set(statuses.values()))
            await asyncio.sleep(0.3)


def overlapping_sends(posts: list[Post]) -> list[str]:
    """event_ids that were in two POSTs whose time spans overlap (sent twice at once)."""
    spans: dict[str, list[Post]] = defaultdict(list)
    for post in posts:
        for event_id in post.event_ids:
            spans[event_id].append(post)
    overlapping = []
    for event_id, items in spans.items():
        items.sort(key=lambda p: p.started)
        if any(b.started < a.ended for a, b in itertools.pairwise(items)):
            overlapping.append(event_id)
    return overlapping


async def test_two_replicas_one_event_id_per_dialog_level_and_no_concurrent_resend(
    tmp_path: Path, figures: Figures
) -> None:
    """Proves, with two real server processes on one PostgreSQL database and the retry
    worker running in both: (a) the same 100 dialogs x 3 levels sent through both replicas at
    once reach Graph with exactly one event_id per (dialog, level) and no resend at all;
    (b) 200 events queued while Graph answers 503 are all delivered once Graph recovers,
    each accepted exactly once, and no event is ever in two POSTs at the same time (the
    workers never send the same pending row concurrently)."""
    posts: list[Post] = []
    lock = threading.Lock()
    with fresh_pg_database() as url, ExitStack() as stack:
        graphs = [TimedGraph(name, posts, lock) for name in ("a", "b")]
        for graph in graphs:
            stack.enter_context(graph.fake)
        servers = [
            ServerProcess(
                server_env(url, graph.fake.base_url, **WORKER_ENV),
                tmp_path / f"server-{graph.replica}.log",
            ).start()
            for graph in graphs
        ]
        for server in servers:
            stack.callback(server.stop)
        for server in servers:
            await server.wait_serving()
        clients = [Client.insecure(s.target) for s in servers]
        direction = await create_direction(clients[0].settings)

        # (a) the same dialogs and levels through both replicas at once.
        same = [(phone_of(i, "7702"), level) for i in range(100) for level in (1, 2, 3)]
        calls = [(client, phone, level) for phone, level in same for client in clients]
        random.Random(7).shuffle(calls)
        results = await send_all([(c, send_request(direction, p, lv)) for c, p, lv in calls], 60)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        expected_a = expected_levels(same)
        await wait_all_success(url, len(expected_a), 30)
        tally_a = tally_events([e for g in graphs for e in g.fake.events()])
        assert tally_a.conflicting == {}
        assert set(tally_a.event_ids) == expected_a
        assert tally_a.resends == 0

        # (b) a shared queue: 200 events pile up while Graph fails, then drain.
        for graph in graphs:
            graph.failing = True
        queued = [(phone_of(i, "7703"), 1) for i in range(200)]
        results = await send_all(
            [(clients[i % 2], send_request(direction, *queued[i])) for i in range(len(queued))], 60
        )
        assert [r for r in results if isinstance(r, BaseException)] == []
        assert {r.events[0].outcome for r in results if not isinstance(r, BaseException)} == {
            res.SEND_OUTCOME_QUEUED
        }
        await asyncio.sleep(2.0)  # both workers retry against the failing Graph
        for graph in graphs:
            graph.failing = False
        await wait_all_success(url, len(expected_a) + len(queued), 40)
        for client in clients:
            await client.close()
    queued_ids = {event_id for p in posts for event_id in p.event_ids} - {
        event_id for ids in tally_a.event_ids.values() for event_id in ids
    }
    accepted: dict[str, int] = defaultdict(int)
    replicas_of: dict[str, set[str]] = defaultdict(set)
    for post in posts:
        for event_id in post.event_ids:
            replicas_of[event_id].add(post.replica)
            if post.status == 200:
                accepted[event_id] += 1
    overlapping = overlapping_sends(posts)
    figures.record(
        replicas=2,
        same_dialog_calls=len(calls),
        events_same_dialogs=len(expected_a),
        duplicates_seen=len(tally_a.conflicting),
        queued_events=len(queued_ids),
        posts_total=len(posts),
        failed_posts=sum(1 for p in posts if p.status != 200),
        events_tried_by_both_replicas=sum(1 for ids in replicas_of.values() if len(ids) > 1),
        events_sent_concurrently=len(overlapping),
        events_accepted_twice=sum(1 for n in accepted.values() if n > 1),
        events_lost=sum(1 for e in queued_ids if accepted.get(e, 0) == 0),
    )
    assert len(queued_ids) == len(queued)
    assert overlapping == []
    assert all(accepted.get(event_id) == 1 for event_id in queued_ids)
    assert all(n == 1 for n in accepted.values())
