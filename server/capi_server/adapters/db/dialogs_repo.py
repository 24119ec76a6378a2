"""Leads and dialogs: find or create them without read-then-write races."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Table, any_, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from capi_server.adapters.db import driver
from capi_server.adapters.db.orm import (
    AdAccountRow,
    DialogAnalysisRow,
    DialogMessageRow,
    DirectionRow,
    LeadRow,
    UserAccountRow,
    utcnow,
)
from capi_server.adapters.db.secrets import TokenCipher, UndecryptableSecret
from capi_server.adapters.db.types import json_rows
from capi_server.domain.errors import FailedPrecondition, NotFound


@dataclass(frozen=True, slots=True)
class DialogKeys:
    dialog_id: int
    lead_id: int
    direction_id: int


async def direction_by_instance(session: AsyncSession, instance_name: str) -> DirectionRow:
    row = (
        await session.execute(
            select(DirectionRow).where(DirectionRow.instance_name == instance_name)
        )
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(
            f"no direction has instance_name {instance_name!r}",
            reason="INSTANCE_NOT_FOUND",
            metadata={"instance_name": instance_name},
        )
    return row


async def direction_by_id(session: AsyncSession, direction_id: int) -> DirectionRow:
    row = await session.get(DirectionRow, direction_id)
    if row is None:
        raise NotFound(
            f"direction {direction_id} not found",
            reason="DIRECTION_NOT_FOUND",
            metadata={"direction_id": str(direction_id)},
        )
    return row


async def default_region(session: AsyncSession, user_account_id: int) -> str | None:
    return (
        await session.execute(
            select(UserAccountRow.default_region).where(UserAccountRow.id == user_account_id)
        )
    ).scalar_one_or_none()


ContactKey = tuple[int, str]
"""(direction_id, contact_key): what names a lead and its dialog."""


@dataclass(frozen=True, slots=True)
class NewContact:
    """What a lead and its dialog are created with when the contact is new."""

    direction_id: int
    instance_name: str | None
    contact_key: str
    contact_phone: str | None

    @property
    def key(self) -> ContactKey:
        return (self.direction_id, self.contact_key)


_LEADS: Table = LeadRow.__table__  # type: ignore[assignment]
_DIALOGS: Table = DialogAnalysisRow.__table__  # type: ignore[assignment]
_MESSAGES: Table = DialogMessageRow.__table__  # type: ignore[assignment]

# SQLite: multi-row INSERT ... ON CONFLICT ... RETURNING, built once (building one and its
# `excluded` alias costs more Python than executing it).
_sqlite_leads = sqlite_insert(_LEADS)
_sqlite_dialogs = sqlite_insert(_DIALOGS)
_SQLITE_STATEMENTS: dict[str, Any] = {
    "upsert_leads": _sqlite_leads.on_conflict_do_update(
        index_elements=["direction_id", "contact_key"],
        set_={"updated_at": _sqlite_leads.excluded.updated_at},
    ).returning(_LEADS.c.id, _LEADS.c.direction_id, _LEADS.c.contact_key),
    "upsert_dialogs": _sqlite_dialogs.on_conflict_do_update(
        index_elements=["lead_id"], set_={"updated_at": _sqlite_dialogs.excluded.updated_at}
    ).returning(_DIALOGS.c.id, _DIALOGS.c.lead_id),
    "insert_messages": sqlite_insert(_MESSAGES)
    .on_conflict_do_nothing(index_elements=["dialog_id", "message_id"])
    .returning(_MESSAGES.c.dialog_id, _MESSAGES.c.message_id),
}

# Fragments of the PostgreSQL batch statements below. The contacts of a batch as rows, in
# the order given (`ord`), from one JSON parameter:
_CONTACTS_JSON = (
    "SELECT * FROM ROWS FROM (json_to_recordset(CAST(:{param} AS json)) "
    "AS (direction_id bigint, contact_key text, contact_phone text, instance_name text, "
    "dialog_phone text)) WITH ORDINALITY "
    "AS t(direction_id, contact_key, contact_phone, instance_name, dialog_phone, ord) "
    # Not to cut anything (it is the number of rows given) but to tell the planner how many
    # rows come: it takes any json_to_recordset for 100, and with 100 contacts (and the
    # dialogs, messages and counters that follow from them) a sequential scan of a table
    # of a few thousand rows looks cheaper than the index lookups.
    "LIMIT :{param}_count"
)


def _found_by_contact(contacts: str, columns: str) -> str:
    """FROM clause: each contact of CTE `contacts` (as `i`) with its lead `l` and dialog
    `d`, `columns` of them as `f`; contacts without both are left out.

    One index lookup per contact, whatever the tables' statistics say: the planner takes
    json_to_recordset for 100 rows (batches carry ~10-30), and as a plain join it chose a
    hash join over a sequential scan of leads on every batch until leads held some 30,000
    rows (make bench, scale step: 1,300-2,000 scans of the whole table in a minute). A
    LATERAL subquery with LIMIT is always run once per outer row; the LIMIT changes no
    result (one lead per (direction_id, contact_key), one dialog per lead)."""
    return (
        f"FROM {contacts} AS i CROSS JOIN LATERAL (SELECT {columns} FROM leads AS l "
        "JOIN dialog_analysis AS d ON d.lead_id = l.id "
        "WHERE l.direction_id = i.direction_id AND l.contact_key = i.contact_key LIMIT 1) AS f"
    )


# The new client messages (CTE `added`: id, n, last_at) counted into their dialogs, locked
# in id order (the order every batch locks dialogs in); the UPDATE's ids are the array of
# every `locked` row, read whole before it runs, so each row it changes was locked first.
# `id = ANY(ARRAY(...))`, not `id IN (SELECT ...)`: a prepared statement keeps the generic
# plan it made on a table of ~1,000 rows, and for the IN form that plan scanned the whole
# table (a hash semi join), on every batch, until the next ANALYZE replanned it (make
# bench: 4-9 ms per batch once the table held 44,000 rows).
_COUNT_ADDED = (
    "locked AS MATERIALIZED (SELECT id FROM dialog_analysis "
    "WHERE id = ANY(ARRAY(SELECT id FROM added)) ORDER BY id FOR NO KEY UPDATE), "
    "counted AS (UPDATE dialog_analysis AS d SET "
    "client_message_count = d.client_message_count + a.n, last_message_at = a.last_at, "
    "updated_at = :now FROM added AS a "
    "WHERE d.id = a.id AND d.id = ANY(ARRAY(SELECT id FROM locked))) "
)

# PostgreSQL: store_messages in one statement whatever the number of rows: the rows as one
# JSON document (json_to_recordset; a multi-row VALUES list is new text for every batch
# size); the dialogs of new client messages locked in id order (the order every batch locks
# dialogs in), then their counters updated (`_COUNT_ADDED`: every row the UPDATE changes
# is one the `locked` CTE had locked before).
_PG_STORE_MESSAGES = text(
    "WITH stored AS (INSERT INTO dialog_messages (dialog_id, message_id, from_me, text, "
    "message_type, sent_at, created_at) "
    "SELECT dialog_id, message_id, from_me, text, message_type, sent_at, :now "
    "FROM json_to_recordset(CAST(:rows AS json)) AS t(dialog_id bigint, message_id text, "
    "from_me boolean, text text, message_type text, sent_at timestamptz) "
    "LIMIT :rows_count "  # the planner's row count (see _CONTACTS_JSON), not a cut
    "ON CONFLICT (dialog_id, message_id) DO NOTHING "
    "RETURNING dialog_id, message_id, from_me, sent_at), "
    "added AS (SELECT dialog_id AS id, count(*) AS n, max(sent_at) AS last_at FROM stored "
    "WHERE NOT from_me GROUP BY dialog_id), "
    f"{_COUNT_ADDED}"
    "SELECT dialog_id, message_id, NULL::bigint, NULL::text FROM stored UNION ALL "
    "SELECT NULL, NULL, id, ctwa_clid FROM leads "
    "WHERE id = ANY(CAST(:leads AS bigint[])) AND ctwa_clid IS NOT NULL"
)


@dataclass(slots=True)
class DialogSends:
    """A dialog's send columns as plain values: what SendConversion plans from."""

    id: int
    lead_id: int
    direction_id: int
    capi_interest_event_id: str | None
    capi_qualified_event_id: str | None
    capi_scheduled_event_id: str | None
    capi_interest_sent: bool
    capi_qualified_sent: bool
    capi_scheduled_sent: bool
    capi_interest_sent_at: datetime | None
    capi_qualified_sent_at: datetime | None
    capi_scheduled_sent_at: datetime | None


