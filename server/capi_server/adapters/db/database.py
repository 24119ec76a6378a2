"""Engine, sessions and migrations for PostgreSQL and SQLite."""

from __future__ import annotations

import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from capi_server.adapters.db.driver import AutocommitPool, RecentLosses

_PACKAGE_DIR = Path(__file__).resolve().parents[2]


_ON_COMMIT = "capi_on_commit"


def on_commit(session: AsyncSession, callback: Callable[[], None]) -> None:
    """Run `callback` once the session's transaction commits (never on rollback).

    For caches of facts that exist only once committed (a new dialog's ids).
    """
    session.sync_session.info.setdefault(_ON_COMMIT, []).append(callback)


@event.listens_for(Session, "after_commit")
def _run_on_commit(session: Session) -> None:
    for callback in session.info.pop(_ON_COMMIT, []):
        callback()


@event.listens_for(Session, "after_rollback")
def _drop_on_commit(session: Session) -> None:
    session.info.pop(_ON_COMMIT, None)


def migrations_dir() -> Path:
    """migrations/ of the source tree, or the copy packed into the wheel."""
    for candidate in (_PACKAGE_DIR.parent.parent / "migrations", _PACKAGE_DIR / "_migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("alembic migrations directory not found")


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine tuned per database.

    SQLite: every transaction starts with BEGIN IMMEDIATE, so concurrent writers queue on
    the database lock (busy_timeout) instead of failing when a reader upgrades to a writer.
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # hide_parameters: error texts must not carry bound values (phones, texts, tokens).
    engine = create_async_engine(
        url, pool_size=pool_size, max_overflow=pool_size, hide_parameters=True
    )
    _LOSSES[engine.sync_engine] = losses = RecentLosses()
    _ping_before_use(engine, losses)
    return engine


# A pooled connection unused this long is pinged before use (a database restart or an
# idle timeout may have closed it). Pinging every checkout (pool_pre_ping) would add a
# round trip to every batch, so connections in steady use are not pinged, except for a
# while after any lost connection: then every checkout is pinged, as pool_pre_ping would,
# because a database that dropped one connection may have dropped the others.
PING_AFTER_IDLE_SECONDS = 2.0
PING_ALL_AFTER_DISCONNECT_SECONDS = 30.0
# The hot one-statement batches' connections (driver.AutocommitPool), beside the engine's:
# its users are batchers (one ingest batch, one AnalyzeDialog read, one record per pixel
# at a time), each statement a few milliseconds.
AUTOCOMMIT_POOL_SIZE = 4

# The lost-connection clock of each engine made by create_engine, which the autocommit
# pool shares.
_LOSSES: weakref.WeakKeyDictionary[Engine, RecentLosses] = weakref.WeakKeyDictionary()


def _ping_before_use(engine: AsyncEngine, losses: RecentLosses) -> None:
    dialect = engine.dialect

    @event.listens_for(engine.sync_engine, "invalidate")
    def _on_invalidate(_dbapi_connection: Any, _record: Any, _exception: Any) -> None:
        # A connection found broken (by SQLAlchemy, a ping, or a query run on the driver).
        losses.lost()

    @event.listens_for(engine.sync_engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["capi_idle_since"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("capi_idle_since")
        now = time.monotonic()
        if idle_since is None:
            return  # just opened
        recently_lost = losses.within(PING_ALL_AFTER_DISCONNECT_SECONDS)
        if now - idle_since < PING_AFTER_IDLE_SECONDS and not recently_lost:
            return
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool invalidates this connection (which opens the window above) and
            # checks out, or opens, another.
            raise DisconnectionError("pooled connection failed its ping") from exc


def is_transient_db_error(exc: BaseException) -> bool:
    """A lost or refused database connection: the call may succeed if retried."""
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


# deadlock_detected, serialization_failure: PostgreSQL rolled the transaction back to
# break a lock cycle; running the same transaction again is the documented remedy.
_LOCK_CONFLICT_STATES = frozenset({"40P01", "40001"})


def is_lock_conflict(exc: BaseException) -> bool:
    """The transaction lost a deadlock (or serialization) race: run it again."""
    return isinstance(exc, DBAPIError) and (
        getattr(exc.orig, "sqlstate", None) in _LOCK_CONFLICT_STATES
    )


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


async def migrate(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database to `revision` on one connection of `engine`."""

    def _upgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


async def downgrade(engine: AsyncEngine, revision: str = "base") -> None:
    def _downgrade(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, revision)

    async with engine.begin() as connection:
        await connection.run_sync(_downgrade)


class Database:
    """The engine and its session factory; one per process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # Read-only batches need no transaction: no BEGIN and no ROLLBACK round trips.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # PostgreSQL: the hot one-statement batches run on connections of their own that
        # stay in autocommit mode, opened as the engine's are (its connect arguments).
        self.autocommit_pool = (
            AutocommitPool(
                engine.dialect.create_connect_args(engine.url)[1],
                max_size=AUTOCOMMIT_POOL_SIZE,
                ping_after_idle=PING_AFTER_IDLE_SECONDS,
                ping_all_after_loss=PING_ALL_AFTER_DISCONNECT_SECONDS,
                losses=_LOSSES.get(engine.sync_engine),
            )
            if self.dialect == "postgresql"
            else None
        )

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[AsyncConnection]:
        """A connection without a transaction: each statement commits on its own. For reads,
        and for writes made in one statement."""
        async with self._autocommit.connect() as connection:
            yield connection

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """A session whose transaction rolls back unless the caller commits."""
        async with self.sessions() as session:
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def dispose(self) -> None:
        if self.autocommit_pool is not None:
            await self.autocommit_pool.aclose()
        await self.engine.dispose()
