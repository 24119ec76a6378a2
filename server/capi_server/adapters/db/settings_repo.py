"""Rows <-> domain objects for accounts, CRM connections and directions."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from capi_server.adapters.db.orm import (
    AdAccountRow,
    CrmConnectionRow,
    DirectionRow,
    UserAccountRow,
)
from capi_server.adapters.db.secrets import TokenCipher
from capi_server.domain.crm import CrmFieldRule, CrmType
from capi_server.domain.directions import (
    AdAccount,
    CapiSettings,
    CapiSource,
    CrmConnection,
    Direction,
    UserAccount,
)
from capi_server.domain.errors import NotFound
from capi_server.domain.levels import Level

_Row = TypeVar("_Row", UserAccountRow, AdAccountRow, CrmConnectionRow)


def user_account_from_row(row: UserAccountRow) -> UserAccount:
    return UserAccount(
        id=row.id,
        name=row.name,
        default_region=row.default_region,
        has_access_token=bool(row.access_token),
    )


def ad_account_from_row(row: AdAccountRow) -> AdAccount:
    return AdAccount(
        id=row.id,
        user_account_id=row.user_account_id,
        name=row.name,
        has_access_token=bool(row.access_token),
    )


def crm_connection_from_row(row: CrmConnectionRow, cipher: TokenCipher) -> CrmConnection:
    return CrmConnection(
        id=row.id,
        user_account_id=row.user_account_id,
        crm_type=CrmType(row.crm_type),
        base_url=cipher.decrypt(row.base_url),
        portal=row.portal,
        has_access_token=bool(row.access_token),
        has_application_token=bool(row.application_token),
        reconcile_interval_seconds=row.reconcile_interval_seconds,
    )


def _rules(entries: list[dict[str, Any]] | None) -> tuple[CrmFieldRule, ...]:
    return tuple(CrmFieldRule.from_json(entry) for entry in entries or [])


def direction_from_row(row: DirectionRow) -> Direction:
    names = {Level[key.upper()]: value for key, value in (row.capi_event_names or {}).items()}
    return Direction(
        id=row.id,
        user_account_id=row.user_account_id,
        name=row.name,
        ad_account_id=row.ad_account_id,
        instance_name=row.instance_name,
        pixel_id=row.pixel_id,
        whatsapp_business_account_id=row.whatsapp_business_account_id,
        qualification_prompt=row.qualification_prompt,
        capi=CapiSettings(
            enabled=row.capi_enabled,
            source=CapiSource(row.capi_source) if row.capi_source else None,
            crm_type=CrmType(row.capi_crm_type) if row.capi_crm_type else None,
            crm_connection_id=row.capi_crm_connection_id,
            fields={
                Level.INTEREST: _rules(row.capi_interest_fields),
                Level.QUALIFIED: _rules(row.capi_qualified_fields),
                Level.SCHEDULED: _rules(row.capi_scheduled_fields),
            },
            test_event_code=row.capi_test_event_code,
            event_names=names,
            require_ctwa_clid=row.capi_require_ctwa_clid,
            limited_data_use=row.capi_limited_data_use,
            review_confidence_threshold=row.capi_review_confidence_threshold,
        ),
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def apply_direction(row: DirectionRow, direction: Direction) -> None:
    """Write every settable field of `direction` onto `row`."""
    capi = direction.capi
    row.user_account_id = direction.user_account_id
    row.ad_account_id = direction.ad_account_id
    row.name = direction.name
    row.instance_name = direction.instance_name
    row.pixel_id = direction.pixel_id
    row.whatsapp_business_account_id = direction.whatsapp_business_account_id
    row.qualification_prompt = direction.qualification_prompt
    row.capi_enabled = capi.enabled
    row.capi_source = capi.source.value if capi.source else None
    row.capi_crm_type = capi.crm_type.value if capi.crm_type else None
    row.capi_crm_connection_id = capi.crm_connection_id
    row.capi_interest_fields = [r.to_json() for r in capi.fields_for(Level.INTEREST)]
    row.capi_qualified_fields = [r.to_json() for r in capi.fields_for(Level.QUALIFIED)]
    row.capi_scheduled_fields = [r.to_json() for r in capi.fields_for(Level.SCHEDULED)]
    row.capi_test_event_code = capi.test_event_code
    row.capi_event_names = {lvl.column: name for lvl, name in capi.event_names.items() if name}
    row.capi_require_ctwa_clid = capi.require_ctwa_clid
    row.capi_limited_data_use = capi.limited_data_use
    row.capi_review_confidence_threshold = capi.review_confidence_threshold


class SettingsRepository:
    def __init__(self, session: AsyncSession, cipher: TokenCipher) -> None:
        self.session = session
        self.cipher = cipher

    def seal(self, token: str | None) -> str | None:
        return self.cipher.encrypt(token) if token else None

    def open(self, stored: str | None) -> str | None:
        return self.cipher.decrypt(stored) if stored else None

    async def _get(
        self, model: type[_Row], row_id: int, what: str, reason: str, key: str, path: str
    ) -> _Row:
        row = await self.session.get(model, row_id)
        if row is None:
            raise NotFound(
                f"{what} {row_id} not found",
                reason=reason,
                metadata={key: str(row_id), "field": path},
            )
        return row

    async def user_account_row(self, account_id: int, path: str = "id") -> UserAccountRow:
        return await self._get(
            UserAccountRow,
            account_id,
            "user account",
            "USER_ACCOUNT_NOT_FOUND",
            "user_account_id",
            path,
        )

    async def ad_account_row(self, ad_account_id: int, path: str = "id") -> AdAccountRow:
        return await self._get(
            AdAccountRow,
            ad_account_id,
            "ad account",
            "AD_ACCOUNT_NOT_FOUND",
            "ad_account_id",
            path,
        )

    async def crm_connection_row(self, connection_id: int, path: str = "id") -> CrmConnectionRow:
        return await self._get(
            CrmConnectionRow,
            connection_id,
            "CRM connection",
            "CRM_CONNECTION_NOT_FOUND",
            "crm_connection_id",
            path,
        )

    async def direction_row(self, direction_id: int, *, for_update: bool = False) -> DirectionRow:
        stmt = select(DirectionRow).where(DirectionRow.id == direction_id)
        if for_update and self.session.bind and self.session.bind.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = (await self.session.execute(stmt)).scalar_one_or_none()
        if row is None:
            raise NotFound(
                f"direction {direction_id} not found",
                reason="DIRECTION_NOT_FOUND",
                metadata={"direction_id": str(direction_id)},
            )
        return row

    async def direction_by_instance(self, instance_name: str) -> DirectionRow | None:
        stmt = select(DirectionRow).where(DirectionRow.instance_name == instance_name)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def directions_on_pixel(
        self, user_account_id: int, pixel_id: str, exclude_id: int | None
    ) -> int:
        stmt = select(func.count(DirectionRow.id)).where(
            DirectionRow.user_account_id == user_account_id, DirectionRow.pixel_id == pixel_id
        )
        if exclude_id is not None:
            stmt = stmt.where(DirectionRow.id != exclude_id)
        return int((await self.session.execute(stmt)).scalar_one())

    async def list_directions(
        self, user_account_id: int | None, after_id: int, limit: int
    ) -> list[DirectionRow]:
        stmt = select(DirectionRow).where(DirectionRow.id > after_id)
        if user_account_id is not None:
            stmt = stmt.where(DirectionRow.user_account_id == user_account_id)
        stmt = stmt.order_by(DirectionRow.id).limit(limit)
        return list((await self.session.execute(stmt)).scalars())

    async def pixel_choices(self, user_account_id: int) -> list[tuple[str, list[str]]]:
        stmt = (
            select(DirectionRow.pixel_id, DirectionRow.name)
            .where(
                DirectionRow.user_account_id == user_account_id,
                DirectionRow.pixel_id.is_not(None),
                DirectionRow.pixel_id != "",
            )
            .order_by(DirectionRow.id)
        )
        by_pixel: dict[str, list[str]] = {}
        for pixel_id, name in (await self.session.execute(stmt)).all():
            if pixel_id:
                by_pixel.setdefault(pixel_id, []).append(name)
        return sorted(by_pixel.items(), key=lambda item: (-len(item[1]), item[0]))
