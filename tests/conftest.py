"""Shared fixtures: a migrated database per backend, the in-process server, stubs.

Every test that takes `database_url` (or anything built on it) runs on SQLite and on
PostgreSQL. PostgreSQL comes from CAPI_TEST_DATABASE_URL (default: the machine's
postgres on 127.0.0.1:5432, database `test`); each run creates and drops its own
database, so runs never collide. When PostgreSQL is unreachable those tests FAIL with
the reason: they never skip silently.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from sqlalchemy.engine import make_url

from capi.v1 import (
    capi_sender_service_pb2_grpc,
    qualification_service_pb2_grpc,
    settings_service_pb2_grpc,
)
from capi_server.adapters.db.database import Database, create_engine, migrate
from capi_server.bootstrap import App, build_app
from capi_server.config import Settings
from capi_server.rpc.app import RunningServer, start_server

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = ["sqlite", "postgresql"]


def _pg_admin_url() -> str:
    return os.environ.get("CAPI_TEST_DATABASE_URL") or DEFAULT_PG_URL


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_pg_database(prefix: str = "capi_test") -> str:
    """A new empty database on the test server; returns its SQLAlchemy URL."""
    admin = _pg_admin_url()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg.connect(_libpq(admin), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is unreachable at {make_url(admin).render_as_string()}: {exc}. "
            "Start it or set CAPI_TEST_DATABASE_URL.",
            pytrace=False,
        )
    return make_url(admin).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(_libpq(_pg_admin_url()), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrate(url: str) -> None:
    async def run() -> None:
        db = Database(create_engine(url))
        await migrate(db.engine)
        await db.dispose()

    asyncio.run(run())


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("db") / "capi.db"
    url = f"sqlite+aiosqlite:///{path}"
    _migrate(url)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    url = create_pg_database()
    try:
        _migrate(url)
        yield url
    finally:
        drop_pg_database(url)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """A migrated database URL, once per backend. Data is shared within a run."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


def make_settings(database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "insecure_dev": True,
        "listen": "127.0.0.1:0",
        "retry_worker_enabled": False,
        "crm_reconcile_enabled": False,
        "meta_graph_url": "http://127.0.0.1:9",
        "settings_cache_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Stubs:
    channel: grpc.aio.Channel
    settings: settings_service_pb2_grpc.SettingsServiceAsyncStub
    sender: capi_sender_service_pb2_grpc.CapiSenderServiceAsyncStub
    qualification: qualification_service_pb2_grpc.QualificationServiceAsyncStub
    app: App
    running: RunningServer

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"


async def start_stubs(settings: Settings) -> Stubs:
    app = await build_app(settings, run_migrations=False)
    running = await start_server(app, "127.0.0.1:0")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Stubs(
        channel=channel,
        settings=settings_service_pb2_grpc.SettingsServiceStub(channel),
        sender=capi_sender_service_pb2_grpc.CapiSenderServiceStub(channel),
        qualification=qualification_service_pb2_grpc.QualificationServiceStub(channel),
        app=app,
        running=running,
    )


async def stop_stubs(stubs: Stubs) -> None:
    await stubs.channel.close()
    await stubs.running.stop(None)
    await stubs.app.aclose()


@pytest.fixture
async def stubs(database_url: str) -> AsyncIterator[Stubs]:
    """The real server in-process on a random port, on each backend."""
    s = await start_stubs(make_settings(database_url))
    try:
        yield s
    finally:
        await stop_stubs(s)


def unique(prefix: str = "x") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


REPO_ROOT = Path(__file__).resolve().parents[1]
