"""Builders for test data through the public API (settings RPCs)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.exc import DBAPIError

from capi.v1 import resources_pb2 as res
from capi.v1 import settings_service_pb2 as pb
from capi_server.adapters.db.orm import CapiEventLogRow
from tests.conftest import Stubs, unique

USER_TOKEN = "EAAB-user-token-secret"
AD_TOKEN = "EAAB-ad-token-secret"


@dataclass
class DirectionSetup:
    account_id: str
    direction_id: str
    instance_name: str
    pixel_id: str


async def whatsapp_direction(
    stubs: Stubs,
    *,
    enabled: bool = True,
    pixel_id: str = "1234567890",
    user_token: str | None = USER_TOKEN,
    ad_token: str | None = None,
    region: str = "KZ",
    waba: str = "",
    prompt: str = "",
    **capi: object,
) -> DirectionSetup:
    account = await stubs.settings.CreateUserAccount(
        pb.CreateUserAccountRequest(
            user_account=res.UserAccount(
                name="Acme", access_token=user_token or "", default_region=region
            )
        )
    )
    account_id = account.user_account.id
    ad_account_id = ""
    if ad_token is not None:
        ad = await stubs.settings.CreateAdAccount(
            pb.CreateAdAccountRequest(
                ad_account=res.AdAccount(
                    user_account_id=account_id, name="Ads", access_token=ad_token
                )
            )
        )
        ad_account_id = ad.ad_account.id
    instance = unique("inst")
    settings = res.CapiSettings(enabled=enabled, source=res.CAPI_SOURCE_WHATSAPP)
    for key, value in capi.items():
        if key == "event_names":
            settings.event_names.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(settings, key, value)
    created = await stubs.settings.CreateDirection(
        pb.CreateDirectionRequest(
            direction=res.Direction(
                user_account_id=account_id,
                ad_account_id=ad_account_id,
                name="Direction",
                instance_name=instance,
                pixel_id=pixel_id,
                whatsapp_business_account_id=waba,
                qualification_prompt=prompt,
                capi=settings,
            )
        )
    )
    return DirectionSetup(account_id, created.direction.id, instance, pixel_id)


async def close_pending(stubs: Stubs, direction_id: str) -> None:
    """The database is shared by the run: leave no pending row for other tests' retry passes."""
    async with stubs.app.db.session() as session:
        await session.execute(
            update(CapiEventLogRow)
            .where(
                CapiEventLogRow.direction_id == int(direction_id),
                CapiEventLogRow.status == "pending",
            )
            .values(status="error", next_attempt_at=None)
        )
        await session.commit()


@asynccontextmanager
async def pending_event(
    stubs: Stubs, direction_id: str, *, event_name: str, attempts: int, hours_ago: float
) -> AsyncIterator[None]:
    """A pending capi_events_log row created `hours_ago`, closed again on exit."""
    async with stubs.app.db.session() as session:
        session.add(
            CapiEventLogRow(
                direction_id=int(direction_id),
                level=1,
                event_name=event_name,
                status="pending",
                attempts=attempts,
                created_at=datetime.now(UTC) - timedelta(hours=hours_ago),
            )
        )
        await session.commit()
    try:
        yield
    finally:
        await close_pending(stubs, direction_id)


async def set_ctwa_clid(stubs: Stubs, dialog_id: str, clid: str) -> None:
    async with stubs.app.db.session() as session:
        await session.execute(
            text(
                "UPDATE leads SET ctwa_clid = :clid WHERE id = "
                "(SELECT lead_id FROM dialog_analysis WHERE id = :d)"
            ),
            {"clid": clid, "d": int(dialog_id)},
        )
        await session.commit()


class _Deadlock(Exception):
    """A driver error in PostgreSQL's deadlock_detected state."""

    sqlstate = "40P01"


def losing_one_deadlock(
    real: Callable[..., Awaitable[Any]], statement: str
) -> tuple[Callable[..., Awaitable[Any]], list[int]]:
    """`real`, except that its first call fails as the loser of a deadlock (as SQLAlchemy
    raises it); the list gets an entry for the loss."""
    lost: list[int] = []

    async def losing_once(*args: Any, **kw: Any) -> Any:
        if not lost:
            lost.append(1)
            raise DBAPIError(statement, {}, _Deadlock("deadlock detected"))
        return await real(*args, **kw)

    return losing_once, lost
