"""Use cases of SettingsService: accounts, CRM connections, directions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from sqlalchemy.exc import IntegrityError

from capi_server.adapters.db.database import Database
from capi_server.adapters.db.orm import (
    AdAccountRow,
    CrmConnectionRow,
    DirectionRow,
    UserAccountRow,
)
from capi_server.adapters.db.secrets import TokenCipher
from capi_server.adapters.db.settings_repo import (
    SettingsRepository,
    ad_account_from_row,
    apply_direction,
    crm_connection_from_row,
    direction_from_row,
    user_account_from_row,
)
from capi_server.domain.crm import CrmType
from capi_server.domain.directions import (
    PIXEL_WARNING,
    AdAccount,
    CrmConnection,
    Direction,
    UserAccount,
    apply_direction_mask,
    direction_warnings,
    portal_of,
    validate_base_url,
    validate_direction,
    validate_name,
    validate_user_account,
)
from capi_server.domain.errors import (
    AlreadyExists,
    FieldViolation,
    InvalidArgument,
)

MAX_TOKEN = 4096


@dataclass(frozen=True, slots=True)
class SavedDirection:
    direction: Direction
    warnings: list[str]


@dataclass(frozen=True, slots=True)
class PixelChoices:
    choices: list[tuple[str, list[str]]]
    warning: str


def _raise_if(problems: list[FieldViolation]) -> None:
    if problems:
        summary = "; ".join(f"{p.field}: {p.description}" for p in problems)
        raise InvalidArgument(summary, problems)


def _check_token(token: str | None, path: str) -> list[FieldViolation]:
    if token is not None and len(token) > MAX_TOKEN:
        return [FieldViolation(path, f"must be at most {MAX_TOKEN} characters")]
    return []


class SettingsService:
    def __init__(
        self, db: Database, cipher: TokenCipher, on_change: Callable[[], None] | None = None
    ) -> None:
        self.db = db
        self.cipher = cipher
        self._on_change = on_change

    def changed(self) -> None:
        """Settings were written: drop cached snapshots of them in this process."""
        if self._on_change is not None:
            self._on_change()

    # -- user accounts -----------------------------------------------------------------

    async def create_user_account(
        self, account: UserAccount, access_token: str | None
    ) -> UserAccount:
        _raise_if(
            validate_user_account(account, "user_account")
            + _check_token(access_token, "user_account.access_token")
        )
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            row = UserAccountRow(
                name=account.name.strip(),
                default_region=account.default_region or None,
                access_token=repo.seal(access_token),
            )
            session.add(row)
            await session.commit()
            self.changed()
            return user_account_from_row(row)

    async def update_user_account(
        self, account: UserAccount, access_token: str | None, paths: list[str]
    ) -> UserAccount:
        assert account.id is not None
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            row = await repo.user_account_row(account.id, "user_account.id")
            current = user_account_from_row(row)
            updated = current
            for path in _mask(paths, {"name", "default_region", "access_token"}):
                if path == "name":
                    updated = replace(updated, name=account.name.strip())
                elif path == "default_region":
                    updated = replace(updated, default_region=account.default_region or None)
            _raise_if(
                validate_user_account(updated, "user_account")
                + _check_token(access_token, "user_account.access_token")
            )
            row.name = updated.name
            row.default_region = updated.default_region
            if "access_token" in paths:
                row.access_token = repo.seal(access_token)
            await session.commit()
            self.changed()
            return user_account_from_row(row)

    # -- ad accounts -------------------------------------------------------------------

    async def create_ad_account(self, account: AdAccount, access_token: str | None) -> AdAccount:
        problems = _check_token(access_token, "ad_account.access_token")
        problems += validate_name(account.name, "ad_account.name")
        _raise_if(problems)
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            await repo.user_account_row(account.user_account_id, "ad_account.user_account_id")
            row = AdAccountRow(
                user_account_id=account.user_account_id,
                name=account.name.strip(),
                access_token=repo.seal(access_token),
            )
            session.add(row)
            await session.commit()
            self.changed()
            return ad_account_from_row(row)

    async def update_ad_account(
        self, account: AdAccount, access_token: str | None, paths: list[str]
    ) -> AdAccount:
        assert account.id is not None
        paths = _mask(paths, {"name", "access_token"})
        _raise_if(_check_token(access_token, "ad_account.access_token"))
        if "name" in paths:
            _raise_if(validate_name(account.name, "ad_account.name"))
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            row = await repo.ad_account_row(account.id, "ad_account.id")
            if "name" in paths:
                row.name = account.name.strip()
            if "access_token" in paths:
                row.access_token = repo.seal(access_token)
            await session.commit()
            self.changed()
            return ad_account_from_row(row)

    # -- CRM connections ---------------------------------------------------------------

    async def create_crm_connection(
        self,
        connection: CrmConnection,
        access_token: str | None,
        application_token: str | None,
    ) -> CrmConnection:
        problems = validate_base_url(connection.base_url, "crm_connection.base_url")
        problems += _check_token(access_token, "crm_connection.access_token")
        problems += _check_token(application_token, "crm_connection.application_token")
        if connection.crm_type is CrmType.AMOCRM and not access_token:
            problems.append(
                FieldViolation("crm_connection.access_token", "amoCRM needs a long-lived token")
            )
        if connection.reconcile_interval_seconds < 0:
            problems.append(
                FieldViolation("crm_connection.reconcile_interval_seconds", "must be >= 0")
            )
        _raise_if(problems)
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            await repo.user_account_row(
                connection.user_account_id, "crm_connection.user_account_id"
            )
            row = CrmConnectionRow(
                user_account_id=connection.user_account_id,
                crm_type=connection.crm_type.value,
                # A Bitrix24 webhook URL holds its secret code: sealed like the tokens.
                base_url=repo.seal(connection.base_url.strip()) or "",
                portal=portal_of(connection.crm_type, connection.base_url),
                access_token=repo.seal(access_token),
                application_token=repo.seal(application_token),
                reconcile_interval_seconds=connection.reconcile_interval_seconds,
            )
            session.add(row)
            await session.commit()
            self.changed()
            return crm_connection_from_row(row, self.cipher)

    async def update_crm_connection(
        self,
        connection: CrmConnection,
        access_token: str | None,
        application_token: str | None,
        paths: list[str],
    ) -> CrmConnection:
        assert connection.id is not None
        paths = _mask(
            paths, {"base_url", "access_token", "application_token", "reconcile_interval_seconds"}
        )
        problems: list[FieldViolation] = []
        if "base_url" in paths:
            problems += validate_base_url(connection.base_url, "crm_connection.base_url")
        if "reconcile_interval_seconds" in paths and connection.reconcile_interval_seconds < 0:
            problems.append(
                FieldViolation("crm_connection.reconcile_interval_seconds", "must be >= 0")
            )
        problems += _check_token(access_token, "crm_connection.access_token")
        problems += _check_token(application_token, "crm_connection.application_token")
        _raise_if(problems)
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            row = await repo.crm_connection_row(connection.id, "crm_connection.id")
            if "base_url" in paths:
                row.base_url = repo.seal(connection.base_url.strip()) or ""
                row.portal = portal_of(CrmType(row.crm_type), connection.base_url)
            if "access_token" in paths:
                row.access_token = repo.seal(access_token)
            if "application_token" in paths:
                row.application_token = repo.seal(application_token)
            if "reconcile_interval_seconds" in paths:
                row.reconcile_interval_seconds = connection.reconcile_interval_seconds
            await session.commit()
            self.changed()
            return crm_connection_from_row(row, self.cipher)

    # -- directions --------------------------------------------------------------------

    async def _check_references(self, repo: SettingsRepository, direction: Direction) -> None:
        await repo.user_account_row(direction.user_account_id, "direction.user_account_id")
        problems: list[FieldViolation] = []
        if direction.ad_account_id is not None:
            ad = await repo.ad_account_row(direction.ad_account_id, "direction.ad_account_id")
            if ad.user_account_id != direction.user_account_id:
                problems.append(
                    FieldViolation("direction.ad_account_id", "belongs to another user account")
                )
        connection_id = direction.capi.crm_connection_id
        if connection_id is not None:
            conn = await repo.crm_connection_row(connection_id, "direction.capi.crm_connection_id")
            if conn.user_account_id != direction.user_account_id:
                problems.append(
                    FieldViolation(
                        "direction.capi.crm_connection_id", "belongs to another user account"
                    )
                )
            crm_type = direction.capi.crm_type
            if crm_type is not None and conn.crm_type != crm_type.value:
                problems.append(
                    FieldViolation(
                        "direction.capi.crm_type",
                        f"does not match the connection's CRM ({conn.crm_type})",
                    )
                )
        _raise_if(problems)

    async def _save(
        self, repo: SettingsRepository, row: DirectionRow, direction: Direction
    ) -> SavedDirection:
        _raise_if(validate_direction(direction))
        await self._check_references(repo, direction)
        if direction.instance_name:
            other = await repo.direction_by_instance(direction.instance_name)
            if other is not None and other.id != row.id:
                raise AlreadyExists(
                    f"instance_name {direction.instance_name!r} is used by direction {other.id}",
                    reason="INSTANCE_NAME_TAKEN",
                    metadata={"instance_name": direction.instance_name},
                )
        apply_direction(row, direction)
        repo.session.add(row)
        try:
            await repo.session.flush()
        except IntegrityError as exc:
            raise AlreadyExists(
                "instance_name is used by another direction", reason="INSTANCE_NAME_TAKEN"
            ) from exc
        shared = 0
        if direction.pixel_id:
            shared = await repo.directions_on_pixel(
                direction.user_account_id, direction.pixel_id, row.id
            )
        await repo.session.commit()
        self.changed()
        saved = direction_from_row(row)
        return SavedDirection(saved, direction_warnings(saved, shared))

    async def create_direction(self, direction: Direction) -> SavedDirection:
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            return await self._save(repo, DirectionRow(), direction)

    async def get_direction(self, direction_id: int) -> Direction:
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            return direction_from_row(await repo.direction_row(direction_id))

    async def update_direction(self, incoming: Direction, paths: list[str]) -> SavedDirection:
        assert incoming.id is not None
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            row = await repo.direction_row(incoming.id, for_update=True)
            stored = direction_from_row(row)
            updated = apply_direction_mask(stored, incoming, paths)
            return await self._save(repo, row, updated)

    async def list_directions(
        self, user_account_id: int | None, after_id: int, limit: int
    ) -> tuple[list[Direction], int | None]:
        """A page of directions and the id to continue after (None on the last page)."""
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            rows = await repo.list_directions(user_account_id, after_id, limit + 1)
        more = len(rows) > limit
        rows = rows[:limit]
        return [direction_from_row(r) for r in rows], (rows[-1].id if more else None)

    async def list_pixel_choices(self, user_account_id: int) -> PixelChoices:
        async with self.db.session() as session:
            repo = SettingsRepository(session, self.cipher)
            await repo.user_account_row(user_account_id, "user_account_id")
            choices = await repo.pixel_choices(user_account_id)
        return PixelChoices(choices, PIXEL_WARNING if choices else "")


def _mask(paths: list[str], allowed: set[str]) -> list[str]:
    if not paths:
        _raise_if([FieldViolation("update_mask.paths", "name at least one field to update")])
    for path in paths:
        if path not in allowed:
            _raise_if([FieldViolation("update_mask.paths", f"unknown or immutable field {path!r}")])
    return paths