@dataclass(slots=True)
class LeadIdentity:
    """What identifies a lead to Meta (hashed into an event's user_data)."""

    id: int
    contact_phone: str | None
    email: str | None
    ctwa_clid: str | None


_SENDS_WIDTH = len(DialogSends.__dataclass_fields__)

# The names a lead's identifiers are read as (a dialog has a contact_phone too); its id is
# the dialog's lead_id.
_LEAD_IDENTITY_COLUMNS = tuple(
    f"lead_{name}" for name in LeadIdentity.__dataclass_fields__ if name != "id"
)


def _ensure_dialogs_sql(dialog_columns: Sequence[str], lead_columns: Sequence[str]) -> str:
    """ensure_dialogs in one statement, returning `dialog_columns` of each dialog,
    `lead_columns` of its lead (`lead_<column>`), then direction_id and contact_key.

    The dialogs that exist are read (`found`), the others inserted, leads first; the
    dialogs' INSERT reads the leads' RETURNING rows. ON CONFLICT returns a row another
    transaction inserted since the statement began, as it is now. Rows go in in the order
    given (WITH ORDINALITY), so that concurrent batches lock them alike."""
    found_leads = "".join(f", l.{c.removeprefix('lead_')} AS {c}" for c in lead_columns)
    returned_leads = "".join(f", {c.removeprefix('lead_')} AS {c}" for c in lead_columns)
    dialogs = ", ".join(dialog_columns)
    return (
        f"WITH input AS ({_CONTACTS_JSON.format(param='rows')}), "
        "found AS (SELECT f.* "
        + _found_by_contact(
            "input",
            f"{', '.join(f'd.{c}' for c in dialog_columns)}{found_leads}, "
            "l.direction_id AS lead_direction_id, l.contact_key",
        )
        + "), "
        "missing AS (SELECT * FROM input AS i WHERE NOT EXISTS (SELECT 1 FROM found AS f "
        "WHERE f.lead_direction_id = i.direction_id AND f.contact_key = i.contact_key)), "
        "l AS (INSERT INTO leads (direction_id, contact_key, contact_phone, "
        "from_ad_without_click_id, created_at, updated_at) "
        "SELECT direction_id, contact_key, contact_phone, false, :now, :now FROM missing "
        "ORDER BY ord "
        "ON CONFLICT (direction_id, contact_key) DO UPDATE SET updated_at = excluded.updated_at "
        f"RETURNING id, direction_id, contact_key{returned_leads}), "
        "d AS (INSERT INTO dialog_analysis (lead_id, direction_id, instance_name, "
        "contact_phone, capi_interest_sent, capi_qualified_sent, capi_scheduled_sent, "
        "client_message_count, analyzed_client_message_count, is_interested, is_qualified, "
        "is_scheduled, held_levels, created_at, updated_at) "
        "SELECT l.id, i.direction_id, i.instance_name, i.dialog_phone, false, false, false, "
        "0, 0, false, false, false, CAST('{}' AS jsonb), :now, :now "
        "FROM l JOIN missing AS i ON i.direction_id = l.direction_id "
        "AND i.contact_key = l.contact_key ORDER BY i.ord "
        "ON CONFLICT (lead_id) DO UPDATE SET updated_at = excluded.updated_at "
        f"RETURNING {dialogs}) "
        f"SELECT {dialogs}{''.join(f', {c}' for c in lead_columns)}, lead_direction_id, "
        "contact_key FROM found UNION ALL "
        f"SELECT {', '.join(f'd.{c}' for c in dialog_columns)}"
        f"{''.join(f', l.{c}' for c in lead_columns)}, l.direction_id, l.contact_key "
        "FROM d JOIN l ON l.id = d.lead_id"
    )


