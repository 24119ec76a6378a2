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


class RecentLosses:
    """When a connection to the database was last found lost. The engine's pool and the
    autocommit pool share one: a database that dropped a connection of either may have
    dropped the others, so for a while both ping every connection before use."""

    def __init__(self) -> None:
        self._last = float("-inf")

    def lost(self) -> None:
        self._last = time.monotonic()

    def within(self, seconds: float) -> bool:
        return time.monotonic() - self._last < seconds


# What a waiter is handed: a connection, or (None) the slot of one it may open.
_Handed = psycopg.AsyncConnection[Any] | None


class AutocommitPool:
    """Up to `max_size` psycopg connections in autocommit mode, opened when first needed,
    for the statements that commit on their own (IngestMessage's batch, AnalyzeDialog's
    read, a Graph request's record).

    A SQLAlchemy checkout of an autocommit connection (pool events, the isolation level
    set and reset, three greenlet hops) cost the server as much CPU as the statement's
    round trip (~150 us each): these connections never leave autocommit mode, so a
    checkout is a list pop. As the engine's pool does (`database._ping_before_use`), a
    connection idle for `ping_after_idle` seconds is pinged before use, and every one is
    while `losses` saw a lost connection in the last `ping_all_after_loss` seconds. When
    all are busy, callers queue in arrival order (a released connection, or the slot of
    a closed one, is handed to the first) for at most `timeout` seconds.
    """

    def __init__(
        self,
        connect_kwargs: Mapping[str, Any],
        *,
        max_size: int,
        ping_after_idle: float,
        ping_all_after_loss: float,
        losses: RecentLosses | None = None,
        timeout: float = 30.0,
    ) -> None:
        self._connect_kwargs = dict(connect_kwargs)
        self._max_size = max(1, max_size)
        self._ping_after_idle = ping_after_idle
        self._ping_all_after_loss = ping_all_after_loss
        self._losses = losses or RecentLosses()
        self._timeout = timeout
        self._idle: list[tuple[psycopg.AsyncConnection[Any], float]] = []  # (conn, idle since)
        self._open = 0  # connections open or being opened, and slots handed to waiters
        self._waiters: deque[asyncio.Future[_Handed]] = deque()
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
            self._release(connection, keep=not broken, lost=broken)
            raise _dbapi_error(statement, exc, broken) from exc
        except BaseException:
            # Cancelled in the middle of a round trip: what the connection would read next
            # is unknown, so it is not reused.
            self._release(connection, keep=False)
            raise
        self._release(connection, keep=True)
        return rows

    async def aclose(self) -> None:
        """Closes the idle connections now and the busy ones when they are released;
        callers still waiting get the pool's TimeoutError."""
        self._closed = True
        idle, self._idle = self._idle, []
        for connection, _ in idle:
            self._open -= 1
            await connection.close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(PoolTimeoutError("the autocommit pool is closed"))

    async def _acquire(self) -> psycopg.AsyncConnection[Any]:
        deadline = time.monotonic() + self._timeout
        while True:
            if self._closed:
                raise PoolTimeoutError("the autocommit pool is closed")
            handed: _Handed
            if self._idle:
                handed, idle_since = self._idle.pop()  # the most recently used
            elif self._open < self._max_size:
                self._open += 1
                handed, idle_since = None, 0.0
            else:
                handed, idle_since = await self._wait(deadline), time.monotonic()
            if handed is None:
                return await self._connect()
            if not self._needs_ping(idle_since) or await self._ping(handed):
                return handed
            # Dropped: take or open another.

    def _needs_ping(self, idle_since: float) -> bool:
        return time.monotonic() - idle_since >= self._ping_after_idle or self._losses.within(
            self._ping_all_after_loss
        )

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        """Opens a connection in a slot already counted in `_open`."""
        try:
            return await psycopg.AsyncConnection.connect(**self._connect_kwargs, autocommit=True)
        except psycopg.Error as exc:
            # Unreachable or refused: may pass on retry. Bad settings (a malformed
            # address) will not.
            unreachable = isinstance(exc, psycopg.OperationalError)
            if unreachable:
                self._losses.lost()
            self._hand_over(None)
            raise _dbapi_error("connect", exc, unreachable) from exc
        except BaseException:
            self._hand_over(None)
            raise

    async def _ping(self, connection: psycopg.AsyncConnection[Any]) -> bool:
        try:
            await connection.execute("SELECT 1")
        except psycopg.Error:
            self._release(connection, keep=False, lost=True)
            return False
        except BaseException:
            self._release(connection, keep=False)
            raise
        return True

    async def _wait(self, deadline: float) -> _Handed:
        waiter: asyncio.Future[_Handed] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection (or a slot) just as this caller gave up: pass it on.
                self._hand_over(waiter.result())
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise PoolTimeoutError(
                    f"all {self._max_size} autocommit connections stayed busy "
                    f"for {self._timeout:g} s"
                ) from None
            raise

    def _release(
        self, connection: psycopg.AsyncConnection[Any], *, keep: bool, lost: bool = False
    ) -> None:
        """Back to the pool (`keep`), or closed; `lost`: the database dropped it."""
        if lost:
            self._losses.lost()
        if keep and not self._closed and not connection.broken and not connection.closed:
            self._hand_over(connection)
            return
        # close() of an async connection does not wait: it closes the socket now.
        connection.pgconn.finish()
        self._hand_over(None)

    def _hand_over(self, handed: _Handed) -> None:
        """A connection, or (None) the slot of one, to the first caller waiting; else the
        connection goes to the idle list, or the slot is freed."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(handed)
                return
        if handed is None:
            self._open -= 1
        elif self._closed:
            self._open -= 1
            handed.pgconn.finish()
        else:
            self._idle.append((handed, time.monotonic()))


def utc(value: datetime | None) -> datetime | None:
    """A timestamptz as the UtcDateTime column type gives it (psycopg gives the session's
    time zone)."""
    return value.astimezone(UTC) if value is not None else None
