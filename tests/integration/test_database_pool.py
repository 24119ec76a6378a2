"""The connection pools (the engine's, and the autocommit pool of the hot statements): an
idle connection the database closed is replaced unseen; a busy one that breaks fails its
statement with an error the server maps to UNAVAILABLE."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from capi_server.adapters.db import database, dialogs_repo
from capi_server.adapters.db.database import Database, create_engine, is_transient_db_error
from capi_server.adapters.db.driver import AutocommitPool
from tests.conftest import create_pg_database, drop_pg_database
from tests.reliability.support import terminate_backends


async def backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


@pytest.fixture
async def pooled_then_terminated() -> AsyncIterator[tuple[AsyncEngine, int, str]]:
    """An engine whose one pooled connection (backend pid given) the database has closed,
    and the database's URL."""
    url = create_pg_database("capi_pool")
    engine = create_engine(url, pool_size=1)
    try:
        first = await backend_pid(engine)
        assert terminate_backends(url) == 1
        yield engine, first, url
    finally:
        await engine.dispose()
        drop_pg_database(url)


async def test_an_idle_connection_closed_by_the_database_is_replaced(
    pooled_then_terminated: tuple[AsyncEngine, int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, first, _ = pooled_then_terminated
    # Idle for longer than the threshold: pinged at checkout, found dead, replaced.
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)
    assert await backend_pid(engine) != first


async def test_a_busy_connection_is_not_pinged_and_its_failure_is_transient(
    pooled_then_terminated: tuple[AsyncEngine, int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, first, _ = pooled_then_terminated
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
    with pytest.raises(Exception) as failed:
        await backend_pid(engine)
    assert is_transient_db_error(failed.value)
    # The pool replaced the broken connection: the next statement works.
    assert await backend_pid(engine) != first


async def test_after_a_lost_connection_every_checkout_is_pinged_for_a_while(
    pooled_then_terminated: tuple[AsyncEngine, int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that dropped one connection may drop the next (a failover, a flapping
    network): for a while every checkout is pinged, as pool_pre_ping would."""
    engine, first, url = pooled_then_terminated
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
    with pytest.raises(Exception) as failed:
        await backend_pid(engine)
    assert is_transient_db_error(failed.value)
    second = await backend_pid(engine)
    assert terminate_backends(url) == 1
    # Used a moment ago, yet pinged at checkout (a connection was lost recently): replaced.
    assert await backend_pid(engine) not in (first, second)


async def test_a_lost_connection_under_a_driver_level_query_is_transient(
    pooled_then_terminated: tuple[AsyncEngine, int, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """dialog_states runs on psycopg directly: a dropped connection still surfaces as the
    transient error the interceptor answers UNAVAILABLE, and the pool drops it."""
    engine, first, _ = pooled_then_terminated
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
    db = Database(engine)
    with pytest.raises(Exception) as failed:
        async with db.autocommit() as connection:
            await dialogs_repo.dialog_states(connection, [1])
    assert is_transient_db_error(failed.value)
    assert await backend_pid(engine) != first


# -- the autocommit pool (driver.AutocommitPool) -----------------------------------------


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = create_pg_database("capi_pool")
    try:
        yield url
    finally:
        drop_pg_database(url)


def libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(False)


@asynccontextmanager
async def autocommit_pool(url: str, **overrides: Any) -> AsyncIterator[AutocommitPool]:
    """A pool of the test database's connections, closed on leaving."""
    options: dict[str, Any] = {
        "max_size": 2,
        "ping_after_idle": 3600.0,
        "ping_all_after_loss": 30.0,
        **overrides,
    }
    pool = AutocommitPool({"conninfo": libpq(url)}, **options)
    try:
        yield pool
    finally:
        await pool.aclose()


async def pool_pid(pool: AutocommitPool, sleep: float = 0.0) -> int:
    ((pid, _),) = await pool.fetch_all(
        "SELECT pg_backend_pid(), pg_sleep(%(sleep)s)", {"sleep": sleep}
    )
    return int(pid)


async def test_the_autocommit_pool_reuses_one_connection_and_commits_each_statement(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url) as pool:
        await pool.fetch_all("CREATE TABLE t (n int)", {})
        await pool.fetch_all("INSERT INTO t VALUES (%(n)s)", {"n": 7})
        assert await pool_pid(pool) == await pool_pid(pool)
        assert pool.open_connections == 1
        # Committed: another connection sees the row.
        with psycopg.connect(libpq(pg_url)) as other:
            assert other.execute("SELECT n FROM t").fetchall() == [(7,)]
    assert pool.open_connections == 0


async def test_the_autocommit_pool_opens_at_most_max_size_connections(pg_url: str) -> None:
    async with autocommit_pool(pg_url, max_size=2) as pool:
        pids = await asyncio.gather(*(pool_pid(pool, sleep=0.05) for _ in range(6)))
        assert len(set(pids)) == 2
        assert pool.open_connections == 2


async def test_a_caller_that_waits_too_long_for_a_connection_gets_a_transient_error(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url, max_size=1, timeout=0.2) as pool:
        busy = asyncio.create_task(pool_pid(pool, sleep=1.0))
        await asyncio.sleep(0.1)
        with pytest.raises(PoolTimeoutError) as failed:
            await pool_pid(pool)
        assert is_transient_db_error(failed.value)
        await busy
        await pool_pid(pool)  # free again


async def test_a_statement_error_keeps_the_connection_and_is_not_transient(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url) as pool:
        first = await pool_pid(pool)
        with pytest.raises(DBAPIError) as failed:
            await pool.fetch_all("SELECT 1 / 0", {})
        assert isinstance(failed.value.orig, psycopg.errors.DivisionByZero)
        assert not is_transient_db_error(failed.value)
        assert await pool_pid(pool) == first


async def test_a_connection_lost_under_the_autocommit_pool_is_transient_then_replaced(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url) as pool:
        first = await pool_pid(pool)
        assert terminate_backends(pg_url) == 1
        # Used a moment ago: not pinged, so its statement fails, with a transient error.
        with pytest.raises(DBAPIError) as failed:
            await pool_pid(pool)
        assert is_transient_db_error(failed.value)
        second = await pool_pid(pool)
        assert second != first
        # A connection was lost moments ago: every use is pinged, so this one is
        # replaced unseen.
        assert terminate_backends(pg_url) == 1
        assert await pool_pid(pool) not in (first, second)
        assert pool.open_connections == 1


async def test_an_idle_autocommit_connection_closed_by_the_database_is_replaced(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url, ping_after_idle=0.0) as pool:
        first = await pool_pid(pool)
        assert terminate_backends(pg_url) == 1
        assert await pool_pid(pool) != first


async def test_a_statement_cancelled_midway_does_not_leave_its_connection_in_the_pool(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url, max_size=1) as pool:
        first = await pool_pid(pool)
        slow = asyncio.create_task(pool_pid(pool, sleep=5.0))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert pool.open_connections == 0
        assert await pool_pid(pool) != first


async def test_database_dispose_closes_the_autocommit_connections(pg_url: str) -> None:
    db = Database(create_engine(pg_url))
    assert db.autocommit_pool is not None
    await db.autocommit_pool.fetch_all("SELECT 1", {})
    assert await backends(pg_url) == 1
    await db.dispose()
    assert await backends(pg_url, until=0) == 0


async def backends(url: str, until: int | None = None) -> int:
    """Connections to the database, other than the one asking; waits up to 5 s for
    `until` (a closed connection's backend exits a moment later)."""
    count = -1
    for _ in range(50):
        with psycopg.connect(libpq(url)) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND pid <> pg_backend_pid()",
                (make_url(url).database,),
            ).fetchone()
        assert row is not None
        count = int(row[0])
        if until is None or count == until:
            break
        await asyncio.sleep(0.1)
    return count


async def test_a_failed_connect_hands_its_slot_to_a_waiting_caller(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses the first connection while a second caller waits for a slot:
    that caller opens one at once, not after its wait times out."""
    real_connect = psycopg.AsyncConnection.connect
    attempts = 0

    async def refuse_first(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await asyncio.sleep(0.2)
            raise psycopg.OperationalError("connection refused")
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refuse_first)
    async with autocommit_pool(pg_url, max_size=1, timeout=2.0) as pool:
        first = asyncio.create_task(pool_pid(pool))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(pool_pid(pool))
        with pytest.raises(DBAPIError) as refused:
            await first
        assert is_transient_db_error(refused.value)
        await second  # without the hand-over: PoolTimeoutError after 2 s
        assert pool.open_connections == 1


async def test_a_caller_cancelled_as_it_is_handed_a_connection_passes_it_on(
    pg_url: str,
) -> None:
    async with autocommit_pool(pg_url, max_size=1, timeout=5.0) as pool:
        held = await pool._acquire()
        cancelled = asyncio.create_task(pool._acquire())
        next_in_line = asyncio.create_task(pool._acquire())
        await asyncio.sleep(0.05)  # both wait
        pool._release(held, keep=True)  # handed to the first waiter...
        cancelled.cancel()  # ...which gives up before it runs again
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await asyncio.wait_for(next_in_line, 1.0) is held
        assert pool.open_connections == 1


async def test_a_connection_lost_by_the_engine_makes_the_autocommit_pool_ping(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine and the autocommit pool share the lost-connection clock: after the
    engine found a connection dropped, the pool pings its own before use."""
    monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
    db = Database(create_engine(pg_url, pool_size=1))
    assert db.autocommit_pool is not None
    try:
        await backend_pid(db.engine)
        first = await pool_pid(db.autocommit_pool)
        assert terminate_backends(pg_url) == 2
        with pytest.raises(Exception) as failed:
            await backend_pid(db.engine)
        assert is_transient_db_error(failed.value)
        # Used a moment ago, yet pinged (the engine lost a connection): replaced unseen.
        assert await pool_pid(db.autocommit_pool) != first
    finally:
        await db.dispose()


async def test_sqlite_has_no_autocommit_pool(tmp_path: Path) -> None:
    db = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'capi.db'}"))
    assert db.autocommit_pool is None
    await db.dispose()