# PostgreSQL: ensure_dialogs (ids) and ensure_dialogs_with_leads (the rows SendConversion
# plans from) in one statement each.
_PG_ENSURE_DIALOGS = text(_ensure_dialogs_sql(("id", "lead_id"), ()))
# Run on psycopg directly (adapters/db/driver.py): one per SendConversion batch.
_PG_ENSURE_DIALOGS_WITH_LEADS = driver.psycopg_text(
    text(_ensure_dialogs_sql(tuple(DialogSends.__dataclass_fields__), _LEAD_IDENTITY_COLUMNS))
)
_SENT_AT_INDEXES = tuple(
    i for i, name in enumerate(DialogSends.__dataclass_fields__) if name.endswith("_sent_at")
)


# PostgreSQL: an IngestMessage batch in one statement, which commits on its own (an
# autocommit connection: no BEGIN and COMMIT round trips): ensure_dialogs and
# store_messages merged. A statement cannot update a row it inserted, so a dialog created
# here gets its counters in its INSERT (every message of a new dialog is new: no other
# transaction can see the dialog yet); the counters of dialogs that existed are updated
# from the messages stored, locked in id order as store_messages does. Leads and dialogs
# that another transaction inserted meanwhile conflict (DO NOTHING): those contacts are
# not in the answer, and the caller stores their messages with the two-statement path.
# The messages go in after every lead and dialog (the sort reads `resolved` whole first),
# in (dialog, message) order, so that concurrent statements take their locks alike.
_PG_INGEST_BATCH_TEXT = text(
    f"WITH contacts AS ({_CONTACTS_JSON.format(param='contacts')}), "
    "msgs AS (SELECT * FROM json_to_recordset(CAST(:messages AS json)) AS m(contact bigint, "
    "message_id text, from_me boolean, text text, message_type text, sent_at timestamptz) "
    "LIMIT :messages_count), "
    "found AS (SELECT i.ord, f.id, f.lead_id, f.ctwa_clid "
    f"{_found_by_contact('contacts', 'd.id, d.lead_id, l.ctwa_clid')}), "
    "missing AS (SELECT * FROM contacts AS i WHERE NOT EXISTS "
    "(SELECT 1 FROM found AS f WHERE f.ord = i.ord)), "
    "new_counts AS (SELECT contact AS ord, count(*) FILTER (WHERE NOT from_me) AS n, "
    "max(sent_at) FILTER (WHERE NOT from_me) AS last_at FROM msgs GROUP BY contact), "
    "l AS (INSERT INTO leads (direction_id, contact_key, contact_phone, "
    "from_ad_without_click_id, created_at, updated_at) "
    "SELECT direction_id, contact_key, contact_phone, false, :now, :now FROM missing "
    "ORDER BY ord ON CONFLICT (direction_id, contact_key) DO NOTHING "
    "RETURNING id, direction_id, contact_key), "
    "d AS (INSERT INTO dialog_analysis (lead_id, direction_id, instance_name, contact_phone, "
    "capi_interest_sent, capi_qualified_sent, capi_scheduled_sent, client_message_count, "
    "last_message_at, analyzed_client_message_count, is_interested, is_qualified, "
    "is_scheduled, held_levels, created_at, updated_at) "
    "SELECT l.id, i.direction_id, i.instance_name, i.dialog_phone, false, false, false, "
    "coalesce(c.n, 0), c.last_at, 0, false, false, false, CAST('{}' AS jsonb), :now, :now "
    "FROM l JOIN missing AS i ON i.direction_id = l.direction_id "
    "AND i.contact_key = l.contact_key LEFT JOIN new_counts AS c ON c.ord = i.ord "
    "ORDER BY i.ord ON CONFLICT (lead_id) DO NOTHING RETURNING id, lead_id), "
    "resolved AS (SELECT ord, id, lead_id, ctwa_clid FROM found UNION ALL "
    "SELECT i.ord, d.id, d.lead_id, NULL FROM d JOIN l ON l.id = d.lead_id "
    "JOIN missing AS i ON i.direction_id = l.direction_id AND i.contact_key = l.contact_key), "
    "stored AS (INSERT INTO dialog_messages (dialog_id, message_id, from_me, text, "
    "message_type, sent_at, created_at) "
    "SELECT r.id, m.message_id, m.from_me, m.text, m.message_type, m.sent_at, :now "
    "FROM msgs AS m JOIN resolved AS r ON r.ord = m.contact ORDER BY r.id, m.message_id "
    "ON CONFLICT (dialog_id, message_id) DO NOTHING "
    "RETURNING dialog_id, message_id, from_me, sent_at), "
    "added AS (SELECT dialog_id AS id, count(*) AS n, max(sent_at) AS last_at FROM stored "
    "WHERE NOT from_me AND dialog_id IN (SELECT id FROM found) GROUP BY dialog_id), "
    f"{_COUNT_ADDED}"
    "SELECT r.ord, r.id, r.lead_id, r.ctwa_clid, s.message_id FROM resolved AS r "
    "LEFT JOIN stored AS s ON s.dialog_id = r.id"
)
_PG_INGEST_BATCH = driver.psycopg_text(_PG_INGEST_BATCH_TEXT)


