"""The connection pool: an idle connection the database closed is replaced unseen; a busy
one that breaks fails its statement with an error the server maps to UNAVAILABLE."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from capi_server.adapters.db import database, dialogs_repo
from capi_server.adapters.db.database import Database, create_engine, is_transient_db_error
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
