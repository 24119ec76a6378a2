"""The batch statements use indexes on PostgreSQL, however small the tables are.

The planner takes any json_to_recordset for 100 rows. With that many contacts, a plain join
to leads was planned as a hash join over a sequential scan of leads while the table held up
to some 30,000 rows: make bench's 1,000-row database scanned all of leads on every
IngestMessage and SendConversion batch, and the counters' update read all of
dialog_analysis the same way. Checked with custom plans and with the generic plans that
prepared statements switch to (and keep until the next ANALYZE of the table), at 1,000
rows, make bench's seeded size. On a table of a few pages (~100 rows) a sequential scan is
the cheaper plan, and a generic plan made then lasts until autovacuum's first ANALYZE of
the table, which comes after ~50 changed rows.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from capi_server.adapters.db import dialogs_repo, driver, events_repo
from capi_server.adapters.db.database import create_engine, migrate
from tests.builders import whatsapp_direction
from tests.conftest import (
    Stubs,
    create_pg_database,
    drop_pg_database,
    make_settings,
    start_stubs,
    stop_stubs,
)

pytestmark = pytest.mark.postgres

LEADS = 1000
# The tables the batch statements must reach by index.
TABLES = ("leads", "dialog_analysis", "capi_events_log")


@pytest.fixture
async def stubs() -> AsyncIterator[Stubs]:
    """A database of its own: the statistics are of the rows this test puts there."""
    url = create_pg_database("capi_plans")
    try:
        engine = create_engine(url)
        await migrate(engine)
        await engine.dispose()
        s = await start_stubs(make_settings(url))
        try:
            yield s
        finally:
            await stop_stubs(s)
    finally:
        drop_pg_database(url)


async def _plans(stubs: Stubs) -> dict[str, str]:
    setup = await whatsapp_direction(stubs)
    direction_id = int(setup.direction_id)
    now = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    contacts = [
        {
            "direction_id": direction_id,
            "contact_key": key,
            "contact_phone": key,
            "instance_name": setup.instance_name,
            "dialog_phone": key,
        }
        for key in ("900000000017", "77015550100")  # one that exists, one new
    ]
    messages = [
        {
            "contact": ord_,
            "message_id": f"plan-{ord_}",
            "from_me": False,
            "text": "hi",
            "message_type": "text",
            "sent_at": now.isoformat(),
        }
        for ord_ in (1, 2)
    ]
    statements = {
        "ingest_batch": (
            dialogs_repo._PG_INGEST_BATCH_TEXT.text,
            {
                "contacts": json.dumps(contacts),
                "contacts_count": len(contacts),
                "messages": json.dumps(messages),
                "messages_count": len(messages),
                "now": now,
            },
        ),
        "ensure_dialogs": (
            dialogs_repo._PG_ENSURE_DIALOGS.text,
            {"rows": json.dumps(contacts), "rows_count": len(contacts), "now": now},
        ),
    }
    stored = [{**m, "dialog_id": m["contact"]} for m in messages]
    log_row = {
        "direction_id": direction_id,
        "dialog_id": 17,
        "lead_id": 17,
        "level": 1,
        "event_name": "Lead",
        "event_id": "plan-17",
        "status": "pending",
        "attempts": 0,
        "created_at": now.isoformat(),
        "updated_at": now.isoformat(),
    }
    statements["store_messages"] = (
        dialogs_repo._PG_STORE_MESSAGES.text,
        {"rows": json.dumps(stored), "rows_count": len(stored), "now": now, "leads": [17]},
    )
    psycopg_statements = {
        # SendConversion's batch runs these on psycopg directly.
        "ensure_dialogs_with_leads": (
            dialogs_repo._PG_ENSURE_DIALOGS_WITH_LEADS,
            statements["ensure_dialogs"][1],
        ),
        "claim_and_log": (
            events_repo._PG_CLAIM_AND_LOG,
            {
                "ids": [17, 18],
                "claims": json.dumps([{"id": 17, "e1": "plan-17"}, {"id": 18, "e1": "plan-18"}]),
                "rows": json.dumps([log_row]),
                "conditional": [True],
                "now": now,
            },
        ),
        # A Graph request's accepted events, recorded on the autocommit pool.
        "mark_sent": (
            events_repo._PG_MARK_SENT,
            {
                "dialog_ids": [17, 18],
                "status": "success",
                "response": json.dumps({"events_received": 2}),
                "now": now,
                "log_ids": [17, 18],
                "level1": [17, 18],
                "level2": [],
                "level3": [],
            },
        ),
    }
    plans: dict[str, str] = {}
    async with stubs.app.db.engine.connect() as conn:
        await conn.execute(
            text(
                "INSERT INTO leads (direction_id, contact_key, contact_phone, "
                "from_ad_without_click_id, created_at, updated_at) "
                "SELECT :d, '9' || lpad(g::text, 11, '0'), '9' || lpad(g::text, 11, '0'), "
                "false, :now, :now FROM generate_series(1, :n) AS g"
            ),
            {"d": direction_id, "now": now, "n": LEADS},
        )
        await conn.execute(
            text(
                "INSERT INTO dialog_analysis (lead_id, direction_id, instance_name, "
                "contact_phone, capi_interest_sent, capi_qualified_sent, capi_scheduled_sent, "
                "client_message_count, analyzed_client_message_count, is_interested, "
                "is_qualified, is_scheduled, held_levels, created_at, updated_at) "
                "SELECT id, direction_id, :i, contact_phone, false, false, false, 0, 0, "
                "false, false, false, CAST('{}' AS jsonb), :now, :now FROM leads"
            ),
            {"i": setup.instance_name, "now": now},
        )
        await conn.execute(
            text(
                "INSERT INTO capi_events_log (direction_id, dialog_id, lead_id, level, "
                "event_name, event_id, status, attempts, created_at, updated_at) "
                "SELECT direction_id, id, lead_id, 1, 'Lead', 'plan-' || id, 'success', 1, "
                ":now, :now FROM dialog_analysis"
            ),
            {"now": now},
        )
        await conn.commit()
        for table in TABLES:
            await conn.execute(text(f"ANALYZE {table}"))
        # Custom plans: the values known, as for a statement's first executions.
        for name, (sql, params) in statements.items():
            rows = (await conn.execute(text("EXPLAIN " + sql), params)).all()
            plans[f"{name} (custom)"] = "\n".join(str(row[0]) for row in rows)
        for name, (sql, params) in psycopg_statements.items():
            lines = await driver.fetch_all(conn, "EXPLAIN " + sql, params)
            plans[f"{name} (custom)"] = "\n".join(str(line[0]) for line in lines)
        # Generic plans, which a statement psycopg has prepared (its 5th execution on a
        # connection) switches to and keeps: planned for any value, with the statistics of
        # that moment. A parameterised EXPLAIN is planned with its values whatever
        # plan_cache_mode says, so the statement is PREPAREd and EXECUTEd here.
        await conn.execute(text("SET plan_cache_mode = force_generic_plan"))
        every = {
            **{name: driver.psycopg_text(text(sql)) for name, (sql, _) in statements.items()},
            **{name: sql for name, (sql, _) in psycopg_statements.items()},
        }
        for name, sql in every.items():
            plans[f"{name} (generic)"] = await _generic_plan(conn, name, sql)
        await conn.rollback()
    return plans


async def _generic_plan(conn: AsyncConnection, name: str, sql: str) -> str:
    """The generic plan of a psycopg-style statement (`%(name)s` placeholders)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    numbered = re.sub(r"%\((\w+)\)s", number, sql)
    await driver.fetch_all(conn, f"PREPARE plan_{name} AS {numbered}", {})
    # The parameters' types come from the statement's own CASTs; the values do not matter.
    nulls = ", ".join("NULL" for _ in names)
    lines = await driver.fetch_all(conn, f"EXPLAIN EXECUTE plan_{name}({nulls})", {})
    return "\n".join(str(line[0]) for line in lines)