def _in_key_order(contacts: Sequence[NewContact]) -> list[NewContact]:
    """One per key, sorted: concurrent transactions lock the rows they insert alike."""
    return sorted({c.key: c for c in contacts}.values(), key=lambda c: c.key)


def _contacts_params(param: str, contacts: Sequence[NewContact]) -> dict[str, Any]:
    """The `_CONTACTS_JSON` parameters of `contacts`, in their order."""
    return {
        param: json_rows(
            {
                "direction_id": c.direction_id,
                "contact_key": c.contact_key,
                "contact_phone": c.contact_phone,
                "instance_name": c.instance_name,
                "dialog_phone": c.contact_phone or c.contact_key,
            }
            for c in contacts
        ),
        f"{param}_count": len(contacts),
    }


async def _insert_rows_sqlite(
    session: AsyncSession, name: str, rows: list[dict[str, Any]], constants: dict[str, Any]
) -> Any:
    """Runs SQLite insert statement `name` for `rows` (the columns that vary; `constants`
    are the same for every row) as one multi-row INSERT. Returns the RETURNING rows."""
    connection = await session.connection()
    return await connection.execute(
        _SQLITE_STATEMENTS[name], [{**row, **constants} for row in rows]
    )


_FIND_DIALOGS = (
    select(_DIALOGS.c.id, _DIALOGS.c.lead_id, _LEADS.c.contact_key)
    .join(_LEADS, _LEADS.c.id == _DIALOGS.c.lead_id)
    .where(
        _LEADS.c.direction_id == bindparam("direction"),
        _LEADS.c.contact_key.in_(bindparam("contacts", expanding=True)),
    )
)
_PG_FIND_DIALOGS = text(
    "SELECT d.id, d.lead_id, l.contact_key FROM dialog_analysis AS d "
    "JOIN leads AS l ON l.id = d.lead_id WHERE l.direction_id = :direction "
    "AND l.contact_key = ANY(CAST(:contacts AS text[]))"
)


