"""Leads and dialogs: find or create them without read-then-write races."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Table, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from capi_server.adapters.db.orm import (
    AdAccountRow,
    DialogAnalysisRow,
    DirectionRow,
    LeadRow,
    UserAccountRow,
    utcnow,
)
from capi_server.adapters.db.secrets import TokenCipher, UndecryptableSecret
from capi_server.domain.errors import FailedPrecondition, NotFound


async def insert_ignore(
    session: AsyncSession, table: Table, values: dict[str, Any], conflict: list[str]
) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when a row was inserted.

    RETURNING decides, not rowcount: psycopg reports -1 for this statement.
    """
    dialect = session.bind.dialect.name if session.bind else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = (
        insert(table)
        .values(**values)
        .on_conflict_do_nothing(index_elements=conflict)
        .returning(*table.primary_key.columns)
    )
    result = await session.execute(stmt)
    return result.first() is not None


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


def _upsert(
    session: AsyncSession, table: Table, values: dict[str, Any], conflict: list[str]
) -> Any:
    """INSERT ... ON CONFLICT DO UPDATE SET updated_at ... RETURNING id: one round trip
    that creates the row or returns the existing one's id, race-free."""
    dialect = session.bind.dialect.name if session.bind else "sqlite"
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(table).values(**values)
    return stmt.on_conflict_do_update(
        index_elements=conflict, set_={"updated_at": stmt.excluded.updated_at}
    ).returning(table.c.id)


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
    now = now or utcnow()
    lead_id = (
        await session.execute(
            _upsert(
                session,
                LeadRow.__table__,  # type: ignore[arg-type]
                {
                    "direction_id": direction_id,
                    "contact_key": contact_key,
                    "contact_phone": contact_phone,
                    "from_ad_without_click_id": False,
                    "created_at": now,
                    "updated_at": now,
                },
                ["direction_id", "contact_key"],
            )
        )
    ).scalar_one()
    dialog_id = (
        await session.execute(
            _upsert(
                session,
                DialogAnalysisRow.__table__,  # type: ignore[arg-type]
                {
                    "lead_id": lead_id,
                    "direction_id": direction_id,
                    "instance_name": instance_name,
                    "contact_phone": contact_phone or contact_key,
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
                ["lead_id"],
            )
        )
    ).scalar_one()
    return DialogKeys(dialog_id=dialog_id, lead_id=lead_id, direction_id=direction_id)


async def find_dialog(
    session: AsyncSession, direction_id: int, contact_key: str
) -> DialogKeys | None:
    row = (
        await session.execute(
            select(DialogAnalysisRow.id, DialogAnalysisRow.lead_id)
            .join(LeadRow, LeadRow.id == DialogAnalysisRow.lead_id)
            .where(LeadRow.direction_id == direction_id, LeadRow.contact_key == contact_key)
        )
    ).first()
    if row is None:
        return None
    return DialogKeys(dialog_id=row[0], lead_id=row[1], direction_id=direction_id)


async def set_lead_ctwa_clid(session: AsyncSession, lead_id: int, ctwa_clid: str) -> None:
    """The first click id wins: a later message never replaces or erases it."""
    await session.execute(
        update(LeadRow)
        .where(LeadRow.id == lead_id, LeadRow.ctwa_clid.is_(None))
        .values(ctwa_clid=ctwa_clid, updated_at=utcnow())
    )


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
