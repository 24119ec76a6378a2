"""Database faults: PostgreSQL backends terminated under the running server's feet."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import grpc
from sqlalchemy import text
from sqlalchemy.engine import Engine

from capi.v1 import resources_pb2 as res
from tests.fakes.graph import FakeGraph
from tests.reliability.conftest import Figures
from tests.reliability.support import (
    Client,
    ServerProcess,
    create_direction,
    fresh_pg_database,
    phone_of,
    send_all,
    send_request,
    server_env,
    sync_engine,
    terminate_backends,
)

LEVEL_COLUMNS = {1: "interest", 2: "qualified", 3: "scheduled"}


def half_written(engine: Engine) -> list[str]:
    """Claims without their log row, and log rows without their claim."""
    problems: list[str] = []
    with engine.connect() as conn:
        for level, column in LEVEL_COLUMNS.items():
            orphans = conn.execute(
                text(
                    f"SELECT d.id FROM dialog_analysis d WHERE d.capi_{column}_event_id IS NOT "
                    "NULL AND NOT EXISTS (SELECT 1 FROM capi_events_log l WHERE l.dialog_id = "
                    f"d.id AND l.level = {level} AND l.event_id = d.capi_{column}_event_id "
                    "AND l.status <> 'skipped')"
                )
            ).all()
            problems += [f"dialog {d} claims level {level} without a log row" for (d,) in orphans]
            unclaimed = conn.execute(
                text(
                    "SELECT l.id FROM capi_events_log l JOIN dialog_analysis d ON d.id = "
                    f"l.dialog_id WHERE l.level = {level} AND l.status <> 'skipped' AND "
                    f"(d.capi_{column}_event_id IS NULL OR d.capi_{column}_event_id <> "
                    "l.event_id)"
                )
            ).all()
            problems += [f"log row {i} (level {level}) without its claim" for (i,) in unclaimed]
            sent_unlogged = conn.execute(
                text(
                    f"SELECT d.id FROM dialog_analysis d WHERE d.capi_{column}_sent AND NOT "
                    "EXISTS (SELECT 1 FROM capi_events_log l WHERE l.dialog_id = d.id AND "
                    f"l.level = {level} AND l.status = 'success')"
                )
            ).all()
            problems += [
                f"dialog {d} level {level} sent without success row" for (d,) in sent_unlogged
            ]
    return problems


async def test_terminated_connections_fail_cleanly_and_the_server_recovers(
    tmp_path: Path, figures: Figures
) -> None:
    """Proves that when every PostgreSQL backend of the server is terminated repeatedly
    while 300 SendConversion calls run: each call succeeds or fails with UNAVAILABLE or
    INTERNAL without a stack trace in its message; no half-written rows remain (every claim
    has its log row, every log row its claim, every `sent` flag its success row); and the
    same process then serves normally (health SERVING, new and re-issued calls succeed)."""
    with fresh_pg_database() as url, FakeGraph() as graph, sync_engine(url) as engine:
        graph.set_delay(0.05)
        server = ServerProcess(
            server_env(url, graph.base_url, CAPI_LOG_LEVEL="ERROR"), tmp_path / "server.log"
        ).start()
        try:
            await server.wait_serving()
            client = Client.insecure(server.target)
            direction = await create_direction(client.settings)
            planned = [(phone_of(i, "7706"), 1 + i % 3) for i in range(300)]
            running = True
            terminated = 0

            async def terminator() -> None:
                nonlocal terminated
                while running:
                    terminated += await asyncio.to_thread(terminate_backends, url)
                    await asyncio.sleep(0.1)

            killer = asyncio.create_task(terminator())
            results = await send_all(
                [(client, send_request(direction, p, lv)) for p, lv in planned], 30
            )
            running = False
            await killer
            codes: Counter[str] = Counter()
            failed = []
            for (phone, level), result in zip(planned, results, strict=True):
                if isinstance(result, grpc.aio.AioRpcError):
                    codes[result.code().name] += 1
                    failed.append((phone, level))
                    details = result.details() or ""
                    assert "Traceback" not in details and 'File "' not in details, details
                    assert "psycopg" not in details and "SELECT" not in details, details
                elif isinstance(result, BaseException):
                    raise result
                else:
                    codes["OK"] += 1
            assert set(codes) <= {"OK", "UNAVAILABLE", "INTERNAL"}, codes
            assert terminated > 0
            assert half_written(engine) == []
            assert server.alive()
            await server.wait_serving(within_seconds=15)
            fresh = await send_all(
                [
                    (client, send_request(direction, phone_of(1000 + i, "7706"), 1))
                    for i in range(20)
                ],
                10,
            )
            assert [r for r in fresh if isinstance(r, BaseException)] == []
            reissued = await send_all(
                [(client, send_request(direction, p, lv)) for p, lv in failed], 10
            )
            assert [r for r in reissued if isinstance(r, BaseException)] == []
            outcomes = Counter(
                e.outcome for r in reissued if not isinstance(r, BaseException) for e in r.events
            )
            assert set(outcomes) <= {
                res.SEND_OUTCOME_SENT,
                res.SEND_OUTCOME_ALREADY_SENT,
                res.SEND_OUTCOME_QUEUED,
            }
            assert half_written(engine) == []
            await client.close()
        finally:
            server.stop()
    figures.record(
        calls=len(planned),
        backends_terminated=terminated,
        outcomes=dict(codes),
        reissued=len(failed),
        half_written_rows=0,
    )


async def test_lost_database_connection_is_unavailable_not_internal(tmp_path: Path) -> None:
    """Proves calls cut by a terminated database connection fail with UNAVAILABLE (which
    clients retry), never INTERNAL."""
    with fresh_pg_database() as url, FakeGraph() as graph:
        graph.set_delay(0.05)
        server = ServerProcess(
            server_env(url, graph.base_url, CAPI_LOG_LEVEL="ERROR"), tmp_path / "server.log"
        ).start()
        try:
            await server.wait_serving()
            client = Client.insecure(server.target)
            direction = await create_direction(client.settings)
            running = True

            async def terminator() -> None:
                while running:
                    await asyncio.to_thread(terminate_backends, url)
                    await asyncio.sleep(0.1)

            killer = asyncio.create_task(terminator())
            results = await send_all(
                [(client, send_request(direction, phone_of(i, "7707"), 1)) for i in range(60)], 20
            )
            running = False
            await killer
            await client.close()
        finally:
            server.stop()
    codes = {r.code().name for r in results if isinstance(r, grpc.aio.AioRpcError)}
    assert codes, "no call was cut"
    assert codes <= {"UNAVAILABLE"}, codes