async def find_dialogs(
    session: AsyncSession, keys: Collection[ContactKey]
) -> dict[ContactKey, DialogKeys]:
    """The existing leads' and dialogs' ids of `keys` (one query per direction). Runs on the
    session's connection: changes pending in the session are not flushed first."""
    by_direction: dict[int, set[str]] = {}
    for direction_id, contact_key in keys:
        by_direction.setdefault(direction_id, set()).add(contact_key)
    found: dict[ContactKey, DialogKeys] = {}
    connection = await session.connection()
    statement = _PG_FIND_DIALOGS if connection.dialect.name == "postgresql" else _FIND_DIALOGS
    for direction_id, contacts in by_direction.items():
        rows = await connection.execute(
            statement,
            {"direction": direction_id, "contacts": sorted(contacts)},
        )
        for dialog_id, lead_id, contact_key in rows:
            found[(direction_id, contact_key)] = DialogKeys(dialog_id, lead_id, direction_id)
    return found


async def ensure_dialogs(
    session: AsyncSession, contacts: Sequence[NewContact], *, now: datetime | None = None
) -> dict[ContactKey, DialogKeys]:
    """Leads and dialogs of `contacts`, created when missing (race-safe).

    PostgreSQL: one statement for any number of contacts. SQLite: one read, then for the
    contacts not found two statements: INSERT ... ON CONFLICT DO UPDATE ... RETURNING
    creates the missing rows and returns the ids of any created meanwhile.
    """
    now = now or utcnow()
    unique = _in_key_order(contacts)
    if not unique:
        return {}
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        result = await connection.execute(
            _PG_ENSURE_DIALOGS, {**_contacts_params("rows", unique), "now": now}
        )
        return {
            (direction_id, contact_key): DialogKeys(dialog_id, lead_id, direction_id)
            for dialog_id, lead_id, direction_id, contact_key in result
        }
    found = await find_dialogs(session, [c.key for c in unique])
    unique = [c for c in unique if c.key not in found]
    if not unique:
        return found
    leads = await _insert_rows_sqlite(
        session,
        "upsert_leads",
        [
            {
                "direction_id": c.direction_id,
                "contact_key": c.contact_key,
                "contact_phone": c.contact_phone,
            }
            for c in unique
        ],
        {"from_ad_without_click_id": False, "created_at": now, "updated_at": now},
    )
    lead_ids = {(direction_id, key): lead_id for lead_id, direction_id, key in leads}
    dialogs = await _insert_rows_sqlite(
        session,
        "upsert_dialogs",
        [
            {
                "lead_id": lead_ids[c.key],
                "direction_id": c.direction_id,
                "instance_name": c.instance_name,
                "contact_phone": c.contact_phone or c.contact_key,
            }
            for c in unique
        ],
        {
            "capi_interest_sent": False,
            "capi_qualified_sent": False,
            "capi_scheduled_sent": False,
            "client_message_count": 0,
            "analyzed_client_message_count": 0,
            "is_interested": False,
            "is_qualified": False,
            "is_scheduled": False,
            "held_levels": {},
            "created_at": now,
            "updated_at": now,
        },
    )
    dialog_ids = dict((lead_id, dialog_id) for dialog_id, lead_id in dialogs)
    return found | {
        c.key: DialogKeys(dialog_ids[lead_ids[c.key]], lead_ids[c.key], c.direction_id)
        for c in unique
    }


async def ensure_dialogs_with_leads(
    session: AsyncSession, contacts: Sequence[NewContact], *, now: datetime | None = None
) -> dict[ContactKey, tuple[DialogSends, LeadIdentity]]:
    """ensure_dialogs, returning each dialog's send columns and its lead's identifiers
    (what dialogs_with_leads reads): on PostgreSQL in the same one statement."""
    now = now or utcnow()
    unique = _in_key_order(contacts)
    if not unique:
        return {}
    connection = await session.connection()
    if connection.dialect.name != "postgresql":
        keys = await ensure_dialogs(session, unique, now=now)
        rows = await dialogs_with_leads(session, [k.dialog_id for k in keys.values()])
        return {key: rows[k.dialog_id] for key, k in keys.items()}
    result = await driver.fetch_all(
        connection,
        _PG_ENSURE_DIALOGS_WITH_LEADS,
        {**_contacts_params("rows", unique), "now": now},
    )
    found: dict[ContactKey, tuple[DialogSends, LeadIdentity]] = {}
    for row in result:
        values = list(row[:_SENDS_WIDTH])
        for i in _SENT_AT_INDEXES:
            values[i] = driver.utc(values[i])
        dialog = DialogSends(*values)
        lead = LeadIdentity(
            dialog.lead_id, *row[_SENDS_WIDTH : _SENDS_WIDTH + len(_LEAD_IDENTITY_COLUMNS)]
        )
        found[(row[-2], row[-1])] = (dialog, lead)
    return found


