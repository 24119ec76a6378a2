"""capi_events_log and the dialog_analysis send flags: claim, record, queue, list."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, and_, case, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from capi_server.adapters.db import driver
from capi_server.adapters.db.orm import CapiEventLogRow, DialogAnalysisRow, utcnow
from capi_server.adapters.db.types import json_rows
from capi_server.domain.events import EventStatus
from capi_server.domain.levels import Level


def db_text(value: str) -> str:
    """PostgreSQL text and jsonb cannot hold NUL; third-party bodies sometimes do."""
    return value.replace("\x00", "\ufffd")


def _event_id_column(level: Level) -> Any:
    return getattr(DialogAnalysisRow, f"capi_{level.column}_event_id")


def _is_postgresql(session: AsyncSession) -> bool:
    return session.bind is not None and session.bind.dialect.name == "postgresql"


def _lock_in_id_order(ids_param: str, columns: str = "id") -> str:
    """The SELECT (of `columns`) that row-locks the dialogs of array parameter `ids_param`
    in id order, the order every batch locks dialogs in."""
    return (
        f"SELECT {columns} FROM dialog_analysis "
        f"WHERE id = ANY(CAST(:{ids_param} AS bigint[])) ORDER BY id FOR NO KEY UPDATE"
    )


# Statements that take those locks first, in a `locked` CTE. A CTE that only selects runs
# only as far as it is read, so an UPDATE that reads it would lock the ids up to the
# highest one it updates; the count is a one-time filter, evaluated before the UPDATE reads
# a row, that reads (locks) them all.
def _locked_cte(ids_param: str) -> str:
    return f"locked AS MATERIALIZED ({_lock_in_id_order(ids_param)})"


_LOCK_ALL_FIRST = "(SELECT count(*) FROM locked) >= 0"


async def _claim_level_sqlite(
    connection: AsyncConnection, level: Level, event_ids: dict[int, str], now: datetime
) -> set[int]:
    """Sets capi_<level>_event_id where it is still NULL ({dialog_id: event_id}) in one
    UPDATE; the dialog ids claimed (SQLite, where a write locks the whole database)."""
    table: Table = DialogAnalysisRow.__table__  # type: ignore[assignment]
    column = table.c[f"capi_{level.column}_event_id"]
    result = await connection.execute(
        update(table)
        .where(table.c.id.in_(sorted(event_ids)), column.is_(None))
        .values({column: case(event_ids, value=table.c.id), table.c.updated_at: now})
        .returning(table.c.id)
    )
    return {row[0] for row in result}


_LOG: Table = CapiEventLogRow.__table__  # type: ignore[assignment]
_LOG_COLUMNS = frozenset(column.name for column in _LOG.columns if column.name != "id")

# PostgreSQL: the rows as one JSON array expanded by json_populate_recordset, in order.
# One statement text and one parameter for any number of rows: psycopg neither parses a
# long multi-row VALUES list nor dumps an array per column on every call, and the JSON is
# encoded in C. A value too long for its column is refused as by a plain INSERT. Rows are
# inserted in order, so the ids the sequence gives them ascend in that order.
_INSERT_LOG_ROWS_FROM_JSON = (
    f"INSERT INTO {_LOG.name} ({', '.join(sorted(_LOG_COLUMNS))}) "
    f"SELECT {', '.join(f'u.{name}' for name in sorted(_LOG_COLUMNS))} "
    f"FROM json_populate_recordset(NULL::{_LOG.name}, CAST(:rows AS json)) "
    "WITH ORDINALITY AS u "
)
_PG_INSERT_LOG_ROWS = text(f"{_INSERT_LOG_ROWS_FROM_JSON}ORDER BY u.ordinality RETURNING id")


def _full_log_row(values: dict[str, Any]) -> dict[str, Any]:
    """A log row with every column the INSERT names: attempts 0, created and updated at
    its `now`."""
    row = dict(values)
    now = row.pop("now", None) or utcnow()
    unknown = set(row) - _LOG_COLUMNS
    if unknown:
        raise ValueError(f"unknown capi_events_log columns: {sorted(unknown)}")
    return {"created_at": now, "updated_at": now, "attempts": 0, **row}


async def insert_log_rows(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> list[int]:
    """capi_events_log rows by Core INSERT ... RETURNING id (no ORM flush); their ids, in
    order. Columns a row leaves out are NULL (attempts 0, created/updated at its `now`)."""
    if not rows:
        return []
    full = [_full_log_row(values) for values in rows]
    connection = await session.connection()
    if _is_postgresql(session):
        result = await connection.execute(_PG_INSERT_LOG_ROWS, {"rows": json_rows(full)})
        return sorted(int(returned[0]) for returned in result)
    # SQLite: one multi-row statement per set of columns given.
    ids: list[int] = [0] * len(full)
    by_columns: dict[frozenset[str], list[int]] = {}
    for i, values in enumerate(full):
        by_columns.setdefault(frozenset(values), []).append(i)
    for indexes in by_columns.values():
        result = await connection.execute(
            insert(_LOG).returning(_LOG.c.id, sort_by_parameter_order=True),
            [full[i] for i in indexes],
        )
        for i, returned in zip(indexes, result, strict=True):
            ids[i] = int(returned[0])
    return ids


ClaimKey = tuple[int, Level]
"""(dialog_id, level): one level of one dialog, claimed by setting its event id."""


# PostgreSQL: the claims of a batch and its log rows in one statement, which is atomic on
# its own: a claim is never committed without the pending row that sends its event. The
# dialogs are locked in id order first (as every batch locks them); a lock taken by
# SELECT ... FOR NO KEY UPDATE reads the row's latest committed version, so `locked`
# holds the event ids as they are now, and a level whose event id is still NULL is this
# statement's. One UPDATE sets every level of a dialog (a statement may change a row only
# once). A log row marked `conditional` is the pending row of a claim: written only if
# its level was won.
_PG_CLAIM_AND_LOG_TEXT = text(
    "WITH locked AS MATERIALIZED ("
    + _lock_in_id_order(
        "ids",
        ", ".join(["id", *(f"capi_{level.column}_event_id AS e{int(level)}" for level in Level)]),
    )
    + "), "
    "wanted AS (SELECT * FROM json_to_recordset(CAST(:claims AS json)) "
    f"AS c(id bigint, {', '.join(f'e{int(level)} text' for level in Level)})), "
    "won AS (SELECT w.id, "
    + ", ".join(
        f"CASE WHEN o.e{int(level)} IS NULL THEN w.e{int(level)} END AS e{int(level)}"
        for level in Level
    )
    + f" FROM wanted AS w JOIN locked AS o ON o.id = w.id WHERE {_LOCK_ALL_FIRST}), "
    "claimed AS (UPDATE dialog_analysis AS d SET "
    + ", ".join(
        f"capi_{level.column}_event_id = coalesce(d.capi_{level.column}_event_id, c.e{int(level)})"
        for level in Level
    )
    # `d.id = ANY(:ids)` as well: with the join alone, the generic plan a prepared statement
    # makes on a table of ~1,000 rows (and keeps until the next ANALYZE) scans it whole.
    + ", updated_at = :now FROM won AS c "
    "WHERE d.id = c.id AND d.id = ANY(CAST(:ids AS bigint[])) AND ("
    + " OR ".join(f"c.e{int(level)} IS NOT NULL" for level in Level)
    + ") RETURNING d.id, "
    + ", ".join(f"c.e{int(level)} IS NOT NULL" for level in Level)
    + "), "
    f"logged AS ({_INSERT_LOG_ROWS_FROM_JSON}"
    "JOIN unnest(CAST(:conditional AS boolean[])) WITH ORDINALITY AS k(conditional, ord) "
    "ON k.ord = u.ordinality "
    "WHERE NOT k.conditional OR EXISTS (SELECT 1 FROM won AS c WHERE c.id = u.dialog_id AND "
    "CASE u.level "
    + " ".join(f"WHEN {int(level)} THEN c.e{int(level)} IS NOT NULL" for level in Level)
    + " END) ORDER BY u.ordinality RETURNING id) "
    "SELECT id, "
    + ", ".join("NULL::boolean" for _ in Level)
    + " FROM logged UNION ALL SELECT * FROM claimed"
)
# Run on psycopg directly (adapters/db/driver.py): one per SendConversion batch.
_PG_CLAIM_AND_LOG = driver.psycopg_text(_PG_CLAIM_AND_LOG_TEXT)


async def claim_and_log(
    session: AsyncSession,
    claims: dict[ClaimKey, str],
    rows: Sequence[tuple[dict[str, Any], ClaimKey | None]],
    now: datetime,
) -> tuple[set[ClaimKey], list[int | None]]:
    """Claims levels ({(dialog_id, level): event_id}, set where the event id is still
    NULL: the database decides each race) and writes log rows, each (row, claim): a row
    with a claim is written only if that claim was won. Returns the claims won and each
    row's log id (None for a row not written), in order.

    PostgreSQL: one statement (see `_PG_CLAIM_AND_LOG`). SQLite (a write locks the whole
    database): one UPDATE per level, then the INSERTs."""
    won: set[ClaimKey] = set()
    if _is_postgresql(session) and claims:
        by_dialog: dict[int, dict[str, str]] = {}
        for (dialog_id, level), event_id in claims.items():
            by_dialog.setdefault(dialog_id, {})[f"e{int(level)}"] = event_id
        full = [_full_log_row(row) for row, _ in rows]
        connection = await session.connection()
        result = await driver.fetch_all(
            connection,
            _PG_CLAIM_AND_LOG,
            {
                "ids": sorted(by_dialog),
                "claims": json.dumps(
                    [{"id": dialog_id, **levels} for dialog_id, levels in by_dialog.items()]
                ),
                "rows": json_rows(full),
                "conditional": [claim is not None for _, claim in rows],
                "now": now,
            },
        )
        log_ids: list[int] = []
        for returned in result:
            flags = returned[1:]
            if flags[0] is None:
                log_ids.append(int(returned[0]))
                continue
            won.update(
                (int(returned[0]), level) for level, flag in zip(Level, flags, strict=True) if flag
            )
        # The sequence gave the rows written ids ascending in the order given.
        log_ids.sort()
    else:
        by_level: dict[Level, dict[int, str]] = {}
        for (dialog_id, level), event_id in claims.items():
            by_level.setdefault(level, {})[dialog_id] = event_id
        connection = await session.connection()
        for level in sorted(by_level):
            claimed = await _claim_level_sqlite(connection, level, by_level[level], now)
            won.update((dialog_id, level) for dialog_id in claimed)
        log_ids = await insert_log_rows(
            session, [row for row, claim in rows if claim is None or claim in won]
        )
    written = iter(log_ids)
    return won, [next(written) if claim is None or claim in won else None for _, claim in rows]


async def latest_log_row(
    session: AsyncSession, dialog_id: int, level: Level
) -> CapiEventLogRow | None:
    """The newest non-skipped row of (dialog, level): its send attempt series."""
    stmt = (
        select(CapiEventLogRow)
        .where(
            CapiEventLogRow.dialog_id == dialog_id,
            CapiEventLogRow.level == int(level),
            CapiEventLogRow.status != EventStatus.SKIPPED.value,
        )
        .order_by(CapiEventLogRow.id.desc())
        .limit(1)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


# PostgreSQL: one statement, so that it needs no transaction of its own (no BEGIN and
# COMMIT round trips): the dialogs locked in id order first (as every batch locks them),
# the log rows in a CTE, the dialogs' levels from an id array per level.
_PG_MARK_SENT_TEXT = text(
    f"WITH {_locked_cte('dialog_ids')}, "
    "logged AS (UPDATE capi_events_log SET status = :status, "
    "facebook_response = CAST(:response AS jsonb), attempts = attempts + 1, "
    "next_attempt_at = NULL, locked_until = NULL, error_code = NULL, error_subcode = NULL, "
    "error_message = NULL, hint = NULL, updated_at = :now "
    "WHERE id = ANY(CAST(:log_ids AS bigint[]))) "
    "UPDATE dialog_analysis AS d SET "
    + ", ".join(
        f"capi_{level.column}_sent = d.capi_{level.column}_sent "
        f"OR d.id = ANY(CAST(:level{int(level)} AS bigint[])), "
        f"capi_{level.column}_sent_at = CASE WHEN d.id = ANY(CAST(:level{int(level)} AS "
        f"bigint[])) THEN :now ELSE d.capi_{level.column}_sent_at END"
        for level in Level
    )
    + ", updated_at = :now WHERE d.id = ANY(CAST(:dialog_ids AS bigint[])) "
    f"AND {_LOCK_ALL_FIRST}"
)
# Run on psycopg directly (adapters/db/driver.py): one per Graph request.
_PG_MARK_SENT = driver.psycopg_text(_PG_MARK_SENT_TEXT)


async def mark_success(
    executor: AsyncSession | AsyncConnection | driver.AutocommitPool,
    sent: Sequence[tuple[int, int, Level]],
    response: dict[str, Any],
    now: datetime,
) -> None:
    """Record (log_id, dialog_id, level) items accepted by one Graph request: on PostgreSQL
    in one statement (so the autocommit pool will do), on SQLite one UPDATE of their log
    rows and one per level of their dialogs."""
    if not sent:
        return
    log_ids = sorted(log_id for log_id, _, _ in sent)
    by_level = {
        level: sorted(dialog_id for _, dialog_id, lvl in sent if lvl is level) for level in Level
    }
    on: AsyncConnection | driver.AutocommitPool = (
        await executor.connection() if isinstance(executor, AsyncSession) else executor
    )
    if isinstance(on, driver.AutocommitPool) or on.dialect.name == "postgresql":
        await driver.fetch_all(
            on,
            _PG_MARK_SENT,
            {
                "status": EventStatus.SUCCESS.value,
                "response": json.dumps(response, ensure_ascii=False),
                "now": now,
                "log_ids": log_ids,
                "dialog_ids": sorted({dialog_id for _, dialog_id, _ in sent}),
                **{f"level{int(level)}": ids for level, ids in by_level.items()},
            },
        )
        return
    await on.execute(
        update(CapiEventLogRow)
        .where(CapiEventLogRow.id.in_(log_ids))
        .values(
            status=EventStatus.SUCCESS.value,
            facebook_response=response,
            attempts=CapiEventLogRow.attempts + 1,
            next_attempt_at=None,
            locked_until=None,
            error_code=None,
            error_subcode=None,
            error_message=None,
            hint=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    for level, dialog_ids in by_level.items():
        if not dialog_ids:
            continue
        await on.execute(
            update(DialogAnalysisRow)
            .where(DialogAnalysisRow.id.in_(dialog_ids))
            .values(
                {
                    getattr(DialogAnalysisRow, f"capi_{level.column}_sent"): True,
                    getattr(DialogAnalysisRow, f"capi_{level.column}_sent_at"): now,
                    DialogAnalysisRow.updated_at: now,
                }
            )
            .execution_options(synchronize_session=False)
        )


async def mark_failure(
    session: AsyncSession,
    log_id: int,
    *,
    status: EventStatus,
    now: datetime,
    next_attempt_at: datetime | None,
    error_code: int | None,
    error_subcode: int | None,
    error_message: str,
    hint: str | None,
    response: dict[str, Any] | None,
    count_attempt: bool = True,
) -> None:
    await session.execute(
        update(CapiEventLogRow)
        .where(
            CapiEventLogRow.id == log_id,
            # A late failure never overwrites an outcome another sender already recorded.
            CapiEventLogRow.status == EventStatus.PENDING.value,
        )
        .values(
            status=status.value,
            attempts=CapiEventLogRow.attempts + (1 if count_attempt else 0),
            next_attempt_at=next_attempt_at,
            locked_until=None,
            error_code=error_code,
            error_subcode=error_subcode,
            error_message=db_text(error_message[:2000]),
            hint=hint,
            facebook_response=(
                {k: db_text(v) if isinstance(v, str) else v for k, v in response.items()}
                if response
                else None
            ),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True, slots=True)
class DueEvent:
    log_id: int
    direction_id: int | None
    dialog_id: int | None
    level: Level
    event_name: str
    event_id: str | None
    event_time: datetime | None
    payload: dict[str, Any] | None
    test_event_code: str | None
    attempts: int


async def take_due_events(
    session: AsyncSession, now: datetime, limit: int, lease: timedelta
) -> list[DueEvent]:
    """Lease due pending rows to this worker. Replicas skip rows another one holds."""
    stmt = (
        select(CapiEventLogRow)
        .where(
            CapiEventLogRow.status == EventStatus.PENDING.value,
            CapiEventLogRow.next_attempt_at <= now,
            or_(CapiEventLogRow.locked_until.is_(None), CapiEventLogRow.locked_until < now),
        )
        .order_by(CapiEventLogRow.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    rows = list((await session.execute(stmt)).scalars())
    if not rows:
        return []
    await session.execute(
        update(CapiEventLogRow)
        .where(CapiEventLogRow.id.in_([r.id for r in rows]))
        .values(locked_until=now + lease)
        .execution_options(synchronize_session=False)
    )
    return [
        DueEvent(
            log_id=r.id,
            direction_id=r.direction_id,
            dialog_id=r.dialog_id,
            level=Level(r.level),
            event_name=r.event_name,
            event_id=r.event_id,
            event_time=r.event_time,
            payload=r.payload,
            test_event_code=r.test_event_code,
            attempts=r.attempts,
        )
        for r in rows
    ]


async def requeue(
    session: AsyncSession,
    *,
    log_ids: Sequence[int] = (),
    direction_id: int | None = None,
    status: EventStatus = EventStatus.ERROR,
    now: datetime,
) -> int:
    """Put error rows back into the queue with their original event_id."""
    if status not in (EventStatus.ERROR, EventStatus.PENDING):
        return 0
    conditions = [CapiEventLogRow.status == status.value, CapiEventLogRow.event_id.is_not(None)]
    if status is EventStatus.PENDING:
        # A row a sender holds right now is not taken from it.
        conditions.append(
            or_(CapiEventLogRow.locked_until.is_(None), CapiEventLogRow.locked_until < now)
        )
    if log_ids:
        conditions.append(CapiEventLogRow.id.in_(list(log_ids)))
    if direction_id is not None:
        conditions.append(CapiEventLogRow.direction_id == direction_id)
    result = await session.execute(
        update(CapiEventLogRow)
        .where(and_(*conditions))
        .values(
            status=EventStatus.PENDING.value,
            next_attempt_at=now,
            locked_until=None,
            updated_at=now,
        )
        .returning(CapiEventLogRow.id)
        .execution_options(synchronize_session=False)
    )
    return len(result.all())


async def list_log_rows(
    session: AsyncSession,
    *,
    direction_id: int | None,
    dialog_id: int | None,
    status: EventStatus | None,
    level: Level | None,
    start: datetime | None,
    end: datetime | None,
    before_id: int,
    limit: int,
) -> list[CapiEventLogRow]:
    """Newest first, keyset-paginated by id (no OFFSET: cost does not grow with pages)."""
    stmt = select(CapiEventLogRow)
    if before_id:
        stmt = stmt.where(CapiEventLogRow.id < before_id)
    if direction_id is not None:
        stmt = stmt.where(CapiEventLogRow.direction_id == direction_id)
    if dialog_id is not None:
        stmt = stmt.where(CapiEventLogRow.dialog_id == dialog_id)
    if status is not None:
        stmt = stmt.where(CapiEventLogRow.status == status.value)
    if level is not None:
        stmt = stmt.where(CapiEventLogRow.level == int(level))
    if start is not None:
        stmt = stmt.where(CapiEventLogRow.created_at >= start)
    if end is not None:
        stmt = stmt.where(CapiEventLogRow.created_at < end)
    stmt = stmt.order_by(CapiEventLogRow.id.desc()).limit(limit)
    return list((await session.execute(stmt)).scalars())
