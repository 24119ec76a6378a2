"""The benchmark's PostgreSQL database: create, seed in bulk, explain the hot queries, drop.

Seeding writes rows straight in SQL (`INSERT ... SELECT generate_series`): a million rows
through the API would take longer than the benchmark itself. Seeded contact keys start
with "9" and 12 digits, so they never collide with the benchmark's own "7701..." phones.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from capi_server.adapters.db import dialogs_repo, events_repo

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def admin_url() -> str:
    return os.environ.get("CAPI_TEST_DATABASE_URL") or DEFAULT_ADMIN_URL


def libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string for psycopg."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def create_database(prefix: str = "capi_bench") -> str:
    """A new empty database on the admin URL's server; its SQLAlchemy URL.

    Raises psycopg.OperationalError when the server is unreachable.
    """
    admin = admin_url()
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(admin), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(admin).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    name = make_url(url).database
    with psycopg.connect(libpq(admin_url()), autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def table_counts(url: str) -> dict[str, int]:
    tables = ("leads", "dialog_analysis", "capi_events_log", "dialog_messages")
    counts: dict[str, int] = {}
    with psycopg.connect(libpq(url)) as conn:
        for table in tables:
            row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


def execute(url: str, sql: str, params: dict[str, Any] | None = None) -> None:
    with psycopg.connect(libpq(url), autocommit=True) as conn:
        conn.execute(sql, params)


_SEED_LEADS = """
INSERT INTO leads (direction_id, contact_key, contact_phone, from_ad_without_click_id,
                   created_at, updated_at)
SELECT %(direction_id)s, '9' || lpad(g::text, 11, '0'), '9' || lpad(g::text, 11, '0'), false,
       now() - interval '2 days', now() - interval '2 days'
FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g
"""

_SEED_DIALOGS = """
INSERT INTO dialog_analysis (
    lead_id, direction_id, instance_name, contact_phone,
    capi_interest_sent, capi_interest_sent_at, capi_interest_event_id,
    capi_qualified_sent, capi_scheduled_sent, client_message_count, last_message_at,
    analyzed_client_message_count, is_interested, is_qualified, is_scheduled, held_levels,
    created_at, updated_at)
SELECT l.id, l.direction_id, %(instance_name)s, l.contact_phone,
       true, l.created_at, md5('seed' || l.id::text),
       false, false, 2, l.created_at, 2, true, false, false, '{}'::jsonb,
       l.created_at, l.created_at
FROM leads AS l
WHERE l.id > %(after_lead_id)s
"""

# 1% pending (due in 30 days: in the retry index, never due), 2% error, the rest success.
_SEED_EVENTS = """
INSERT INTO capi_events_log (
    direction_id, dialog_id, lead_id, level, event_name, event_id, event_time, pixel_id,
    source, status, payload, facebook_response, attempts, next_attempt_at,
    created_at, updated_at)
SELECT d.direction_id, d.id, d.lead_id, 1, 'Lead', d.capi_interest_event_id, d.last_message_at,
       %(pixel_id)s, 'whatsapp',
       CASE WHEN d.id %% 100 = 0 THEN 'pending' WHEN d.id %% 50 = 1 THEN 'error'
            ELSE 'success' END,
       '{"event_name": "Lead", "action_source": "business_messaging"}'::jsonb,
       '{"events_received": 1, "fbtrace_id": "seed"}'::jsonb,
       1,
       CASE WHEN d.id %% 100 = 0 THEN now() + interval '30 days' END,
       d.created_at, d.created_at