async def ensure_dialog(
    session: AsyncSession,
    direction_id: int,
    instance_name: str | None,
    contact_key: str,
    contact_phone: str | None,
    *,
    now: datetime | None = None,
) -> DialogKeys:
    """The lead and dialog of (direction, contact), created when missing (race-safe)."""
    contact = NewContact(direction_id, instance_name, contact_key, contact_phone)
    return (await ensure_dialogs(session, [contact], now=now))[contact.key]


_SENDS_AND_IDENTITIES = select(
    *(_DIALOGS.c[name] for name in DialogSends.__dataclass_fields__),
    *(_LEADS.c[name] for name in LeadIdentity.__dataclass_fields__),
).join(_LEADS, _LEADS.c.id == _DIALOGS.c.lead_id)
# PostgreSQL: one array parameter, so one statement text for any number of ids (an IN
# list is new text for every batch size); SQLite: an expanding IN.
_PG_SENDS_AND_IDENTITIES = _SENDS_AND_IDENTITIES.where(
    _DIALOGS.c.id == any_(bindparam("ids", type_=ARRAY(BigInteger)))
)
_SQLITE_SENDS_AND_IDENTITIES = _SENDS_AND_IDENTITIES.where(
    _DIALOGS.c.id.in_(bindparam("ids", expanding=True))
)


async def dialogs_with_leads(
    session: AsyncSession, dialog_ids: Collection[int]
) -> dict[int, tuple[DialogSends, LeadIdentity]]:
    """The dialogs that exist, with their leads, by dialog id, in one query (plain values,
    no ORM objects: building those cost more than the query)."""
    if not dialog_ids:
        return {}
    connection = await session.connection()
    statement = (
        _PG_SENDS_AND_IDENTITIES
        if connection.dialect.name == "postgresql"
        else _SQLITE_SENDS_AND_IDENTITIES
    )
    rows = await connection.execute(statement, {"ids": sorted(dialog_ids)})
    return {
        row[0]: (DialogSends(*row[:_SENDS_WIDTH]), LeadIdentity(*row[_SENDS_WIDTH:]))
        for row in rows
    }


async def set_lead_emails(session: AsyncSession, emails: dict[int, str], now: datetime) -> None:
    """Stores the emails ({lead_id: email}) callers gave, leads in id order (the order
    every transaction locks leads in)."""
    connection = await session.connection()
    for lead_id in sorted(emails):
        await connection.execute(
            update(_LEADS)
            .where(_LEADS.c.id == lead_id)
            .values(email=emails[lead_id], updated_at=now)
        )


@dataclass(frozen=True, slots=True)
class DialogState:
    """What AnalyzeDialog decides from: a dialog's counters, flags and last analysis."""

    id: int
    direction_id: int
    client_message_count: int
    analyzed_client_message_count: int
    capi_qualified_event_id: str | None
    capi_scheduled_event_id: str | None
    is_qualified: bool
    is_scheduled: bool
    held_levels: dict[str, Any] | None
    analysis: dict[str, Any] | None
    analyzed_at: datetime | None
    last_message_at: datetime | None


_DIALOG_STATES = select(*(_DIALOGS.c[name] for name in DialogState.__dataclass_fields__)).where(
    _DIALOGS.c.id.in_(bindparam("ids", expanding=True))
)


# PostgreSQL: the same query on psycopg directly. AnalyzeDialog reads it for every call,
# and at a few dialogs per batch SQLAlchemy's execute path cost more than the query.
_PG_DIALOG_STATES = (
    f"SELECT {', '.join(DialogState.__dataclass_fields__)} FROM dialog_analysis "
    "WHERE id = ANY(%(ids)s::bigint[])"
)
_DIALOG_STATE_TIMES = tuple(
    i
    for i, name in enumerate(DialogState.__dataclass_fields__)
    if name in ("analyzed_at", "last_message_at")
)


async def dialog_states(
    on: AsyncConnection | driver.AutocommitPool, dialog_ids: Collection[int]
) -> dict[int, DialogState]:
    """The states of the dialogs that exist, in one query (no ORM objects: read only), on
    a SQLAlchemy connection or (PostgreSQL) the autocommit pool."""
    ids = sorted(set(dialog_ids))
    if isinstance(on, AsyncConnection) and on.dialect.name != "postgresql":
        rows = await on.execute(_DIALOG_STATES, {"ids": ids})
        return {row.id: DialogState(*row) for row in rows}
    fetched = await driver.fetch_all(on, _PG_DIALOG_STATES, {"ids": ids})
    states: dict[int, DialogState] = {}
    for row in fetched:
        values = list(row)
        for i in _DIALOG_STATE_TIMES:
            values[i] = driver.utc(values[i])
        states[values[0]] = DialogState(*values)
    return states


