"""Alembic revisions: up, down, up on both databases; they agree with the models."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from capi_server.adapters.db.database import Database, create_engine, downgrade, migrate
from capi_server.adapters.db.orm import Base
from tests.conftest import create_pg_database, drop_pg_database

SEED_QUERY = """
SELECT id, contact_phone, capi_interest_sent, capi_qualified_sent, capi_scheduled_sent
FROM dialog_analysis
WHERE capi_interest_sent = true
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path}/m.db"
        return
    url = create_pg_database("capi_migr")
    try:
        yield url
    finally:
        drop_pg_database(url)


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": False})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names()) - {"alembic_version"}


async def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    db = Database(create_engine(empty_url))
    try:
        await migrate(db.engine)
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_tables) == set(Base.metadata.tables)
            assert await conn.run_sync(_diff) == []
        await downgrade(db.engine, "base")
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_tables) == set()
        await migrate(db.engine)
        async with db.engine.connect() as conn:
            rows = (await conn.execute(text(SEED_QUERY))).all()
            assert rows == []
            columns = {
                c["name"]
                for c in await conn.run_sync(
                    lambda sync: inspect(sync).get_columns("account_directions")
                )
            }
        assert {
            "capi_enabled",
            "capi_source",
            "capi_crm_type",
            "capi_interest_fields",
            "capi_qualified_fields",
            "capi_scheduled_fields",
        } <= columns
    finally:
        await db.dispose()


async def test_jsonb_on_postgres_json_on_sqlite(database_url: str) -> None:
    db = Database(create_engine(database_url))
    try:
        async with db.engine.connect() as conn:
            if db.dialect == "postgresql":
                kind = (
                    await conn.execute(
                        text(
                            "SELECT data_type FROM information_schema.columns WHERE "
                            "table_name='account_directions' AND column_name='capi_interest_fields'"
                        )
                    )
                ).scalar_one()
                assert kind == "jsonb"
            else:
                sql = (
                    await conn.execute(
                        text("SELECT sql FROM sqlite_master WHERE name='account_directions'")
                    )
                ).scalar_one()
                assert "capi_interest_fields JSON" in sql
    finally:
        await db.dispose()
