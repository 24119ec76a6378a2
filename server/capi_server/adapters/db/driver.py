"""Hot PostgreSQL statements run on psycopg directly.

SQLAlchemy's execute path (compiled cache lookup, the greenlet hop, result processing)
costs about as much server CPU as psycopg's own round trip, and the hot batches run a
few constant statements each. `fetch_all` runs such a statement on a SQLAlchemy
connection's driver connection (and so in its transaction); `AutocommitPool` runs the
statements that commit on their own on connections of its own. Both fail the way
SQLAlchemy would: a broken connection is dropped and the error is SQLAlchemy's
DBAPIError (a pool that stays full, its TimeoutError), so callers keep one error
vocabulary (`is_transient_db_error`, `is_lock_conflict`).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import TextClause
from sqlalchemy.dialects.postgresql.psycopg import PGDialectAsync_psycopg
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection

_DIALECT = PGDialectAsync_psycopg()  # type: ignore[no-untyped-call]


def psycopg_text(statement: TextClause) -> str:
    """A constant text() statement as psycopg runs it (`%(name)s` placeholders)."""
    return str(statement.compile(dialect=_DIALECT))


async def fetch_all(
    on: AsyncConnection | AutocommitPool, statement: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    """The rows of `statement` (psycopg style), run on `on`: a SQLAlchemy connection's
    driver connection (in its transaction), or a connection of an AutocommitPool."""
    if isinstance(on, AutocommitPool):
        return await on.fetch_all(statement, params)
    driver = (await on.get_raw_connection()).driver_connection
    assert driver is not None
    try:
        return await _rows(driver, statement, params)
    except psycopg.Error as exc:
        # What SQLAlchemy would do had it run the statement: drop a broken connection from
        # the pool, and raise its error type (a lost connection is then UNAVAILABLE).
        broken = driver.closed or driver.broken
        if broken:
            await on.invalidate(exc)
        raise _dbapi_error(statement, exc, broken) from exc


async def _rows(
    connection: psycopg.AsyncConnection[Any], statement: str, params: Mapping[str, Any]
) -> list[tuple[Any, ...]]:
    async with connection.cursor() as cursor:
        await cursor.execute(statement, params)
        return await cursor.fetchall() if cursor.description is not None else []


def _dbapi_error(statement: str, exc: psycopg.Error, broken: bool) -> StatementError:
    return DBAPIError.instance(
        statement,
        None,
        exc,
        psycopg.Error,
        hide_parameters=True,
        connection_invalidated=broken,
    )


class AutocommitPool:
    """Up to `max_size` psycopg connections in autocommit mode, opened when first needed,
    for the statements that commit on their own (IngestMessage's batch, AnalyzeDialog's
    read, a Graph request's record).

    A SQLAlchemy checkout of an autocommit connection (pool events, the isolation level
    set and reset, three greenlet hops) cost the server as much CPU as the statement's
    round trip (~150 us each): these connections never leave autocommit mode, so a
    checkout is a list pop. As the engine's pool does (`database._ping_before_use`), a
    connection idle for `ping_after_idle` seconds is pinged before use, and every one is
    while a connection was lost in the last `ping_all_after_loss` seconds. A caller waits
    at most `timeout` seconds for a connection when all are busy.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        max_size: int,
        ping_after_idle: float,
        ping_all_after_loss: float,
        timeout: float = 30.0,
        connect_timeout: int = 10,
    ) -> None:
        self._conninfo = conninfo
        self._max_size = max_size
        self._ping_after_idle = ping_after_idle
        self._ping_all_after_loss = ping_all_after_loss
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._idle: list[tuple[psycopg.AsyncConnection[Any], float]] = []  # (conn, idle since)
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._last_loss = float("-inf")
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def fetch_all(self, statement: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of `statement` (psycopg style), committed on its own."""
        connection = await self._acquire()
        try:
            rows = await _rows(connection, statement, params)
        except psycopg.Error as exc:
            broken = connection.closed or connection.broken
            await self._release(connection, keep=not broken, lost=broken)
            raise _dbapi_error(statement, exc, broken) from exc
        except BaseException:
            # Cancelled in the middle of a round trip: what the connection would read next
            # is unknown, so it is not reused.
            await self._release(connection, keep=False)
            raise
        await self._release(connection, keep=True)
        return rows

    async def aclose(self) -> None:
        """Closes the idle connections now and the busy ones when they are released."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            self._open -= 1
            await connection.close()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _acquire(self) -> psycopg.AsyncConnection[Any]:
        deadline = time.monotonic() + self._timeout
        while True:
            if self._closed:
                raise PoolTimeoutError("the autocommit pool is closed")
            if self._idle:
                connection, idle_since = self._idle.pop()  # the most recently used
                now = time.monotonic()
                if (
                    now - idle_since < self._ping_after_idle
                    and now - self._last_loss >= self._ping_all_after_loss
                ):
                    return connection
                if await self._ping(connection):
                    return connection
                continue  # dropped: take or open another
            if self._open < self._max_size:
                return await self._connect()
            await self._wait(deadline)

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        self._open += 1
        try:
            return await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
            )
        except psycopg.Error as exc:
            self._open -= 1
            self._last_loss = time.monotonic()
            raise _dbapi_error("connect", exc, True) from exc
        except BaseException:
            self._open -= 1
            raise

    async def _ping(self, connection: psycopg.AsyncConnection[Any]) -> bool:
        try:
            await connection.execute("SELECT 1")
        except psycopg.Error:
            await self._release(connection, keep=False, lost=True)
            return False
        except BaseException:
            await self._release(connection, keep=False)
            raise
        return True

    async def _wait(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PoolTimeoutError(
                f"all {self._max_size} autocommit connections stayed busy for {self._timeout:g} s"
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, remaining)
        except TimeoutError:
            pass  # the loop above raises
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    async def _release(
        self, connection: psycopg.AsyncConnection[Any], *, keep: bool, lost: bool = False
    ) -> None:
        """Back to the idle list (`keep`), or closed; `lost`: the database dropped it."""
        if lost:
            self._last_loss = time.monotonic()
        if keep and not self._closed and not connection.broken and not connection.closed:
            self._idle.append((connection, time.monotonic()))
        else:
            self._open -= 1
            await connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break


def utc(value: datetime | None) -> datetime | None:
    """A timestamptz as the UtcDateTime column type gives it (psycopg gives the session's
    time zone)."""
    return value.astimezone(UTC) if value is not None else None