@dataclass(frozen=True, slots=True)
class NewMessage:
    dialog_id: int
    message_id: str
    from_me: bool
    text: str
    message_type: str
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class StoredMessages:
    stored: set[tuple[int, str]]  # (dialog_id, message_id) stored now
    ctwa_clids: dict[int, str]  # {lead_id: ctwa_clid} of the `clids_of` leads that have one


async def store_messages(
    session: AsyncSession,
    messages: Sequence[NewMessage],
    *,
    now: datetime,
    clids_of: Collection[int] = (),
) -> StoredMessages:
    """Stores the messages not stored yet and adds the new client (not from_me) messages
    to their dialogs' counters (client_message_count, last_message_at); also reads the
    click ids of the `clids_of` leads, as lead_ctwa_clids would (on PostgreSQL in the same
    statement: one round trip for an IngestMessage batch's writes and its last read)."""
    if not messages:
        return StoredMessages(set(), await lead_ctwa_clids(session, clids_of))
    rows = [
        {
            "dialog_id": m.dialog_id,
            "message_id": m.message_id,
            "from_me": m.from_me,
            "text": m.text,
            "message_type": m.message_type,
            "sent_at": m.sent_at,
        }
        for m in messages
    ]
    connection = await session.connection()
    if connection.dialect.name == "postgresql":
        result = await connection.execute(
            _PG_STORE_MESSAGES,
            {
                "rows": json_rows(rows),
                "rows_count": len(rows),
                "now": now,
                "leads": sorted(clids_of),
            },
        )
        stored: set[tuple[int, str]] = set()
        clids: dict[int, str] = {}
        for dialog_id, message_id, lead_id, clid in result:
            if lead_id is None:
                stored.add((dialog_id, message_id))
            else:
                clids[lead_id] = clid
        return StoredMessages(stored, clids)
    result = await _insert_rows_sqlite(session, "insert_messages", rows, {"created_at": now})
    stored = {(dialog_id, message_id) for dialog_id, message_id in result}
    added: dict[int, tuple[int, datetime]] = {}
    for m in messages:
        if not m.from_me and (m.dialog_id, m.message_id) in stored:
            count, last_at = added.get(m.dialog_id, (0, m.sent_at))
            added[m.dialog_id] = (count + 1, max(last_at, m.sent_at))
    if added:
        await connection.execute(
            _COUNT_CLIENT_MESSAGES,
            [
                {"dialog": dialog_id, "added": n, "last_at": last_at, "now": now}
                for dialog_id, (n, last_at) in sorted(added.items())
            ],
        )
    return StoredMessages(stored, await lead_ctwa_clids(session, clids_of))


@dataclass(frozen=True, slots=True)
class ContactMessage:
    """A message of an IngestMessage batch, named by its contact (its dialog may not
    exist yet)."""

    contact: ContactKey
    message_id: str
    from_me: bool
    text: str
    message_type: str
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class IngestedBatch:
    dialogs: dict[ContactKey, DialogKeys]  # the contacts resolved (the others: see below)
    stored: set[tuple[int, str]]  # (dialog_id, message_id) stored now
    ctwa_clids: dict[int, str]  # {lead_id: ctwa_clid} of the resolved leads that have one


async def ingest_batch(
    pool: driver.AutocommitPool,
    contacts: Sequence[NewContact],
    messages: Sequence[ContactMessage],
    *,
    now: datetime,
) -> IngestedBatch:
    """PostgreSQL, on the autocommit pool: ensure_dialogs and store_messages in one
    statement that commits on its own. A contact whose lead or dialog another
    transaction created meanwhile is left out of `dialogs`, and its messages are not
    stored: store them with ensure_dialogs and store_messages.

    `messages` name their contact among `contacts`, carry no click id (the lead's
    ctwa_clid and from_ad_without_click_id are set by the two-statement path), and are
    distinct per (contact, message_id): a new dialog's counters are counted from them."""
    unique = _in_key_order(contacts)
    ordinal = {c.key: i for i, c in enumerate(unique, start=1)}
    result = await driver.fetch_all(
        pool,
        _PG_INGEST_BATCH,
        {
            **_contacts_params("contacts", unique),
            "messages_count": len(messages),
            "messages": json_rows(
                {
                    "contact": ordinal[m.contact],
                    "message_id": m.message_id,
                    "from_me": m.from_me,
                    "text": m.text,
                    "message_type": m.message_type,
                    "sent_at": m.sent_at,
                }
                for m in messages
            ),
            "now": now,
        },
    )
    dialogs: dict[ContactKey, DialogKeys] = {}
    stored: set[tuple[int, str]] = set()
    clids: dict[int, str] = {}
    for ord_, dialog_id, lead_id, clid, message_id in result:
        contact = unique[ord_ - 1]
        dialogs[contact.key] = DialogKeys(dialog_id, lead_id, contact.direction_id)
        if clid:
            clids[lead_id] = clid
        if message_id is not None:
            stored.add((dialog_id, message_id))
    return IngestedBatch(dialogs, stored, clids)