FROM dialog_analysis AS d
WHERE d.id > %(after_dialog_id)s
"""


def seed_rows(
    url: str, *, direction_id: int, instance_name: str, pixel_id: str, target_rows: int
) -> int:
    """Add seeded leads, dialogs and event rows until `leads` holds `target_rows` rows.

    Returns how many rows were added to each table. VACUUM ANALYZE follows, so plans and
    index-only scans see the new size.
    """
    with psycopg.connect(libpq(url), autocommit=True) as conn:

        def scalar(sql: str) -> int:
            row = conn.execute(sql).fetchone()
            return int(row[0]) if row and row[0] is not None else 0

        missing = target_rows - scalar("SELECT count(*) FROM leads")
        if missing <= 0:
            return 0
        first = scalar("SELECT count(*) FROM leads WHERE contact_key LIKE '9%%'") + 1
        last_lead = scalar("SELECT max(id) FROM leads")
        last_dialog = scalar("SELECT max(id) FROM dialog_analysis")
        with conn.transaction():
            conn.execute(
                _SEED_LEADS,
                {"direction_id": direction_id, "first": first, "last": first + missing - 1},
            )
            conn.execute(
                _SEED_DIALOGS, {"instance_name": instance_name, "after_lead_id": last_lead}
            )
            conn.execute(_SEED_EVENTS, {"pixel_id": pixel_id, "after_dialog_id": last_dialog})
        for table in ("leads", "dialog_analysis", "capi_events_log", "dialog_messages"):
            conn.execute(f"VACUUM ANALYZE {table}")
    return missing


@dataclass(frozen=True, slots=True)
class HotQuery:
    title: str
    where_used: str
    sql: str
    params: dict[str, Any]
    mutates: bool = False


_PSYCOPG_DIALECT = create_engine("postgresql+psycopg://").dialect  # never connects


def _psycopg_sql(statement: Any) -> str:
    """A repository's statement as psycopg runs it (`%(name)s` placeholders)."""
    return str(statement.compile(dialect=_PSYCOPG_DIALECT))


