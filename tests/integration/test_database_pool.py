"""The connection pool: an idle connection the database closed is replaced unseen; a busy
one that breaks fails its statement with an error the server maps to UNAVAILABLE."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from capi_server.adapters.db import database
from capi_server.adapters.db.database import create_engine, is_transient_db_error
from tests.conftest import create_pg_database, drop_pg_database


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_pg_database("capi_pool")
    try:
        yield url
    finally:
        drop_pg_database(url)


def terminate_other_backends(url: str) -> int:
    parsed = make_url(url)
    libpq = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (parsed.database,),
        ).fetchall()
    return len(rows)


async def backend_pid(engine: object) -> int:
    async with engine.connect() as conn:  # type: ignore[attr-defined]
        return int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def test_an_idle_connection_closed_by_the_database_is_replaced(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(pg_url, pool_size=1)
    try:
        first = await backend_pid(engine)
        assert terminate_other_backends(pg_url) == 1
        # Idle for longer than the threshold: pinged at checkout, found dead, replaced.
        monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 0.0)
        second = await backend_pid(engine)
        assert second != first
    finally:
        await engine.dispose()


async def test_a_busy_connection_is_not_pinged_and_its_failure_is_transient(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(pg_url, pool_size=1)
    try:
        first = await backend_pid(engine)
        assert terminate_other_backends(pg_url) == 1
        monkeypatch.setattr(database, "PING_AFTER_IDLE_SECONDS", 3600.0)
        with pytest.raises(Exception) as failed:
            await backend_pid(engine)
        assert is_transient_db_error(failed.value)
        # The pool replaced the broken connection: the next statement works.
        assert await backend_pid(engine) != first
    finally:
        await engine.dispose()