_COUNT_CLIENT_MESSAGES = (
    update(_DIALOGS)
    .where(_DIALOGS.c.id == bindparam("dialog"))
    .values(
        client_message_count=_DIALOGS.c.client_message_count + bindparam("added"),
        last_message_at=bindparam("last_at"),
        updated_at=bindparam("now"),
    )
)


_SET_CLID = (
    update(_LEADS)
    .where(_LEADS.c.id == bindparam("lead"), _LEADS.c.ctwa_clid.is_(None))
    .values(ctwa_clid=bindparam("clid"), updated_at=bindparam("now"))
)
_MARK_AD_WITHOUT_CLID = (
    update(_LEADS)
    .where(_LEADS.c.id == bindparam("lead"), _LEADS.c.ctwa_clid.is_(None))
    .values(from_ad_without_click_id=True, updated_at=bindparam("now"))
)
_LEAD_CLIDS = select(_LEADS.c.id, _LEADS.c.ctwa_clid).where(
    _LEADS.c.id.in_(bindparam("leads", expanding=True))
)
_PG_LEAD_CLIDS = text(
    "SELECT id, ctwa_clid FROM leads WHERE id = ANY(CAST(:leads AS bigint[])) "
    "AND ctwa_clid IS NOT NULL"
)


async def set_lead_ctwa_clids(
    session: AsyncSession, clids: Sequence[tuple[int, str]], *, now: datetime
) -> None:
    """(lead_id, ctwa_clid) in arrival order: the first click id of a lead wins, and a
    later message never replaces or erases it. Leads are updated in id order."""
    first: dict[int, str] = {}
    for lead, clid in clids:
        first.setdefault(lead, clid)
    if first:
        await (await session.connection()).execute(
            _SET_CLID,
            [{"lead": lead, "clid": clid, "now": now} for lead, clid in sorted(first.items())],
        )


async def mark_from_ad_without_click_id(
    session: AsyncSession, lead_ids: Collection[int], *, now: datetime
) -> None:
    if lead_ids:
        await (await session.connection()).execute(
            _MARK_AD_WITHOUT_CLID, [{"lead": lead, "now": now} for lead in sorted(lead_ids)]
        )


async def lead_ctwa_clids(session: AsyncSession, lead_ids: Collection[int]) -> dict[int, str]:
    """{lead_id: ctwa_clid} of the leads that have one (on the session's connection:
    changes pending in the session are not flushed first)."""
    if not lead_ids:
        return {}
    connection = await session.connection()
    postgresql = connection.dialect.name == "postgresql"
    rows = await connection.execute(
        _PG_LEAD_CLIDS if postgresql else _LEAD_CLIDS, {"leads": sorted(lead_ids)}
    )
    return {lead_id: clid for lead_id, clid in rows if clid}


async def access_token_for(
    session: AsyncSession, direction: DirectionRow, cipher: TokenCipher
) -> tuple[str | None, str]:
    """(token, where it came from): the ad account's, else the user account's.

    Raises FailedPrecondition when the stored token cannot be decrypted with the
    configured keys (a key was removed from CAPI_ENCRYPTION_KEYS too early).
    """
    try:
        return await _access_token_for(session, direction, cipher)
    except UndecryptableSecret:
        raise FailedPrecondition(
            f"the access token of direction {direction.id} cannot be decrypted with "
            "CAPI_ENCRYPTION_KEYS: put the key it was written with back into the list, or "
            "set the token again",
            reason="TOKEN_UNDECRYPTABLE",
            metadata={"direction_id": str(direction.id)},
        ) from None


async def _access_token_for(
    session: AsyncSession, direction: DirectionRow, cipher: TokenCipher
) -> tuple[str | None, str]:
    if direction.ad_account_id is not None:
        stored = (
            await session.execute(
                select(AdAccountRow.access_token).where(AdAccountRow.id == direction.ad_account_id)
            )
        ).scalar_one_or_none()
        if stored:
            return cipher.decrypt(stored), "ad_account"
    stored = (
        await session.execute(
            select(UserAccountRow.access_token).where(
                UserAccountRow.id == direction.user_account_id
            )
        )
    ).scalar_one_or_none()
    if stored:
        return cipher.decrypt(stored), "user_account"
    return None, "none"