def hot_queries(
    *, direction_id: int, contact_key: str, lead_id: int, dialog_id: int, middle_event_id: int
) -> list[HotQuery]:
    """The statements the hot paths issue on PostgreSQL: the repositories' own statement
    texts where they are constant, the rendered form of the one ORM query."""
    now = datetime.now(UTC)
    new_key = "77019999999"
    contacts = [
        {
            "direction_id": direction_id,
            "contact_key": key,
            "contact_phone": key,
            "instance_name": "bench-wa",
            "dialog_phone": key,
        }
        for key in (contact_key, new_key)
    ]
    message = {
        "dialog_id": dialog_id,
        "message_id": "bench-explain",
        "from_me": False,
        "text": "hello",
        "message_type": "text",
        "sent_at": now.isoformat(),
    }
    log_row = {
        "direction_id": direction_id,
        "dialog_id": dialog_id,
        "lead_id": lead_id,
        "level": 2,
        "event_name": "CompleteRegistration",
        "event_id": "bench-explain",
        "status": "pending",
        "attempts": 0,
        "created_at": now.isoformat(),
        "updated_at": now.isoformat(),
    }
    contact_messages = [
        {**{k: v for k, v in message.items() if k != "dialog_id"}, "contact": i, "message_id": m}
        for i, m in ((1, "bench-explain-batch"), (2, "bench-explain-new"))
    ]
    return [
        HotQuery(
            "IngestMessage batch in one statement (one existing contact, one new)",
            "dialogs_repo.ingest_batch (IngestMessage batch without click ids, autocommit)",
            dialogs_repo._PG_INGEST_BATCH,
            {
                "contacts": json.dumps(contacts),
                "contacts_count": len(contacts),
                "messages": json.dumps(contact_messages),
                "messages_count": len(contact_messages),
                "now": now,
            },
            mutates=True,
        ),
        HotQuery(
            "Find or create the batch's leads and dialogs (one existing contact, one new)",
            "dialogs_repo.ensure_dialogs (IngestMessage and SendConversion batches)",
            _psycopg_sql(dialogs_repo._PG_ENSURE_DIALOGS),
            {"rows": json.dumps(contacts), "rows_count": len(contacts), "now": now},
            mutates=True,
        ),
        HotQuery(
            "Store messages, bump counters, read click ids",
            "dialogs_repo.store_messages (IngestMessage batch with click ids)",
            _psycopg_sql(dialogs_repo._PG_STORE_MESSAGES),
            {"rows": json.dumps([message]), "rows_count": 1, "now": now, "leads": [lead_id]},
            mutates=True,
        ),
        HotQuery(
            "Find dialogs by contact (no create)",
            "dialogs_repo.find_dialogs (AnalyzeDialog / GetDialogStatus by phone)",
            _psycopg_sql(dialogs_repo._PG_FIND_DIALOGS),
            {"direction": direction_id, "contacts": [contact_key]},
        ),
        HotQuery(
            "Dialogs' send columns with their leads' identifiers (plain rows)",
            "dialogs_repo.dialogs_with_leads (SendConversion claim batch)",
            _psycopg_sql(dialogs_repo._PG_SENDS_AND_IDENTITIES),
            {"ids": [dialog_id]},
        ),
        HotQuery(
            "Lock the batch's dialogs, claim their levels, write the log rows (one statement)",
            "events_repo.claim_and_log (SendConversion claim batch)",
            events_repo._PG_CLAIM_AND_LOG,
            {
                "ids": [dialog_id],
                "claims": json.dumps([{"id": dialog_id, "e2": "bench-explain"}]),
                "rows": json.dumps([log_row]),
                "conditional": [True],
                "now": now,
            },
            mutates=True,
        ),
        HotQuery(
            "Insert log rows",
            "events_repo.insert_log_rows (skipped rows of a batch without claims; CRM)",
            _psycopg_sql(events_repo._PG_INSERT_LOG_ROWS),
            {"rows": json.dumps([log_row])},
            mutates=True,
        ),
        HotQuery(
            "Record a Graph request's accepted events",
            "events_repo.mark_success (after each Graph request)",
            events_repo._PG_MARK_SENT,
            {
                "status": "success",
                "response": "{}",
                "now": now,
                "log_ids": [middle_event_id],
                "dialog_ids": [dialog_id],
                "level1": [],
                "level2": [dialog_id],
                "level3": [],
            },
            mutates=True,
        ),
        HotQuery(
            "Dialog states",
            "dialogs_repo.dialog_states (AnalyzeDialog read batch)",
            dialogs_repo._PG_DIALOG_STATES,
            {"ids": [dialog_id]},
        ),
        HotQuery(
            "Latest log row of (dialog, level)",
            "events_repo.latest_log_row (a level claimed before, not known sent)",
            "SELECT * FROM capi_events_log WHERE capi_events_log.dialog_id = %(i)s "
            "AND capi_events_log.level = 1 AND capi_events_log.status != 'skipped' "
            "ORDER BY capi_events_log.id DESC LIMIT 1",
            {"i": dialog_id},
        ),
        HotQuery(
            "Retry queue: due pending rows",
            "events_repo.take_due_events (RetryWorker, every poll)",
            "SELECT * FROM capi_events_log WHERE capi_events_log.status = 'pending' "
            "AND capi_events_log.next_attempt_at <= now() "
            "AND (capi_events_log.locked_until IS NULL OR capi_events_log.locked_until < now()) "
            "ORDER BY capi_events_log.next_attempt_at LIMIT 500 FOR UPDATE SKIP LOCKED",
            {},
            mutates=True,
        ),
        HotQuery(
            "ListEvents first page",
            "events_repo.list_log_rows",
            "SELECT * FROM capi_events_log WHERE capi_events_log.direction_id = %(d)s "
            "ORDER BY capi_events_log.id DESC LIMIT 51",
            {"d": direction_id},
        ),
        HotQuery(
            "ListEvents deep page (keyset)",
            "events_repo.list_log_rows with a page token",
            "SELECT * FROM capi_events_log WHERE capi_events_log.id < %(b)s "
            "AND capi_events_log.direction_id = %(d)s "
            "ORDER BY capi_events_log.id DESC LIMIT 51",
            {"d": direction_id, "b": middle_event_id},
        ),
        HotQuery(
            "ListEvents filtered by status=error",
            "events_repo.list_log_rows (status filter)",
            "SELECT * FROM capi_events_log WHERE capi_events_log.direction_id = %(d)s "
            "AND capi_events_log.status = 'error' ORDER BY capi_events_log.id DESC LIMIT 51",
            {"d": direction_id},
        ),
    ]


def explain(url: str, queries: list[HotQuery]) -> list[tuple[HotQuery, str]]:
    """EXPLAIN (ANALYZE, BUFFERS) of each query; writes run in a rolled-back transaction."""
    plans: list[tuple[HotQuery, str]] = []
    with psycopg.connect(libpq(url)) as conn:
        for query in queries:
            try:
                rows = conn.execute(
                    "EXPLAIN (ANALYZE, BUFFERS) " + query.sql,
                    query.params,
                ).fetchall()
                plans.append((query, "\n".join(str(r[0]) for r in rows)))
            except psycopg.Error as exc:
                plans.append((query, f"(EXPLAIN failed: {exc})"))
            conn.rollback()
    return plans