async def test_batch_statements_use_indexes_in_a_small_table(stubs: Stubs) -> None:
    plans = await _plans(stubs)

    assert len(plans) == 12
    for name, plan in plans.items():
        for table in TABLES:
            assert f"Seq Scan on {table}" not in plan, f"{name}:\n{plan}"
        assert _unbounded_index_scans(plan) == [], f"{name}:\n{plan}"
        if name.startswith(("ingest_batch", "ensure_dialogs")):
            assert "uq_leads_direction_id_contact_key" in plan, f"{name}:\n{plan}"


def _unbounded_index_scans(plan: str) -> list[str]:
    """Index scans of TABLES without an Index Cond: a whole table read through
    its index is as much a full scan as a Seq Scan."""
    lines = plan.splitlines()
    unbounded = []
    for i, line in enumerate(lines):
        scan = re.search(r"Index (Only )?Scan (Backward )?using \w+ on (\w+)", line)
        if scan is None or scan.group(3) not in TABLES:
            continue
        depth = len(line) - len(line.lstrip())
        details = []
        for detail in lines[i + 1 :]:
            if len(detail) - len(detail.lstrip()) <= depth or "->" in detail:
                break
            details.append(detail.strip())
        if not any(d.startswith("Index Cond:") for d in details):
            unbounded.append(line.strip())
    return unbounded
