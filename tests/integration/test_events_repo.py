"""events_repo.insert_log_rows on both databases: ids in the order of the rows given,
whatever columns each row sets, and what is stored is what was given."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from capi_server.adapters.db import events_repo
from capi_server.adapters.db.database import Database, create_engine
from capi_server.adapters.db.orm import CapiEventLogRow
from tests.conftest import unique


async def test_log_rows_get_their_own_ids_in_order(database_url: str) -> None:
    db = Database(create_engine(database_url))
    marker = unique("log")
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    rows = []
    for i in range(40):
        row: dict[str, object] = {
            "level": 1 + i % 3,
            "event_name": f"{marker}-{i}",
            "status": "pending" if i % 2 else "skipped",
            "now": now + timedelta(seconds=i),
        }
        if i % 2:
            row["payload"] = {"event_name": "Lead", "n": i, "text": "привет"}
            row["next_attempt_at"] = now
        else:
            row["error_message"] = f"reason {i}"
        rows.append(row)
    ids: list[int] = []
    try:
        async with db.session() as session:
            ids = await events_repo.insert_log_rows(session, rows)
            await session.commit()
        assert len(set(ids)) == len(rows)
        async with db.session() as session:
            stored = {
                r.id: r
                for r in (
                    await session.execute(
                        select(CapiEventLogRow).where(CapiEventLogRow.id.in_(ids))
                    )
                ).scalars()
            }
        for i, log_id in enumerate(ids):
            got = stored[log_id]
            assert got.event_name == f"{marker}-{i}"
            assert got.level == 1 + i % 3
            assert got.created_at == got.updated_at == now + timedelta(seconds=i)
            assert got.attempts == 0
            if i % 2:
                assert got.status == "pending"
                assert got.payload == {"event_name": "Lead", "n": i, "text": "привет"}
                assert got.next_attempt_at == now
                assert got.error_message is None
            else:
                assert got.status == "skipped"
                assert got.payload is None
                assert got.error_message == f"reason {i}"
    finally:
        # The database is shared by the session's tests: due pending rows of no direction
        # would be picked up by another test's retry pass.
        async with db.session() as session:
            await session.execute(delete(CapiEventLogRow).where(CapiEventLogRow.id.in_(ids)))
            await session.commit()
        await db.dispose()
