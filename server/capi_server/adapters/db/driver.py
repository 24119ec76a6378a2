"""Hot PostgreSQL statements run on psycopg directly, under SQLAlchemy's connection.

SQLAlchemy's execute path (compiled cache lookup, the greenlet hop, result processing)
costs about as much server CPU as psycopg's own round trip, and the hot batches run a
few constant statements each. This runs such a statement on the same connection (and so
in the same transaction), and fails the way SQLAlchemy would: a broken connection is
dropped from the pool and the error is SQLAlchemy's DBAPIError, so callers keep one
error vocabulary (`is_transient_db_error`, `is_lock_conflict`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import TextClause
from sqlalchemy.dialects.postgresql.psycopg import PGDialectAsync_psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

_DIALECT = PGDialectAsync_psycopg()  # type: ignore[no-untyped-call]


def psycopg_text(statement: TextClause) -> str:
    """A constant text() statement as psycopg runs it (`%(name)s` placeholders)."""
    return str(statement.compile(dialect=_DIALECT))


async def fetch_all(
    connection: AsyncConnection, statement: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """The rows of `statement` (psycopg style) run on `connection`'s driver connection."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert driver is not None
    try:
        async with driver.cursor() as cursor:
            await cursor.execute(statement, params)
            return await cursor.fetchall() if cursor.description is not None else []
    except psycopg.Error as exc:
        # What SQLAlchemy would do had it run the statement: drop a broken connection from
        # the pool, and raise its error type (a lost connection is then UNAVAILABLE).
        broken = driver.closed or driver.broken
        if broken:
            await connection.invalidate(exc)
        raise DBAPIError.instance(
            statement,
            None,
            exc,
            psycopg.Error,
            hide_parameters=True,
            connection_invalidated=broken,
        ) from exc


def utc(value: datetime | None) -> datetime | None:
    """A timestamptz as the UtcDateTime column type gives it (psycopg gives the session's
    time zone)."""
    return value.astimezone(UTC) if value is not None else None
